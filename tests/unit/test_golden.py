"""Golden tests, no root needed: the nftables rule text, the BPF program and
the netlink messages, compared with files in tests/unit/golden/ (made by the
code before the daemon was split into rooms, so a change shows as a diff).
After a deliberate change: PORTSENTINEL_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py,
then read the diff before committing it."""

import ipaddress
import os
import struct
import threading
from pathlib import Path

import pytest

from portsentinel import bpf, listeners, netlink, nfqueue, nftwatch
from portsentinel.conntrack import Conntrack
from portsentinel.nflog import KernelBanLog
from portsentinel.nfnetlink import (NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, SET_ELEM_KEY,
                                    SET_ELEM_LIST_ELEMENTS, SET_ELEM_LIST_SET, SET_ELEM_TIMEOUT,
                                    SetElements, batch, compat_queue_rule)
from portsentinel.ruleset import KernelTrap, table_commands

GOLDEN = Path(__file__).parent / "golden"
A = ipaddress.ip_address


def acks_for(data: bytes) -> bytes:
    """The kernel's acknowledgements of every request that asks for one."""
    out = b""
    for kind, seq, at in netlink.messages(data):
        _, _, flags, _, _ = netlink.HEADER.unpack_from(data, at - netlink.HEADER.size)
        if flags & (netlink.NLM_F_ACK | netlink.NLM_F_DUMP):
            out += netlink.message(netlink.NLMSG_ERROR, 0, seq, struct.pack("=i", 0)
                                   + data[at - netlink.HEADER.size:at])
    return out


class FakeNetlink:
    """Records what is sent; answers each datagram with its acknowledgements."""

    def __init__(self):
        self.sent, self.replies = [], []

    def send(self, data):
        self.sent.append(bytes(data))
        self.replies.append(acks_for(data))
        return len(data)

    def recv(self, size):
        return self.replies.pop(0)

    def settimeout(self, seconds):
        pass


TRAPS = {
    "no_trap": (None, 0),
    "defaults": (KernelTrap(((1, 21), (23, 79), (81, 1023)), ((1, 52), (54, 67), (69, 1023)),
                            600, (20.0, 40), ban_tcp=True, ban_udp=True, challenge_port=41234,
                            log_group=7417, service_memory=3600), 86400),
    "forever_no_peers_no_log": (KernelTrap(((1, 1023),), ((1, 1023),)), 0),
    "tcp_only_delay_slow_rate": (KernelTrap(((1, 1023),), (), 600, (0.5, 1), ban_udp=False,
                                            first_contact_delay=True, log_group=5), 3600),
    "sensor_hold": (KernelTrap(((1, 21), (23, 1023)), ((1, 1023),), 600, (20.0, 40),
                               challenge_port=41234, log_group=7417, sensor=True,
                               contacts=True, hold_queue=7417, hold_rate=5000,
                               hold_seconds=0.02, service_memory=3600, ack_window=60,
                               ack_trigger=5, proto_window=60, proto_trigger=4,
                               transports=("sctp", "udplite", "dccp")), 86400),
    "sets_only": (KernelTrap(((1, 1023),), ((7, 7),), 600, ban_tcp=False, ban_udp=False,
                             challenge_port=40000), 60),
}
FILTERS = {"both_1024": (True, True, 1024, 1024), "tcp_only": (True, False),
           "udp_only_65536": (False, True)}


def set_element_messages() -> list[bytes]:
    elements = SetElements.__new__(SetElements)
    elements.table, elements._sock, elements._seq = b"portsentinel\0", FakeNetlink(), 0
    elements._lock, elements.family = threading.Lock(), 1  # NFPROTO_INET
    elements.add([A("198.51.100.2"), A("2001:db8::2")], 3600)
    elements.add([A("198.51.100.3")])
    elements.add_each([("198.51.100.4", 60.5), ("2001:db8::4", 0)])
    elements.replace([A("198.51.100.5")], 7200)
    elements.add_each([("198.51.100.7", 60, (5, 300))])  # put back with its counter
    elements.delete([A("198.51.100.2"), A("2001:db8::2")])
    elements.refresh_ports("served_tcp", [443, 22], 3600)
    elements.contains("peers4", "198.51.100.6")
    return elements._sock.sent


def conntrack_messages() -> list[bytes]:
    ct = Conntrack.__new__(Conntrack)
    ct._sock, ct._seq, ct._lock = FakeNetlink(), 0, threading.Lock()
    ct.is_reply("udp", A("198.51.100.2"), 53, A("198.51.100.1"), 40000)
    ct.is_forwarded("tcp", A("2001:db8::2"), 50000, A("2001:db8::1"), 8080, 41234)
    return ct._sock.sent


