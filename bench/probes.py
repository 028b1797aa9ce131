"""Raw probe tools for the benchmark, run inside lab namespaces.

  sniff SECONDS SOURCE           (target ns) kernel-timestamped log of TCP
                                 probes from SOURCE and RSTs/SYN-ACKs back to it
  stream SOURCE TARGET TRAP PORT GAP_US COUNT
                                 (attacker ns) one SYN to TRAP, then COUNT SYNs
                                 to PORT every GAP_US microseconds
  flood DEV DST_MAC TARGET6 RATE SECONDS PORT [udplite|ack]
                                 (attacker ns) SYNs (UDP-Lite datagrams, ACKs)
                                 to TARGET6:PORT, each from a new source in
                                 2001:db8::/64, at RATE per second

Every loop is bounded by its count or its seconds. Addresses are the lab's.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import struct
import sys
import time

ETH_P_ALL, ETH_P_IPV6 = 0x0003, 0x86DD
SO_TIMESTAMPNS = 35
SYN, RST, ACK = 0x02, 0x04, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src: bytes, dst: bytes, sport: int, dport: int, v6: bool, flags: int = SYN) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, flags,
                         64240, 0, 0)
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(header), 6)
    else:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(header))
    return header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]


def sniff(seconds: float, source: str) -> None:
    """Print JSON: incoming probes [(t, dport, flags)], outgoing replies [(t, sport, flags)]."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.settimeout(0.2)
    src = ipaddress.ip_address(source).packed
    incoming, outgoing = [], []
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data, anc, _, _ = s.recvmsg(128, 64)
        except socket.timeout:
            continue
        stamp = next((struct.unpack("qq", d[:16]) for lvl, k, d in anc
                      if lvl == socket.SOL_SOCKET and k == SO_TIMESTAMPNS), (0, 0))
        t = stamp[0] + stamp[1] / 1e9
        if not data:
            continue
        if data[0] >> 4 == 4 and len(data) >= 40 and data[9] == 6:
            ihl, a, b = (data[0] & 15) * 4, data[12:16], data[16:20]
        elif data[0] >> 4 == 6 and len(data) >= 60 and data[6] == 6:
            ihl, a, b = 40, data[8:24], data[24:40]
        else:
            continue
        sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
        flags = data[ihl + 13]
        if a == src:
            incoming.append((t, dport, flags))
        elif b == src:
            outgoing.append((t, sport, flags))
    print(json.dumps({"in": incoming, "out": outgoing}), flush=True)


def stream(source: str, target: str, trap: int, port: int, gap_us: float, count: int) -> None:
    v6 = ":" in target
    family = socket.AF_INET6 if v6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.bind((source, 0))
    src, dst = ipaddress.ip_address(source).packed, ipaddress.ip_address(target).packed
    s.sendto(tcp_syn(src, dst, 40000, trap, v6), (target, 0))
    next_at = time.perf_counter()
    for i in range(count):
        next_at += gap_us / 1e6
        while time.perf_counter() < next_at:
            pass
        s.sendto(tcp_syn(src, dst, 40001 + i % 20000, port, v6), (target, 0))


def flood(dev: str, dst_mac: str, target6: str, rate: float, seconds: float, port: int,
          protocol: str = "tcp") -> None:
    """SYNs (UDP-Lite datagrams, ACKs) from distinct sources
    2001:db8::1:xxxx:xxxx (inside the lab's /64)."""
    number = 136 if protocol == "udplite" else 6
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
    mac = bytes.fromhex(dst_mac.replace(":", ""))
    address = (dev, ETH_P_IPV6, 0, 0, mac)
    dst = ipaddress.IPv6Address(target6).packed
    base = int(ipaddress.IPv6Address("2001:db8::1:0:0"))
    total = int(rate * seconds)
    start = time.perf_counter()
    sent = 0
    for i in range(total):
        due = start + i / rate
        while time.perf_counter() < due:
            pass
        src = (base + i).to_bytes(16, "big")  # a new source every time
        sport = 40000 + (i % 20000)
        segment = (struct.pack("!HHHH", sport, port, 0, 0) if number == 136
                   else tcp_syn(src, dst, sport, port, True, ACK if protocol == "ack" else SYN))
        header = struct.pack("!IHBB", 0x60000000, len(segment), number, 64) + src + dst
        s.sendto(header + segment, address)
        sent += 1
    print(json.dumps({"sent": sent, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "sniff":
        sniff(float(args[0]), args[1])
    elif command == "stream":
        stream(args[0], args[1], int(args[2]), int(args[3]), float(args[4]), int(args[5]))
    elif command == "flood":
        flood(args[0], args[1], args[2], float(args[3]), float(args[4]), int(args[5]), *args[6:7])
    else:
        sys.exit(f"unknown command {command}")
