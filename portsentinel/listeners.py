"""Which local ports real services use, asked from the kernel (sock_diag).

The stealth/advanced modes must never treat a served port as a trap, so the
sensor checks this before every alert. One netlink dump returns only listening
TCP sockets (the kernel filters by state) and all UDP sockets; no port is ever
bind-tested. Results are cached briefly, so the cost is bounded under a flood.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2 with a zero sockid


_local = threading.local()


def _socket() -> socket.socket:
    """One netlink socket per thread, kept open: a dump is then one round trip."""
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    return sock


def _dump(protocol: int, family: int, states: int) -> set[int]:
    ports: set[int] = set()
    nl = _socket()
    body = _REQ.pack(family, protocol, 0, 0, states)
    nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                           NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
    while True:
        data = nl.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return ports
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                if error == 0:
                    return ports
                raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
            # inet_diag_msg: family, state, timer, retrans, then sockid (sport first)
            sport_at = offset + _NLMSGHDR.size + 4
            ports.add(int.from_bytes(data[sport_at:sport_at + 2], "big"))
            offset += (length + 3) & ~3
        if not data:
            return ports


def tcp_listening() -> set[int]:
    states = 1 << TCP_LISTEN
    return _dump(socket.IPPROTO_TCP, socket.AF_INET, states) | _dump(
        socket.IPPROTO_TCP, socket.AF_INET6, states)


def udp_bound() -> set[int]:
    return _dump(socket.IPPROTO_UDP, socket.AF_INET, ALL_STATES) | _dump(
        socket.IPPROTO_UDP, socket.AF_INET6, ALL_STATES)


class ListeningPorts:
    """Ports in use per protocol, refreshed when older than `max_age` seconds."""

    def __init__(self, clock, max_age: float = 0.02):
        self._clock = clock
        self.max_age = max_age
        self._ports = {"tcp": set(), "udp": set()}
        self._stamp = {"tcp": float("-inf"), "udp": float("-inf")}
        self._readers = {"tcp": tcp_listening, "udp": udp_bound}

    def refresh(self, protocol: str) -> set[int]:
        self._ports[protocol] = self._readers[protocol]()
        self._stamp[protocol] = self._clock()
        return self._ports[protocol]

    def in_use(self, protocol: str, port: int) -> bool:
        """True when a real service uses the port; re-asks the kernel if stale."""
        if port in self._ports[protocol]:
            return True
        if self._clock() - self._stamp[protocol] > self.max_age:
            return port in self.refresh(protocol)
        return False

    def snapshot(self, protocol: str) -> set[int]:
        return set(self._ports[protocol])
