"""A classic BPF program for the packet sensor, assembled here.

Attached to an AF_PACKET/SOCK_DGRAM socket (data starts at the IP header), it
lets through only what can be a probe, so Python never sees the bulk of the
traffic: packets addressed to this host (PACKET_HOST), IPv4/IPv6, TCP without
ACK or RST, or UDP, first fragments only, destination port below a limit.
IPv6 packets with extension headers are passed on whole for the Python parser
(they may be long), and so are IPv4 first fragments of TCP, whose flags may lie
in the next fragment (`nmap -f`).
"""

from __future__ import annotations

import ctypes
import socket
import struct

# opcodes (linux/filter.h)
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND, LD_B_IND = 0x48, 0x50
LDX_MSH = 0xB1
JEQ, JGE, JSET = 0x15, 0x35, 0x45
RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4
SO_ATTACH_FILTER = 26
PACKET_HOST = 0
SNAPLEN = 256
SNAPLEN_EXTENDED = 65535  # IPv6 extension headers: up to 8 of 2 KiB before TCP/UDP

Insn = tuple[int, int, int, int]  # code, jt, jf, k


class _Program:
    """Tiny assembler with named labels for forward jumps."""

    def __init__(self):
        self.insns: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        self.insns.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def assemble(self) -> list[Insn]:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.insns):
            def rel(target):
                if isinstance(target, str):
                    offset = self.labels[target] - i - 1
                    if not 0 <= offset <= 255:
                        raise ValueError(f"jump to {target} out of range")
                    return offset
                return target
            out.append((code, rel(jt), rel(jf), k))
        return out


def probe_filter(tcp: bool, udp: bool, tcp_limit: int = 65536, udp_limit: int = 65536) -> list[Insn]:
    """Accept TCP (no ACK/RST) with dport < tcp_limit and UDP with dport < udp_limit."""
    p = _Program()
    p.op(LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
    p.op(JEQ, PACKET_HOST, 0, "drop")
    p.op(LD_W_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL)
    p.op(JEQ, 0x0800, "ipv4", 0)
    p.op(JEQ, 0x86DD, "ipv6", "drop")

    p.label("ipv4")
    p.op(LD_H_ABS, 6)
    p.op(JSET, 0x1FFF, "drop", 0)  # later fragment
    p.op(LD_B_ABS, 9)
    p.op(JEQ, 6, "tcp4" if tcp else "drop", 0)
    p.op(JEQ, 17, "udp4" if udp else "drop", "drop")
    p.label("tcp4")
    p.op(LDX_MSH, 0)  # X = IPv4 header length
    p.op(LD_H_ABS, 6)
    p.op(JSET, 0x2000, "accept", 0)  # a first fragment: the flags may come later
    p.op(LD_B_IND, 13)
    p.op(JSET, 0x14, "drop", 0)  # ACK or RST
    p.op(LD_H_IND, 2)
    p.op(JGE, tcp_limit, "drop", "accept")
    p.label("udp4")
    p.op(LDX_MSH, 0)
    p.op(LD_H_IND, 2)
    p.op(JGE, udp_limit, "drop", "accept")

    p.label("ipv6")
    p.op(LD_B_ABS, 6)
    p.op(JEQ, 6, "tcp6" if tcp else "drop", 0)
    p.op(JEQ, 17, "udp6" if udp else "drop", 0)
    for ext in (0, 43, 44, 60, 51):  # extension headers: let the parser walk them
        p.op(JEQ, ext, "accept_whole", 0)
    p.op(RET_K, 0)
    p.label("tcp6")
    p.op(LD_B_ABS, 40 + 13)
    p.op(JSET, 0x14, "drop", 0)
    p.op(LD_H_ABS, 40 + 2)
    p.op(JGE, tcp_limit, "drop", "accept")
    p.label("udp6")
    p.op(LD_H_ABS, 40 + 2)
    p.op(JGE, udp_limit, "drop", "accept")

    p.label("accept")
    p.op(RET_K, SNAPLEN)
    p.label("accept_whole")
    p.op(RET_K, SNAPLEN_EXTENDED)
    p.label("drop")
    p.op(RET_K, 0)
    return p.assemble()


def attach(sock: socket.socket, program: list[Insn]) -> None:
    """SO_ATTACH_FILTER: the kernel runs `program` on every packet."""
    blob = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(blob)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
