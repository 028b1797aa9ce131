"""This host's addresses and default gateways over rtnetlink, checked against
iproute2's own answer (read only, in whatever namespace the test runs)."""

import ipaddress
import json
import shutil
import subprocess
import struct

import pytest

from portsentinel import netlink, rtnetlink


def ip_json(*args):
    if not shutil.which("ip"):
        pytest.fail("iproute2 missing; run scripts/test.sh")
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                     check=True).stdout or "[]")


def test_addresses_are_those_iproute2_lists():
    expected = {ipaddress.ip_network(a["local"]) for link in ip_json("addr")
                for a in link.get("addr_info", [])}
    assert set(rtnetlink.addresses()) == expected and expected


def test_default_gateways_are_those_iproute2_lists():
    expected = set()
    for family in ("-4", "-6"):
        for route in ip_json(family, "route", "show", "default", "table", "all"):
            hops = [route.get("gateway")] + [h.get("gateway") for h in route.get("nexthops", [])]
            expected |= {ipaddress.ip_network(h) for h in hops if h}
    assert set(rtnetlink.default_gateways()) == expected


def route_message(dst_len: int, gateway: bytes | None, via: list[bytes]) -> bytes:
    attrs = netlink.attr(rtnetlink.RTA_GATEWAY, gateway) if gateway else b""
    if via:
        hops = b""
        for hop in via:
            inner = netlink.attr(rtnetlink.RTA_GATEWAY, hop)
            hops += rtnetlink.RTNEXTHOP.pack(rtnetlink.RTNEXTHOP.size + len(inner), 0, 0, 2) + inner
        attrs += netlink.attr(rtnetlink.RTA_MULTIPATH, hops)
    header = rtnetlink.RTMSG.pack(10 if via and len(via[0]) == 16 else 2, dst_len, 0, 0, 254,
                                  0, 0, 1, 0)
    return netlink.message(rtnetlink.RTM_NEWROUTE, 0, 1, header + attrs)


def test_multipath_default_routes_give_every_next_hop():
    v6 = [ipaddress.ip_address("2001:db8::fe").packed, ipaddress.ip_address("2001:db8::fd").packed]
    data = route_message(0, None, v6)
    at = netlink.HEADER.size
    found = rtnetlink.gateways_of(data, at, at + rtnetlink.RTMSG.size, len(data))
    assert found == [ipaddress.ip_network("2001:db8::fe"), ipaddress.ip_network("2001:db8::fd")]
    plain = route_message(0, ipaddress.ip_address("198.51.100.254").packed, [])
    assert rtnetlink.gateways_of(plain, at, at + rtnetlink.RTMSG.size, len(plain)) == \
        [ipaddress.ip_network("198.51.100.254")]
    other = route_message(24, ipaddress.ip_address("198.51.100.254").packed, [])
    assert rtnetlink.gateways_of(other, at, at + rtnetlink.RTMSG.size, len(other)) == []
    assert struct.calcsize("=BBBBBBBBI") == rtnetlink.RTMSG.size == 12
