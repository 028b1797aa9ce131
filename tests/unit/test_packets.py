import ipaddress
import struct

import pytest
from hypothesis import given, settings, strategies as st

from portsentinel import packets
from portsentinel.engine import ACK, FIN, PSH, RST, SYN, TCP, UDP, URG


def ipv4(proto: int, payload: bytes, options: bytes = b"", frag: int = 0,
         src="198.51.100.2", dst="198.51.100.1") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload),
                         1, frag, 64, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed)
    return header + options + payload


def ipv6(next_header: int, payload: bytes, src="2001:db8::2", dst="2001:db8::1") -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def tcp(dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, flags, 1024, 0, 0)


def udp(dport: int) -> bytes:
    return struct.pack("!HHHH", 40000, dport, 8, 0)


def test_ipv4_syn():
    p = packets.parse(ipv4(6, tcp(111, SYN)))
    assert (str(p.source), str(p.destination), p.protocol, p.port, p.flags, p.ip_options) == (
        "198.51.100.2", "198.51.100.1", TCP, 111, SYN, False)


@pytest.mark.parametrize("flags", [FIN, 0, FIN | URG | PSH, SYN | FIN])
def test_ipv4_stealth_flags_pass(flags):
    assert packets.parse(ipv4(6, tcp(1, flags))).flags == flags


@pytest.mark.parametrize("flags", [ACK, RST, SYN | ACK, RST | ACK])
def test_conversation_packets_are_not_probes(flags):
    assert packets.parse(ipv4(6, tcp(1, flags))) is None


def test_ipv4_options_are_flagged():
    p = packets.parse(ipv4(6, tcp(1, SYN), options=b"\x01\x01\x01\x00"))
    assert p.ip_options and p.port == 1


def test_ipv4_later_fragment_is_skipped():
    assert packets.parse(ipv4(6, tcp(1, SYN), frag=185)) is None


def test_ipv4_udp():
    p = packets.parse(ipv4(17, udp(53)))
    assert p.protocol == UDP and p.port == 53


def test_ipv6_tcp_and_udp():
    assert packets.parse(ipv6(6, tcp(22, SYN))).port == 22
    p = packets.parse(ipv6(17, udp(161)))
    assert p.protocol == UDP and str(p.source) == "2001:db8::2"


def test_ipv6_extension_chain():
    hop = bytes([60, 0]) + b"\x01\x04\x00\x00\x00\x00"  # hop-by-hop -> dest opts
    dst = bytes([44, 0]) + b"\x01\x04\x00\x00\x00\x00"  # dest opts -> fragment
    frag = bytes([6, 0, 0, 0]) + b"\x00\x00\x00\x01"  # first fragment -> TCP
    p = packets.parse(ipv6(0, hop + dst + frag + tcp(80, FIN)))
    assert p.port == 80 and p.flags == FIN and p.ip_options


def test_ipv6_later_fragment_is_skipped():
    frag = bytes([6, 0, 0, 8]) + b"\x00\x00\x00\x01"  # offset 1
    assert packets.parse(ipv6(44, frag + tcp(80, SYN))) is None


def test_ipv6_endless_extension_chain_is_skipped():
    chain = (bytes([60, 0]) + b"\x00" * 6) * 20
    assert packets.parse(ipv6(60, chain)) is None


@pytest.mark.parametrize("data", [
    b"", b"\x45", b"\x45" + b"\x00" * 18, b"\x41" + b"\x00" * 30,  # IHL < 5
    b"\x4f" + b"\x00" * 30,  # IHL says 60, packet shorter
    b"\x60" + b"\x00" * 20, b"\x10" * 40])
def test_malformed_packets_give_none(data):
    assert packets.parse(data) is None


def test_truncated_tcp_header_gives_none():
    assert packets.parse(ipv4(6, tcp(1, SYN)[:10])) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes_never_raise(data):
    packets.parse(data)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=100), st.integers(0, 0xFF))
def test_fuzz_ipv6_headers_never_raise(next_header, rest, first):
    packets.parse(ipv6(next_header, bytes([first]) + rest))
    packets.parse(ipv4(next_header, rest))


def test_a_tiny_first_fragment_is_a_probe_without_flags():
    """nmap -f: the first fragment holds 8 bytes of TCP (ports, sequence), the
    flags come later. No real stack splits a TCP header (RFC 1858)."""
    first = struct.pack("!HHI", 40000, 111, 1)  # 8 bytes
    p = packets.parse(ipv4(6, first, frag=0x2000))  # MF, offset 0
    assert (p.protocol, p.port, p.truncated) == (TCP, 111, True)
    frag6 = bytes([6, 0, 0, 1]) + b"\x00\x00\x00\x07"  # offset 0, M=1
    p6 = packets.parse(ipv6(44, frag6 + first))
    assert (p6.protocol, p6.port, p6.truncated) == (TCP, 111, True)
    assert packets.parse(ipv4(6, first)) is None  # a short unfragmented segment is garbage


def test_a_syn_behind_long_extension_headers_is_read():
    """A 248-byte destination options header before the TCP header."""
    options = bytes([6, 30]) + bytes([1, 244]) + b"\x00" * 244  # next=TCP, (30+1)*8 bytes
    p = packets.parse(ipv6(60, options + tcp(111, SYN)))
    assert (p.protocol, p.port, p.flags, p.ip_options) == (TCP, 111, SYN, True)


def test_another_ip_protocol_is_a_packet_only_where_the_kernel_logged_it():
    """nmap -sO's probes (GRE 47, SCTP 132, a bare protocol 200, no payload)
    reach the daemon only through the kernel log: parsed there, with the
    protocol number as the port; the packet sensor still sees TCP/UDP only."""
    from portsentinel.engine import IP
    for raw in (ipv4(47, b""), ipv4(132, b"\0" * 12), ipv6(200, b"")):
        p = packets.parse(raw, probes_only=False)
        assert p is not None and p.protocol == IP and p.port == raw[9 if raw[0] >> 4 == 4 else 6]
        assert packets.parse(raw) is None


def test_sctp_udplite_and_dccp_probes_carry_their_port_and_opening():
    """Issue 19: nmap -sY's INIT and -sZ's COOKIE ECHO, a UDP-Lite datagram
    and a DCCP Request: the protocol number stays the port (for -sO's count),
    the destination port is `service`, the SCTP chunk / DCCP packet type
    is `flags` (-1: too short to say)."""
    from portsentinel.engine import IP
    sctp = lambda port, chunk: struct.pack("!HHII", 40000, port, 0, 0) + bytes([chunk, 0, 0, 20])
    dccp = lambda port, kind: struct.pack("!HHBBHBB", 40000, port, 5, 0, 0, kind << 1 | 1, 0)
    cases = [(ipv4(132, sctp(80, 1)), 132, 80, 1), (ipv6(132, sctp(9, 10)), 132, 9, 10),
             (ipv4(136, udp(7000)), 136, 7000, 0), (ipv6(33, dccp(5001, 0)), 33, 5001, 0),
             (ipv4(33, dccp(5002, 5)), 33, 5002, 5), (ipv4(132, sctp(80, 1)[:8]), 132, 80, -1)]
    for raw, number, port, opening in cases:
        p = packets.parse(raw, probes_only=False)
        assert (p.protocol, p.port, p.service, p.flags, p.source_port) == \
            (IP, number, port, opening, 40000)
        assert packets.parse(raw) is None
