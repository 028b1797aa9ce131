"""Wake up when this host's addresses or routes change (rtnetlink multicast),
so the never-block set follows them at once, not at the next poll. Nothing
of the messages is read (ignore.py asks for the new addresses and gateways)."""

from __future__ import annotations

import socket

from .rtnetlink import RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, \
    RTMGRP_IPV6_ROUTE


class RouteWatch:
    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR
                        | RTMGRP_IPV6_ROUTE))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        """Drain the notifications; True if there were any (or we lost some)."""
        seen = False
        while True:
            try:
                if not self.sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError:  # ENOBUFS: we missed some; a refresh covers it
                return True

    def close(self) -> None:
        self.sock.close()
