"""A legitimate client: fetches http://TARGET:80/ over IPv4 and IPv6 every
`interval` seconds until `seconds` pass or SIGTERM; prints JSON counts.

Run: python client.py TARGET4 TARGET6 seconds [interval]
"""

import json
import signal
import socket
import sys
import time


def fetch(address: str) -> bool:
    try:
        with socket.create_connection((address, 80), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def main() -> None:
    targets = sys.argv[1:3]
    deadline = time.monotonic() + float(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
    stats = {"ok": 0, "failed": 0, "failures": []}
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    while running[0] and time.monotonic() < deadline:
        for target in targets:
            if fetch(target):
                stats["ok"] += 1
            else:
                stats["failed"] += 1
                stats["failures"].append([round(time.time(), 3), target])
        time.sleep(interval)
    stats["failures"] = stats["failures"][:20]
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