def nflog_messages() -> list[bytes]:
    log = KernelBanLog.__new__(KernelBanLog)
    log.group, log.prefix, log.sock = 7417, b"portsentinel ban", FakeNetlink()
    log._configure(b"\x05\x00\x01\x00\x01\x00\x00\x00")
    return log.sock.sent


def sock_diag_messages() -> list[bytes]:
    fake = FakeNetlink()
    listeners._local.sock = fake
    try:
        listeners.tcp_listening()
        listeners.udp_bound()
    finally:
        listeners._local.sock = None
    return fake.sent


def queue_messages() -> list[bytes]:
    """The hold: its rule as the xtables target, the queue's set-up and a verdict."""
    return [compat_queue_rule("portsentinel", "held", 7417), *nfqueue.bind_messages(7417),
            nfqueue.verdict_message(7417, nfqueue.NF_REPEAT, 12345)]


MESSAGES = {"set_elements": set_element_messages, "conntrack": conntrack_messages,
            "nflog": nflog_messages, "sock_diag": sock_diag_messages,
            "queue": queue_messages}


def outputs() -> dict[str, str]:
    found = {}
    for name, (trap, ban_time) in TRAPS.items():
        found[f"nft_{name}.txt"] = "\n".join(table_commands("portsentinel", 262144, trap,
                                                            ban_time)) + "\n"
    for name, args in FILTERS.items():
        found[f"bpf_{name}.txt"] = "".join(f"{c:#06x} {jt} {jf} {k:#010x}\n"
                                           for c, jt, jf, k in bpf.probe_filter(*args))
    found["bpf_ruleset_watch.txt"] = "".join(f"{c:#06x} {jt} {jf} {k:#010x}\n"
                                             for c, jt, jf, k in nftwatch.event_filter())
    for name, make in MESSAGES.items():
        found[f"netlink_{name}.hex"] = "".join(m.hex() + "\n" for m in make())
    return found


