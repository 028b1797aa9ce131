"""Legitimate traffic that a scan blocker must never ban, for end-to-end tests.

    python legit.py serve SECONDS            # target: extra services (below)
    python legit.py echo-later PORT SECONDS  # a remote UDP server that answers 100 ms late
    python legit.py CASE TARGET4 TARGET6 [N] # a client case; prints JSON counts

Extra services on the target (IPv4 and IPv6), next to tests/services.py's:
  TCP 81  HTTP/1.1 keep-alive, pipelining allowed
  TCP 82  answers one line, then resets the connection (SO_LINGER 0)

Client cases (every request is counted: ok / failed):
  reuse       HTTP/1.0 to port 80, 4 times from one fixed source port, 0.2 s apart
              (the server closes first, so its side waits in TIME_WAIT: NAT's port reuse)
  keepalive   HTTP/1.1 on one connection: requests one by one with idle gaps, then pipelined
  burst       many concurrent short connections to port 80
  reset       port 82: a line, then a reset by the server; reconnect from the same port
  latefin     close a connection, then replay its FIN/ACK and ACK (a late retransmission)
  udp         queries to the UDP echo on 53 with retries, from fixed and random ports
  outgoing    (run on the target) one-shot UDP queries from port 123 to a remote server that
              answers after the socket is closed, like ntpdate; argument: the server's address
  mix         for N seconds (or until SIGTERM): port reuse, a burst of short connections
              and UDP queries, in turn (needs only tests/services.py; for the benchmark)
Each case bounds its own count and time. Fixed source ports lie below the ephemeral range
(32768-60999), so that one case's fixed port is never another concurrent case's ephemeral one.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from probes import _checksum

HTTP10 = b"GET / HTTP/1.0\r\n\r\n"
HTTP11 = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
REPLY11 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Counts:
    def __init__(self):
        self.ok = self.failed = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def add(self, good: bool, what: str = "") -> None:
        with self.lock:
            if good:
                self.ok += 1
            else:
                self.failed += 1
                if len(self.failures) < 20:
                    self.failures.append(what)

    def json(self) -> str:
        return json.dumps({"ok": self.ok, "failed": self.failed, "failures": self.failures})


def family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def http10(address: str, port: int = 80, source_port: int = 0, timeout: float = 3) -> bool:
    with socket.socket(family(address), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            if source_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", source_port))
            s.connect((address, port))
            s.sendall(HTTP10)
            return _read_all(s).startswith(b"HTTP/1.0 200")
        except OSError:
            return False


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


# -- client cases --------------------------------------------------------------
def case_reuse(targets, n, counts):
    for i in range(n):
        for t, address in enumerate(targets):
            port = 21000 + 2 * i + t
            for round_ in range(4):
                counts.add(http10(address, 80, port), f"{address} from :{port} #{round_}")
                time.sleep(0.2)


def case_keepalive(targets, n, counts):
    for address in targets:
        for _ in range(max(1, n // 10)):
            try:
                with socket.create_connection((address, 81), timeout=5) as s:
                    for i in range(5):  # one by one, with idle gaps
                        s.sendall(HTTP11)
                        counts.add(_read_replies(s, 1) == 1, f"{address} keep-alive #{i}")
                        time.sleep(0.3)
                    s.sendall(HTTP11 * 10)  # pipelined
                    got = _read_replies(s, 10)
                    for i in range(10):
                        counts.add(i < got, f"{address} pipelined #{i}")
            except OSError as err:
                counts.add(False, f"{address} keep-alive: {err}")


def _read_replies(s: socket.socket, wanted: int) -> int:
    data = b""
    while data.count(REPLY11) < wanted:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.count(REPLY11)


def case_burst(targets, n, counts):
    with ThreadPoolExecutor(32) as pool:
        jobs = [pool.submit(http10, targets[i % len(targets)]) for i in range(n)]
        for i, job in enumerate(jobs):
            counts.add(job.result(), f"burst #{i}")


def case_reset(targets, n, counts):
    for i in range(n):
        for t, address in enumerate(targets):
            port = 23000 + 2 * i + t
            for _ in range(2):
                try:
                    with socket.socket(family(address), socket.SOCK_STREAM) as s:
                        s.settimeout(3)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("", port))
                        s.connect((address, 82))
                        counts.add(s.recv(64).startswith(b"service 82"), f"{address} reset")
                except OSError as err:
                    counts.add(False, f"{address} reset: {err}")
                time.sleep(0.1)


def case_latefin(targets, n, counts):
    """A connection closes; then its FIN/ACK and a bare ACK arrive again, late."""
    for i in range(n):
        address = targets[0]  # raw IPv4 only
        port = 24000 + i
        counts.add(http10(address, 80, port), f"latefin first :{port}")
        me = _source_for(address)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            for flags in (0x11, 0x10, 0x11):  # FIN|ACK, ACK, FIN|ACK
                raw.sendto(_tcp(me, address, port, 80, flags), (address, 0))
                time.sleep(0.05)
        finally:
            raw.close()
        counts.add(http10(address, 80, port), f"latefin again :{port}")


def _source_for(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return s.getsockname()[0]


def _tcp(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, 12345, 67890, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
    return header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]


def case_udp(targets, n, counts):
    for i in range(n):
        for t, address in enumerate(targets):
            port = 25000 + 2 * i + t if i % 2 else 0
            counts.add(_udp_query(address, 53, port), f"{address} udp :{port}")


def _udp_query(address: str, port: int, source_port: int = 0, tries: int = 3) -> bool:
    with socket.socket(family(address), socket.SOCK_DGRAM) as s:
        if source_port:
            s.bind(("", source_port))
        s.settimeout(0.5)
        for attempt in range(tries):
            s.sendto(b"query %d" % attempt, (address, port))
            try:
                return s.recvfrom(2048)[0].startswith(b"query")
            except TimeoutError:
                continue
    return False


def case_outgoing(servers, n, counts):
    """This host's one-shot queries from a privileged port; the reply comes late."""
    for i in range(n):
        for server in servers:
            try:
                with socket.socket(family(server), socket.SOCK_DGRAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("", 123))
                    s.sendto(b"ntp query", (server, 123))
                counts.add(True)
            except OSError as err:
                counts.add(False, f"outgoing {server}: {err}")
            time.sleep(0.2)


