"""Which local ports real services use, asked from the kernel (sock_diag).

The stealth/advanced modes must never treat a served port as a trap, so the
sensor checks this before every alert. One netlink dump returns only listening
TCP sockets (the kernel filters by state) and all UDP sockets; no port is ever
bind-tested. Results are cached briefly, so the cost is bounded under a flood.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from collections import OrderedDict

from .engine import TRANSPORTS
from .netlink import (NETLINK_SOCK_DIAG, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
                      error_code, message, messages)

SOCK_DIAG_BY_FAMILY = 20
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF

_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2 with a zero sockid


_local = threading.local()


def _socket() -> socket.socket:
    """One netlink socket per thread, kept open: a dump is then one round trip."""
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    return sock


def _dump(protocol: int, family: int, states: int, field: str = "sport") -> set:
    """Local ports (field="sport") or remote addresses (field="dst") of the sockets."""
    found: set = set()
    nl = _socket()
    body = _REQ.pack(family, protocol, 0, 0, states)
    nl.send(message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, body))
    while True:
        data = nl.recv(65536)
        if not data:
            return found
        for kind, _, at in messages(data):
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                code = error_code(data, at)
                if code == 0:
                    return found
                raise OSError(code, f"sock_diag: {os.strerror(code)}")
            # inet_diag_msg: family, state, timer, retrans, then the sockid:
            # sport, dport (2 bytes each), src[16], dst[16]
            sockid = at + 4
            if field == "sport":
                size = 4 if family == socket.AF_INET else 16
                bound = data[sockid + 4:sockid + 4 + size]
                if _loopback(bound):
                    continue  # 127.0.0.1:25 serves nobody outside: that port is a trap
                found.add(int.from_bytes(data[sockid:sockid + 2], "big"))
            else:
                size = 4 if family == socket.AF_INET else 16
                found.add(ipaddress.ip_address(data[sockid + 20:sockid + 20 + size]))


def _loopback(packed: bytes) -> bool:
    if len(packed) == 4:
        return packed[0] == 127
    address = ipaddress.IPv6Address(packed)
    return address.is_loopback or (address.ipv4_mapped is not None
                                   and address.ipv4_mapped.is_loopback)


def tcp_listening() -> set[int]:
    states = 1 << TCP_LISTEN
    return _dump(socket.IPPROTO_TCP, socket.AF_INET, states) | _dump(
        socket.IPPROTO_TCP, socket.AF_INET6, states)


def udp_bound() -> set[int]:
    return _dump(socket.IPPROTO_UDP, socket.AF_INET, ALL_STATES) | _dump(
        socket.IPPROTO_UDP, socket.AF_INET6, ALL_STATES)


def loaded_transports(path: str = "/proc/net/protocols") -> set[str]:
    """Which of engine.TRANSPORTS the kernel has now (a module loaded). Read,
    never asked through a socket or sock_diag: either would load the module."""
    try:
        with open(path) as f:
            names = {line.split(None, 1)[0] for line in f if line.strip()}
    except OSError:
        return set()
    return {name for name, (_, label) in TRANSPORTS.items() if label in names}


def transport_bound(name: str) -> set[int]:
    """Local ports of the sockets of a loaded transport (OSError: its
    sock_diag handler is missing, e.g. no sctp_diag)."""
    number = TRANSPORTS[name][0]
    return _dump(number, socket.AF_INET, ALL_STATES) | _dump(number, socket.AF_INET6, ALL_STATES)


def _transport_ports(name: str) -> set[int]:
    """A transport's bound ports now; none when the kernel has not loaded it."""
    return transport_bound(name) if name in loaded_transports() else set()


def local_port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The ports this host's own sockets get when they bind none."""
    try:
        with open(path) as f:
            first, last = (int(n) for n in f.read().split())
        return first, last
    except (OSError, ValueError):
        return 32768, 60999


# TCP states reached only through a completed handshake (not SYN_RECV: a
# spoofed SYN puts a socket there)
_POST_HANDSHAKE = sum(1 << state for state in (1, 4, 5, 6, 8, 9, 11))


def tcp_peers() -> set:
    """Remote addresses of TCP connections that completed a handshake."""
    peers = _dump(socket.IPPROTO_TCP, socket.AF_INET, _POST_HANDSHAKE, "dst")
    for address in _dump(socket.IPPROTO_TCP, socket.AF_INET6, _POST_HANDSHAKE, "dst"):
        peers.add(address.ipv4_mapped or address)
    return peers


class PeerMemory:
    """Addresses seen with completed handshakes in the last `memory` seconds
    (bounded, oldest forgotten first). Used when our nftables table, whose
    conntrack-fed peers set does the same in the kernel, is not in use."""

    def __init__(self, clock, memory: float = 600.0, capacity: int = 65536, max_age: float = 0.02,
                 maturity: float = 2.0):
        self._clock, self.memory, self.capacity, self.max_age = clock, memory, capacity, max_age
        self.maturity = maturity
        self._seen: OrderedDict = OrderedDict()  # address -> (first seen, last seen)
        self._stamp = float("-inf")

    def refresh(self) -> None:
        now = self._clock()
        for address in tcp_peers():
            first, last = self._seen.pop(address, (now, now))
            self._seen[address] = (first if now - last <= self.memory else now, now)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        self._stamp = now

    def is_peer(self, address) -> bool:
        if self._recent(address):
            return True
        if self._clock() - self._stamp > self.max_age:
            self.refresh()
            return self._recent(address)
        return False

    def _recent(self, address) -> bool:
        seen = self._seen.get(address)
        now = self._clock()
        return (seen is not None and now - seen[1] <= self.memory
                and now - seen[0] >= self.maturity)


class ListeningPorts:
    """Ports in use per protocol, refreshed when older than `max_age` seconds.
    A port served within `memory` seconds still counts as served: a service
    restarting (or a UDP client between two queries) is no trap for its
    clients meanwhile."""

    def __init__(self, clock, max_age: float = 0.02, memory: float = 0.0):
        self._clock = clock
        self.max_age, self.memory = max_age, memory
        self._readers = {"tcp": tcp_listening, "udp": udp_bound,
                         **{name: (lambda n=name: _transport_ports(n))
                            for name in TRANSPORTS}}
        self.last_served: dict[str, dict[int, float]] = {p: {} for p in self._readers}
        self._ports: dict[str, set[int]] = {p: set() for p in self._readers}
        self._stamp = {p: float("-inf") for p in self._readers}

    def refresh(self, protocol: str) -> set[int]:
        self._ports[protocol] = self._readers[protocol]()
        now = self._stamp[protocol] = self._clock()
        if self.memory:
            seen = self.last_served[protocol]
            for port in self._ports[protocol]:
                seen[port] = now
        return self._ports[protocol]

    def age(self, protocol: str) -> float:
        return self._clock() - self._stamp[protocol]

    def remembered(self, protocol: str, port: int) -> bool:
        return self._clock() - self.last_served[protocol].get(port, float("-inf")) <= self.memory

    def in_use(self, protocol: str, port: int) -> bool:
        """True when a real service uses the port (or did within `memory`);
        re-asks the kernel if stale. A protocol whose sockets cannot be listed
        (no sctp_diag): True, it might be."""
        if port in self._ports[protocol]:
            return True
        try:
            if self._clock() - self._stamp[protocol] > self.max_age \
                    and port in self.refresh(protocol):
                return True
        except OSError:
            return True
        return bool(self.memory) and self.remembered(protocol, port)
