"""Stand-in real services for the target namespace: TCP 22, 80, 443, 8080
answer a line (port 80 reads the request, then sends an HTTP/1.0 response
and closes first, as a web server does), UDP 53 echoes. IPv4 and IPv6.

Run: python services.py [seconds]  (exits by itself after `seconds`).
"""

import selectors
import socket
import sys
import time

TCP_PORTS = (22, 80, 443, 8080)
UDP_PORTS = (53,)
HTTP = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"


def dual(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if kind == socket.SOCK_STREAM:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    s.setblocking(False)
    return s


def main() -> None:
    lifetime = float(sys.argv[1]) if len(sys.argv) > 1 else 600
    sel = selectors.DefaultSelector()
    for port in TCP_PORTS:
        sel.register(dual(socket.SOCK_STREAM, port), selectors.EVENT_READ, ("tcp", port))
    for port in UDP_PORTS:
        sel.register(dual(socket.SOCK_DGRAM, port), selectors.EVENT_READ, ("udp", port))
    print("ready", flush=True)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            proto, port = key.data
            try:
                if proto == "http":  # the request has come: answer, then close first
                    sel.unregister(key.fileobj)
                    with key.fileobj as conn:
                        conn.recv(4096)
                        conn.sendall(HTTP)
                elif proto == "tcp" and port == 80:
                    conn, _ = key.fileobj.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, ("http", port))
                elif proto == "tcp":
                    conn, _ = key.fileobj.accept()
                    with conn:
                        conn.settimeout(0.5)
                        conn.sendall(f"service {port}\n".encode())
                else:
                    data, peer = key.fileobj.recvfrom(2048)
                    key.fileobj.sendto(data, peer)
            except OSError:
                pass


if __name__ == "__main__":
    main()
