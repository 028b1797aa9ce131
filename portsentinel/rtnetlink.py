"""This host's addresses and default gateways, asked from the kernel with two
rtnetlink dumps, and the groups that announce their changes (routewatch.py).
Hand-encoded like the other netlink users (netlink.py): pyroute2 cost the
daemon 22 MiB of memory and 0.19 s of start-up for these two questions."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from .netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, attributes, error_code, \
    message, message_end, messages

RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_GETROUTE = 20, 22, 24, 26
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_GATEWAY, RTA_MULTIPATH = 5, 9
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst length, src length, tos, table, ...
RTNEXTHOP = struct.Struct("=HBBi")  # length, flags, hops, interface


def _dump(request: int, answer: int, header: struct.Struct):
    """(datagram, fixed header offset, attributes start, end) of each answer."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.send(message(request, NLM_F_REQUEST | NLM_F_DUMP, 1, b"\0" * header.size))
        while True:
            data = sock.recv(1 << 16)
            for kind, _, at in messages(data):
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = error_code(data, at)
                    if code:
                        raise OSError(code, f"rtnetlink: {os.strerror(code)}")
                    return
                if kind == answer:
                    yield data, at, at + header.size, message_end(data, at)


def _network(packed: bytes | None):
    if packed is None or len(packed) not in (4, 16):
        return None
    return ipaddress.ip_network(ipaddress.ip_address(packed))


def addresses() -> list:
    """Every address configured on this host's interfaces (this netns)."""
    found = []
    for data, _, start, end in _dump(RTM_GETADDR, RTM_NEWADDR, IFADDRMSG):
        attrs = attributes(data, start, end)
        network = _network(attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS))
        if network is not None:
            found.append(network)
    return found


def default_gateways() -> list:
    """The next hops of the default routes (IPv4 and IPv6, multipath too)."""
    found = []
    for data, at, start, end in _dump(RTM_GETROUTE, RTM_NEWROUTE, RTMSG):
        found += gateways_of(data, at, start, end)
    return found


def gateways_of(data: bytes, at: int, start: int, end: int) -> list:
    """The next hops of one route message, if it is a default route."""
    if data[at + 1] != 0:  # dst length: not a default route
        return []
    attrs = attributes(data, start, end)
    hops = [attrs.get(RTA_GATEWAY)]
    multipath = attrs.get(RTA_MULTIPATH, b"")
    offset = 0
    while offset + RTNEXTHOP.size <= len(multipath):
        length = RTNEXTHOP.unpack_from(multipath, offset)[0]
        if length < RTNEXTHOP.size:
            break
        hops.append(attributes(multipath, offset + RTNEXTHOP.size,
                               offset + length).get(RTA_GATEWAY))
        offset += (length + 3) & ~3
    return [n for n in map(_network, hops) if n is not None]
