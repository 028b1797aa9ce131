"""systemd's readiness protocol (sd_notify), with the standard library only.

Under `Type=notify` systemd passes a datagram socket in $NOTIFY_SOCKET: a path,
or a name in the abstract namespace when it starts with '@'. The daemon sends
`READY=1` once the sensors and the firewall are armed and `STOPPING=1` when it
shuts down. Without $NOTIFY_SOCKET (not under systemd) nothing is sent.
A notification that cannot be delivered is never an error for the daemon.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None):
        self.address = address or None

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Take $NOTIFY_SOCKET out of the environment (like sd_notify's
        unset_environment), so the commands we run do not inherit it."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def __bool__(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `READY=1`, `STATUS=...` etc. in one datagram; True if delivered."""
        if not self.address or not assignments:
            return False
        if self.address.startswith("@"):
            target = "\0" + self.address[1:]
        elif self.address.startswith("/"):
            target = self.address
        else:  # e.g. vsock: not used on a host
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall("\n".join(assignments).encode())
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", f"MAINPID={os.getpid()}",
                         *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