def case_mix(targets, seconds, counts):
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    deadline = time.monotonic() + seconds
    while running[0] and time.monotonic() < deadline:
        case_reuse(targets, 1, counts)
        case_burst(targets, 20, counts)
        case_udp(targets, 2, counts)


CASES = {"reuse": case_reuse, "keepalive": case_keepalive, "burst": case_burst,
         "reset": case_reset, "latefin": case_latefin, "udp": case_udp,
         "outgoing": case_outgoing, "mix": case_mix}


# -- servers -----------------------------------------------------------------
def _listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    s.listen(128)
    return s


def _keepalive(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        data = b""
        try:
            while chunk := conn.recv(4096):
                data += chunk
                while b"\r\n\r\n" in data:
                    _, data = data.split(b"\r\n\r\n", 1)
                    conn.sendall(REPLY11)
        except OSError:
            pass


def _reset(conn: socket.socket) -> None:
    try:
        conn.sendall(b"service 82\n")
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


def _accept_loop(sock: socket.socket, handle, deadline: float) -> None:
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def serve(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_accept_loop, args=(_listener(81), _keepalive, deadline)),
               threading.Thread(target=_accept_loop, args=(_listener(82), _reset, deadline))]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def echo_later(port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.settimeout(0.5)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data, peer = s.recvfrom(2048)
        except TimeoutError:
            continue
        time.sleep(0.1)  # the asker has closed its socket by now
        s.sendto(b"answer to " + data, peer)


def main() -> None:
    what = sys.argv[1]
    if what == "serve":
        return serve(float(sys.argv[2]))
    if what == "echo-later":
        return echo_later(int(sys.argv[2]), float(sys.argv[3]))
    targets = [a for a in sys.argv[2:4] if a != "-"]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    counts = Counts()
    CASES[what](targets, n, counts)
    print(counts.json(), flush=True)


if __name__ == "__main__":
    main()
