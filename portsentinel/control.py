"""The control socket: `portsentinel status|list|block|unblock|reload` talk
to the running daemon over a unix socket, one JSON request and one JSON
reply per connection. The socket is mode 0600 and every peer's uid is
checked (SO_PEERCRED): root only.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Callable

MAX_REQUEST = 65536
MAX_REPLY = 1 << 30  # `list` of a million bans
TIMEOUT = 30.0


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: Path, handler: Callable[[dict], dict], log_error=None):
        self.path, self.handler = path, handler
        self.log_error = log_error or (lambda message: None)
        self._claim(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    @staticmethod
    def _claim(path: Path) -> None:
        """Remove a stale socket; refuse if a daemon already answers there."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() and not path.is_symlink():
            return
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
            return
        finally:
            probe.close()
        raise OSError(f"another portsentinel is running (it answers on {path})")

    def close(self) -> None:
        try:
            try:  # wakes the thread blocked in accept(); close() alone would not
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self._thread.join(timeout=5)
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except Exception as err:  # one bad client must not stop the server
                    self.log_error(f"adminalert: ERROR: control request failed: {err!r}")

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
        if uid != 0:
            reply = {"ok": False, "error": "permission denied: root only"}
        else:
            try:
                reply = self.handler(json.loads(_read_line(conn)))
            except (ValueError, ControlError) as err:
                reply = {"ok": False, "error": str(err)}
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _read_line(conn: socket.socket, limit: int = MAX_REQUEST) -> bytes:
    chunks, size = [], 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ControlError("request too large" if limit == MAX_REQUEST else "reply too large")
    return b"".join(chunks)


def request(path: Path, message: dict, timeout: float = TIMEOUT) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"cannot reach the daemon at {path} (is it running?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = _read_line(sock, MAX_REPLY)
    finally:
        sock.close()
    if not reply:
        raise ControlError("the daemon closed the connection without an answer")
    return json.loads(reply)