@pytest.mark.parametrize("name", sorted(outputs()))
def test_output_matches_its_golden_file(name):
    text = outputs()[name]
    if os.environ.get("PORTSENTINEL_UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


def test_every_golden_file_is_still_made():
    assert {p.name for p in GOLDEN.iterdir()} == set(outputs())


# -- what the bytes mean --------------------------------------------------------
def test_a_ban_batch_decodes_to_one_transaction_of_the_right_elements():
    data, first, last = batch(b"t\0", [(NFT_MSG_NEWSETELEM, {"ban4": [(A("198.51.100.2"),
                                                                       5000)]}, None),
                                       (NFT_MSG_DELSETELEM, {"ban6": [A("2001:db8::2")]}, None)],
                              seq=7)
    found = list(netlink.messages(data))
    assert [kind for kind, _, _ in found] == [0x10, (10 << 8) | 12, (10 << 8) | 14, 0x11]
    assert [seq for _, seq, _ in found] == [7, 8, 9, 10] and (first, last) == (8, 9)
    _, _, at = found[1]
    listed = netlink.attributes(data, at + netlink.NFGEN.size, netlink.message_end(data, at))
    assert listed[SET_ELEM_LIST_SET] == b"ban4\0"
    element = netlink.attributes(listed[SET_ELEM_LIST_ELEMENTS], 4, 1 << 16)
    key = netlink.attributes(element[SET_ELEM_KEY], 0, 64)[1]
    assert key == A("198.51.100.2").packed
    assert struct.unpack("!Q", element[SET_ELEM_TIMEOUT])[0] == 5000


def run_bpf(program, packet: bytes, pkttype: int = 0, ethertype: int = 0x0800) -> int:
    """A classic BPF interpreter for the opcodes bpf.py uses: the bytes kept."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (bpf.LD_W_ABS, bpf.LD_H_ABS, bpf.LD_B_ABS):
            if k >= 0x80000000:  # an ancillary load (SKF_AD_OFF + ...)
                a = {bpf.SKF_AD_PKTTYPE: pkttype,
                     bpf.SKF_AD_PROTOCOL: ethertype}[k - (bpf.SKF_AD_OFF & 0xFFFFFFFF)]
                continue
            size = {bpf.LD_W_ABS: 4, bpf.LD_H_ABS: 2, bpf.LD_B_ABS: 1}[code]
            if k + size > len(packet):
                return 0
            a = int.from_bytes(packet[k:k + size], "big")
        elif code in (bpf.LD_H_IND, bpf.LD_B_IND):
            size = 2 if code == bpf.LD_H_IND else 1
            if x + k + size > len(packet):
                return 0
            a = int.from_bytes(packet[x + k:x + k + size], "big")
        elif code == bpf.LDX_MSH:
            x = (packet[k] & 0x0F) * 4
        elif code in (bpf.JEQ, bpf.JGE, bpf.JSET):
            taken = a == k if code == bpf.JEQ else a >= k if code == bpf.JGE else a & k
            pc += jt if taken else jf
        elif code == bpf.RET_K:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")


def ipv4(protocol: int, dport: int, flags: int = 0x02, fragment: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, fragment, 64, protocol, 0,
                         A("198.51.100.2").packed, A("198.51.100.1").packed)
    if protocol == 6:
        return header + struct.pack("!HHIIBBHHH", 40000, dport, 0, 0, 0x50, flags, 1024, 0, 0)
    return header + struct.pack("!HHHH", 40000, dport, 8, 0)


def ipv6(next_header: int, dport: int, flags: int = 0x02) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, 20, next_header, 64,
                         A("2001:db8::2").packed, A("2001:db8::1").packed)
    return header + struct.pack("!HHIIBBHHH", 40000, dport, 0, 0, 0x50, flags, 1024, 0, 0)


def test_the_probe_filter_keeps_probes_and_drops_the_rest():
    program = bpf.probe_filter(True, True, 1024, 1024)
    assert run_bpf(program, ipv4(6, 22)) == bpf.SNAPLEN  # a SYN to a low port
    assert run_bpf(program, ipv4(6, 22, flags=0x01)) == bpf.SNAPLEN  # FIN
    assert run_bpf(program, ipv4(17, 53)) == bpf.SNAPLEN
    assert run_bpf(program, ipv4(6, 22, flags=0x12)) == 0  # SYN-ACK: an answer
    assert run_bpf(program, ipv4(6, 22, flags=0x04)) == 0  # RST
    assert run_bpf(program, ipv4(6, 2000)) == 0  # at or above the limit
    assert run_bpf(program, ipv4(17, 1024)) == 0
    assert run_bpf(program, ipv4(6, 22), pkttype=3) == 0  # not for this host
    assert run_bpf(program, ipv4(6, 22, fragment=0x0005)) == 0  # a later fragment
    assert run_bpf(program, ipv4(6, 22, fragment=0x2000)) == bpf.SNAPLEN  # first of many
    assert run_bpf(program, ipv6(6, 22), ethertype=0x86DD) == bpf.SNAPLEN
    assert run_bpf(program, ipv6(6, 22, flags=0x10), ethertype=0x86DD) == 0  # ACK
    assert run_bpf(program, ipv6(0, 22), ethertype=0x86DD) == bpf.SNAPLEN_EXTENDED
    assert run_bpf(program, ipv6(58, 22), ethertype=0x86DD) == 0  # ICMPv6
    assert run_bpf(program, ipv4(6, 22), ethertype=0x0806) == 0  # ARP
    assert run_bpf(bpf.probe_filter(False, True), ipv4(6, 22)) == 0  # no TCP trap
    assert run_bpf(bpf.probe_filter(True, False), ipv4(17, 53)) == 0


def test_the_ruleset_watch_filter_drops_our_own_additions_only():
    from portsentinel import nftwatch

    program = nftwatch.event_filter()

    def datagram(kind: int) -> bytes:
        return netlink.nfnl_message(10, kind, 0, 0, 1, b"\0" * 8)

    assert run_bpf(program, datagram(nftwatch.NFT_MSG_NEWSETELEM)) == 0  # a ban
    assert run_bpf(program, datagram(nftwatch.NFT_MSG_NEWGEN)) == 0
    for kind in nftwatch.CHANGES:  # deletions, rules: every one reaches the daemon
        assert run_bpf(program, datagram(kind)) > 0, kind
    # a datagram is judged by its first message only
    both = datagram(nftwatch.NFT_MSG_DELTABLE) + datagram(nftwatch.NFT_MSG_NEWSETELEM)
    assert run_bpf(program, both) > 0


def test_the_transports_the_kernel_has_are_read_not_asked(tmp_path: Path):
    """Issue 19: which of SCTP, UDP-Lite and DCCP are loaded comes from
    /proc/net/protocols: a socket or a sock_diag request for SCTP would load
    the module on an admin's host."""
    from portsentinel.listeners import loaded_transports
    table = tmp_path / "protocols"
    table.write_text("protocol  size sockets  memory press maxhdr  slab module     cl co di\n"
                     "UDPLITEv6 1472      0       0   NI       0   yes  kernel      y y y\n"
                     "UDP-Lite  1280      0       0   NI       0   yes  kernel      y y y\n"
                     "SCTPv6    1616      0       0   no     320   yes  sctp        y y y\n"
                     "TCP       2432      3       2   no     320   yes  kernel      y y y\n")
    assert loaded_transports(str(table)) == {"udplite"}
    table.write_text(table.read_text() + "SCTP      1424      0       0   no     320   yes  sctp"
                                         "        y y y\nDCCP      1472      0  -1   NI 0 yes  "
                                         "dccp y y y\n")
    assert loaded_transports(str(table)) == {"udplite", "sctp", "dccp"}
    assert loaded_transports(str(tmp_path / "none")) == set()
