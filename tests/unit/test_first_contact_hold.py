"""The first-contact hold without root: the queue's messages, and the hold
thread's bookkeeping (one verdict per release, sources cleared first, fail
open when the kernel refuses, skipped ids counted)."""

import ipaddress
import socket
import struct
from collections import deque

import pytest

from portsentinel import config, nfqueue
from portsentinel.config import ConfigError, parse
from portsentinel.daemon.assembly import holds
from portsentinel.daemon.hold import LATE, Hold
from portsentinel.metrics import Metrics
from portsentinel.netlink import attr, nfnl_message
from portsentinel.ruleset import KernelTrap, table_commands

V4 = ipaddress.ip_address("198.51.100.7").packed
V6 = ipaddress.ip_address("2001:db8::7").packed


def queued(packet_id: int, payload: bytes) -> bytes:
    body = attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 1)) \
        + attr(nfqueue.NFQA_PAYLOAD, payload)
    return nfnl_message(nfqueue.NFNL_SUBSYS_QUEUE, nfqueue.NFQNL_MSG_PACKET, 0, 0,
                        socket.AF_INET, body, 7417)


def ipv4_header(source: bytes) -> bytes:
    return bytes([0x45]) + b"\0" * 11 + source + bytes([198, 51, 100, 1]) + b"\0" * 20


def ipv6_header(source: bytes) -> bytes:
    return bytes([0x60]) + b"\0" * 7 + source + b"\0" * 16


def test_packets_give_id_and_source_for_both_families():
    data = queued(1, ipv4_header(V4)) + queued(2, ipv6_header(V6)) + queued(3, b"\x00")
    assert list(nfqueue.packets(data)) == [(1, V4), (2, V6), (3, None)]


def test_verdict_is_a_batch_up_to_an_id_on_its_queue():
    message = nfqueue.verdict_message(7417, nfqueue.NF_REPEAT, 99)
    kind, = struct.unpack_from("=H", message, 4)
    assert kind == (nfqueue.NFNL_SUBSYS_QUEUE << 8) | nfqueue.NFQNL_MSG_VERDICT_BATCH
    assert struct.unpack_from("!H", message, 18)[0] == 7417  # nfgenmsg resource id
    assert message.endswith(struct.pack("!II", nfqueue.NF_REPEAT, 99))


def test_the_queue_is_set_to_fail_open():
    params = nfqueue.bind_messages(7417)[1]
    flag = struct.pack("!I", nfqueue.NFQA_CFG_F_FAIL_OPEN)
    assert attr(nfqueue.NFQA_CFG_FLAGS, flag) in params
    assert attr(nfqueue.NFQA_CFG_MASK, flag) in params


class FakeQueue:
    number = 7417

    def __init__(self):
        self.verdicts, self.waiting = [], []

    def receive(self):
        found, self.waiting = self.waiting, []
        return found

    def verdict(self, verdict, last_id):
        self.verdicts.append((verdict, last_id))


class FakeElements:
    def __init__(self, fail=False):
        self.added, self.fail = [], fail

    def add_keys(self, by_set, timeout):
        if self.fail:
            raise OSError(2, "No such file or directory")
        self.added.append((by_set, timeout))


class Lines:
    def __init__(self):
        self.lines = []

    def __call__(self, text, level=None):
        self.lines.append(text)

    error = __call__


def hold(elements=None) -> Hold:
    h = Hold.__new__(Hold)
    h.seconds, h.clear_seconds, h.metrics, h.log = 0.02, 600, Metrics(), Lines()
    h.queue, h.elements = FakeQueue(), elements or FakeElements()
    h.pending, h.last_id, h.unheld, h._clear_failed = deque(), 0, 0, False
    return h


def test_each_packet_waits_its_own_time_and_one_verdict_releases_them():
    h = hold()
    h.queue.waiting = [(1, V4), (2, V6)]
    h._take(10.0)
    h.queue.waiting = [(3, V4)]
    h._take(10.015)
    h._release(10.019)
    assert h.queue.verdicts == []  # nothing is due before its 20 ms
    h._release(10.021)
    assert h.queue.verdicts == [(nfqueue.NF_REPEAT, 2)]  # 1 and 2, not 3
    assert h.elements.added == [({"clear4": [V4], "clear6": [V6]}, 600)]
    h._release(10.036)
    assert h.queue.verdicts[-1] == (nfqueue.NF_REPEAT, 3)
    assert h.metrics.held._only.value == 3 and h.metrics.held_late._only.value == 0


def test_sources_are_cleared_before_the_repeat_and_without_them_it_fails_open():
    h = hold(FakeElements(fail=True))
    h.queue.waiting = [(1, V4)]
    h._take(0.0)
    h._release(1.0)
    # a repeat would meet the hold chain again; "accept" lets the SYN through
    assert h.queue.verdicts == [(nfqueue.NF_ACCEPT, 1)]
    assert any("not cleared" in line for line in h.log.lines)
    assert h.metrics.held_late._only.value == 1  # 1 s past its time: > LATE
    assert LATE < 1.0


