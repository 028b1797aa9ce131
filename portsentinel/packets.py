"""Parse IPv4/IPv6 packets (starting at the IP header) into probe fields.

Pure and defensive: any truncated or malformed packet gives None, never an
exception, so one bad packet cannot stop the sensor.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .addrset import canonical
from .engine import ACK, IP, RST, TCP, TRANSPORTS, UDP

PROTO_TCP, PROTO_UDP = 6, 17
PROTO_SCTP, PROTO_DCCP = TRANSPORTS["sctp"][0], TRANSPORTS["dccp"][0]
TRANSPORT_NAMES = {number: name for name, (number, _) in TRANSPORTS.items()}
# IPv6 extension headers that may precede TCP/UDP
_HOP, _ROUTING, _FRAGMENT, _DSTOPTS, _AH = 0, 43, 44, 60, 51
_MAX_EXTENSIONS = 8


@dataclass(frozen=True, slots=True)
class Packet:
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    protocol: str  # TCP or UDP; IP (any other protocol) only if not `probes_only`
    port: int  # destination port; for IP the protocol number
    flags: int  # TCP flags, 0 for UDP
    ip_options: bool
    source_port: int = 0
    truncated: bool = False  # a first fragment too short for the TCP flags (nmap -f)
    service: int = 0  # SCTP, UDP-Lite, DCCP (protocol IP): the destination port


def parse(data: bytes, probes_only: bool = True) -> Packet | None:
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, probes_only)
    if version == 6:
        return _parse_ipv6(data, probes_only)
    return None


def _parse_ipv4(data: bytes, probes_only: bool = True) -> Packet | None:
    if len(data) < 20:
        return None
    header_len = (data[0] & 0x0F) * 4
    if header_len < 20 or len(data) < header_len:
        return None
    fragment = int.from_bytes(data[6:8], "big")
    if fragment & 0x1FFF:  # a later fragment: no L4 header
        return None
    return _transport(
        data[9], data[header_len:],
        ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20]),
        ip_options=header_len > 20, probes_only=probes_only,
        first_of_many=bool(fragment & 0x2000))


def _parse_ipv6(data: bytes, probes_only: bool = True) -> Packet | None:
    if len(data) < 40:
        return None
    next_header, offset = data[6], 40
    options = first_of_many = False
    for _ in range(_MAX_EXTENSIONS):
        if next_header in (PROTO_TCP, PROTO_UDP) or (
                not probes_only and next_header not in (_HOP, _ROUTING, _FRAGMENT, _DSTOPTS,
                                                        _AH)):
            break
        if next_header in (_HOP, _ROUTING, _DSTOPTS):
            if len(data) < offset + 2:
                return None
            options = options or next_header != _ROUTING
            next_header, offset = data[offset], offset + (data[offset + 1] + 1) * 8
        elif next_header == _FRAGMENT:
            if len(data) < offset + 8:
                return None
            if int.from_bytes(data[offset + 2:offset + 4], "big") & 0xFFF8:
                return None  # a later fragment
            first_of_many = bool(data[offset + 3] & 1)
            next_header, offset = data[offset], offset + 8
        elif next_header == _AH:
            if len(data) < offset + 2:
                return None
            next_header, offset = data[offset], offset + (data[offset + 1] + 2) * 4
        else:
            return None
    else:
        return None
    if offset > len(data):
        return None
    return _transport(
        next_header, data[offset:],
        canonical(ipaddress.IPv6Address(data[8:24])), ipaddress.IPv6Address(data[24:40]),
        ip_options=options, probes_only=probes_only, first_of_many=first_of_many)


def _transport(proto: int, segment: bytes, source, destination, ip_options: bool,
               probes_only: bool = True, first_of_many: bool = False) -> Packet | None:
    if proto == PROTO_TCP:
        if len(segment) < 14:
            if first_of_many and len(segment) >= 4:  # the header split on purpose
                return Packet(source, destination, TCP, int.from_bytes(segment[2:4], "big"),
                              0, ip_options, int.from_bytes(segment[0:2], "big"),
                              truncated=True)
            return None
        flags = segment[13]
        if probes_only and flags & (ACK | RST):  # part of a conversation, not a probe
            return None
        return Packet(source, destination, TCP, int.from_bytes(segment[2:4], "big"),
                      flags, ip_options, int.from_bytes(segment[0:2], "big"))
    if proto == PROTO_UDP:
        if len(segment) < 4:
            return None
        return Packet(source, destination, UDP, int.from_bytes(segment[2:4], "big"),
                      0, ip_options, int.from_bytes(segment[0:2], "big"))
    if not probes_only:  # what the kernel logged as another protocol's probe (nmap -sO)
        if proto in TRANSPORT_NAMES and len(segment) >= 4:
            return Packet(source, destination, IP, proto, _opening(proto, segment), ip_options,
                          int.from_bytes(segment[0:2], "big"),
                          service=int.from_bytes(segment[2:4], "big"))
        return Packet(source, destination, IP, proto, 0, ip_options)
    return None


def _opening(proto: int, segment: bytes) -> int:
    """What kind of packet of its transport: SCTP's first chunk type, DCCP's
    packet type (-1: too short to say); 0 for UDP-Lite."""
    if proto == PROTO_SCTP:
        return segment[12] if len(segment) > 12 else -1
    if proto == PROTO_DCCP:
        return (segment[8] >> 1) & 0x0F if len(segment) > 8 else -1
    return 0
