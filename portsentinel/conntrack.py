"""Is a packet a reply to this host's own traffic? One ctnetlink lookup.

The packet sensor sees packets before netfilter, so it cannot read their
conntrack state. But when this host sent a query (say from UDP 123) and closed
its socket before the answer came, the kernel still holds the flow. The lookup
finds an entry by either of its tuples, so a scanner's probe finds the entry
it made itself: what decides is the entry's *original* tuple, which must come
from this host (our address and port as its source). Asked only for probes
that could still lead to a ban, never per packet.
"""

from __future__ import annotations

import socket
import struct
import threading

from .netlink import (NETLINK_NETFILTER, NFGEN, NLM_F_ACK, NLM_F_REQUEST, answers, attr,
                      attributes, nested, nfnl_message)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS = 1, 2, 3
IPS_DST_NAT = 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class Conntrack:
    def __init__(self):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(1.0)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def is_reply(self, protocol: str, source, source_port: int, destination,
                 port: int) -> bool:
        """Does the kernel track a flow whose reply direction is this packet?"""
        return any(_started_here(data, start, end, destination.packed, port)
                   for data, start, end in self._lookup(protocol, source, source_port,
                                                        destination, port))

    def is_forwarded(self, protocol: str, source, source_port: int, destination,
                     port: int, except_to_port: int = 0) -> bool:
        """Was this packet's connection sent on by destination NAT (a port
        forward, a container's published port)? Then no local socket is
        expected on its port. A redirect to `except_to_port` (our own
        challenge socket) does not count."""
        for data, start, end in self._lookup(protocol, source, source_port, destination, port):
            found = attributes(data, start, end)
            status = found.get(CTA_STATUS)
            if not (_started_here(data, start, end, source.packed, source_port) and status
                    and struct.unpack("!I", status)[0] & IPS_DST_NAT):
                continue
            reply = attributes(found.get(CTA_TUPLE_REPLY, b""), 0, 1 << 16)
            answering = attributes(reply.get(CTA_TUPLE_PROTO, b""), 0, 1 << 16)
            if except_to_port and answering.get(CTA_PROTO_SRC_PORT) == struct.pack(
                    "!H", except_to_port):
                continue
            return True
        return False

    def _lookup(self, protocol: str, source, source_port: int, destination,
                port: int) -> list[tuple[bytes, int, int]]:
        """The entries that have this packet's tuple in either direction, as
        (datagram, attributes start, end)."""
        if source.version != destination.version or protocol not in PROTOCOLS:
            return []
        v4 = source.version == 4
        ips = nested(CTA_TUPLE_IP,
                      attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, source.packed),
                      attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, destination.packed))
        proto = nested(CTA_TUPLE_PROTO,
                        attr(CTA_PROTO_NUM, bytes([PROTOCOLS[protocol]])),
                        attr(CTA_PROTO_SRC_PORT, struct.pack("!H", source_port)),
                        attr(CTA_PROTO_DST_PORT, struct.pack("!H", port)))
        body = nested(CTA_TUPLE_REPLY, ips, proto)
        family = socket.AF_INET if v4 else socket.AF_INET6
        with self._lock:
            self._seq += 1
            self._sock.send(nfnl_message(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET,
                                         NLM_F_REQUEST | NLM_F_ACK, self._seq, family, body))
            return [(data, start + NFGEN.size, end)
                    for data, start, end in answers(self._sock, self._seq, "conntrack lookup")]


def _started_here(data: bytes, start: int, end: int, ours: bytes, our_port: int) -> bool:
    """Is the entry's original direction from this address and port?"""
    original = attributes(data, start, end).get(CTA_TUPLE_ORIG, b"")
    tuple_ = attributes(original, 0, len(original))
    ips = attributes(tuple_.get(CTA_TUPLE_IP, b""), 0, len(tuple_.get(CTA_TUPLE_IP, b"")))
    proto = attributes(tuple_.get(CTA_TUPLE_PROTO, b""), 0,
                       len(tuple_.get(CTA_TUPLE_PROTO, b"")))
    source = ips.get(CTA_IP_V4_SRC) or ips.get(CTA_IP_V6_SRC)
    return source == ours and proto.get(CTA_PROTO_SRC_PORT) == struct.pack("!H", our_port)