def test_ids_the_kernel_skipped_are_counted_as_passed_unheld():
    h = hold()
    h.queue.waiting = [(5, V4), (9, V4)]  # 6, 7 and 8 passed without reaching us
    h._take(0.0)
    h.queue.waiting = [(10, V4)]
    h._take(0.0)
    assert h.metrics.hold_passed._only.value == 3
    h._report()
    assert any("3 SYNs passed unheld" in line for line in h.log.lines)


def test_stopping_releases_everything_held_at_once():
    h = hold()
    h.queue.waiting = [(1, V4), (2, V4)]
    h._take(100.0)
    h._release(100.0, everything=True)
    assert h.queue.verdicts == [(nfqueue.NF_REPEAT, 2)]
    assert h.elements.added == [({"clear4": [V4]}, 600)]  # one element for one source


def test_hold_rules_only_where_the_kernel_bans_tcp():
    trap = KernelTrap(((1, 1023),), (), 600, log_group=7417, sensor=True, hold_queue=7417,
                      hold_rate=5000)
    rules = "\n".join(table_commands("t", 1024, trap, 60))
    assert "input tcp flags & (syn | ack | rst | fin) == syn jump hold" in rules
    # banned while held: dropped at the repeat, before anything else
    hold_rules = [r for r in rules.splitlines() if r.startswith("add rule inet t hold ")]
    assert hold_rules[0] == "add rule inet t hold ip saddr @ban4 drop"
    assert "add rule inet t hold meta l4proto != @alive return" in hold_rules
    no_ban = KernelTrap(((1, 1023),), (), 600, ban_tcp=False, hold_queue=7417)
    assert "jump hold" not in "\n".join(table_commands("t", 1024, no_ban, 60))


def test_the_kernel_lets_a_source_pass_once_its_first_syn_is_overdue():
    """No heartbeat: while a source's hold lasts (plus HOLD_GRACE) its SYNs
    are queued; after that, unreleased (the daemon stalled), they pass and
    the source is noted in `lapsed`. The window follows FIRST_CONTACT_HOLD."""
    trap = KernelTrap(((1, 1023),), (), 600, log_group=7417, sensor=True, hold_queue=7417,
                      hold_seconds=1.0)
    commands = table_commands("t", 1024, trap, 60)
    assert "add element inet t alive { 6 }" in commands  # installed with the hold on
    stranger = [r for r in commands if r.startswith("add rule inet t stranger ")]
    assert stranger == [
        "add rule inet t stranger ip saddr @holding4 goto held",
        "add rule inet t stranger ip6 saddr @holding6 goto held",
        "add rule inet t stranger ip saddr @lapse4 add @lapsed4 { ip saddr timeout 1h }",
        "add rule inet t stranger ip saddr @lapse4 return",
        "add rule inet t stranger ip6 saddr @lapse6 add @lapsed6 { ip6 saddr timeout 1h }",
        "add rule inet t stranger ip6 saddr @lapse6 return",
        "add rule inet t stranger meta nfproto ipv4 add @holding4 { ip saddr timeout 1500ms }"
        " add @lapse4 { ip saddr timeout 10s } goto held",
        "add rule inet t stranger meta nfproto ipv6 add @holding6 { ip6 saddr timeout 1500ms }"
        " add @lapse6 { ip6 saddr timeout 10s } goto held"]
    assert "add rule inet t hold socket transparent 0 goto stranger" in commands
    assert not any("alive" in c for c in table_commands(
        "t", 1024, KernelTrap(((1, 1023),), (), 600, log_group=7417, sensor=True), 60)
        if not c.startswith("add set"))  # no hold, no switch


def test_first_contact_hold_config():
    assert config.Config().first_contact_hold == 0.02  # on by default
    assert parse('FIRST_CONTACT_HOLD="50ms"\n').first_contact_hold == pytest.approx(0.05)
    assert parse('FIRST_CONTACT_HOLD="0"\n').first_contact_hold == 0
    with pytest.raises(ConfigError, match="longer than 1 s"):
        parse('FIRST_CONTACT_HOLD="2s"\n')
    with pytest.raises(ConfigError):
        parse('FIRST_CONTACT_HOLD="soon"\n')
    assert config.duration_text(0.02) == "20ms"


def test_delay_replaces_the_hold_and_the_hold_needs_the_kernel_trap():
    assert holds(config.Config(), ("tcp",))
    assert not holds(config.Config(), ("udp",))
    assert not holds(parse('FIRST_CONTACT_DELAY="1"\n'), ("tcp",))
    assert not holds(parse('FIRST_CONTACT_HOLD="0"\n'), ("tcp",))


def test_check_config_says_whether_first_contacts_are_held():
    from portsentinel.daemon.assembly import changes_from_12

    def line(text):
        return next(l for l in changes_from_12(parse(text), "atcp", "audp")
                    if l.startswith("first contact"))
    assert "waits 20ms" in line("")
    assert "not held (FIRST_CONTACT_HOLD=0)" in line('FIRST_CONTACT_HOLD="0"\n')
    assert "dropped once" in line('FIRST_CONTACT_DELAY="1"\n')
    assert "needs the kernel trap" in line('KERNEL_TRAP="0"\n')
