import ipaddress

import pytest

from portsentinel.addrset import AddressSet
from portsentinel.engine import (ACK, FIN, HOSTS_DENY, KILL_ROUTE, NFTABLES, PSH, RST,
                                 RUN_CMD, SYN, TCP, UDP, URG, Engine, Kind, Policy, Probe,
                                 Verdict, classify_tcp)

A = ipaddress.ip_address


def probe(src="198.51.100.2", port=1, proto=TCP, t=0.0, kind=Kind.SYN):
    return Probe(A(src), port, proto, kind, t)


def test_first_probe_blocks_with_trigger_0_and_1():
    for trigger in (0, 1):
        engine = Engine(Policy(scan_trigger=trigger))
        decision = engine.observe(probe())
        assert decision.verdict is Verdict.BLOCK
        assert decision.actions == (NFTABLES,)


def test_trigger_counts_distinct_ports_not_packets():
    engine = Engine(Policy(scan_trigger=3))
    assert engine.observe(probe(port=1)).verdict is Verdict.PENDING
    for _ in range(10):  # repeats to one port never add up
        assert engine.observe(probe(port=1)).verdict is Verdict.PENDING
    assert engine.observe(probe(port=2)).verdict is Verdict.PENDING
    assert engine.observe(probe(port=3)).verdict is Verdict.BLOCK


def test_trigger_forgets_ports_outside_the_window():
    engine = Engine(Policy(scan_trigger=2, scan_window=10))
    assert engine.observe(probe(port=1, t=0)).verdict is Verdict.PENDING
    assert engine.observe(probe(port=2, t=10.5)).verdict is Verdict.PENDING  # port 1 aged out
    assert engine.observe(probe(port=3, t=11)).verdict is Verdict.BLOCK


def test_tcp_and_udp_ports_are_distinct():
    engine = Engine(Policy(scan_trigger=2))
    assert engine.observe(probe(port=7, proto=TCP)).verdict is Verdict.PENDING
    assert engine.observe(probe(port=7, proto=UDP, kind=Kind.UDP)).verdict is Verdict.BLOCK


def test_hosts_counted_separately():
    engine = Engine(Policy(scan_trigger=2))
    assert engine.observe(probe(src="198.51.100.2", port=1)).verdict is Verdict.PENDING
    assert engine.observe(probe(src="198.51.100.3", port=2)).verdict is Verdict.PENDING


def test_never_block_set_wins():
    engine = Engine(Policy(never_block=AddressSet(["198.51.100.0/24", "2001:db8::/64"])))
    assert engine.observe(probe()).verdict is Verdict.IGNORED
    assert engine.observe(probe(src="2001:db8::2")).verdict is Verdict.IGNORED
    assert engine.observe(probe(src="2001:db9::2")).verdict is Verdict.BLOCK


def test_already_blocked_is_exact_address_not_substring():
    engine = Engine(Policy())
    engine.observe(probe(src="11.2.3.4"))
    assert engine.is_blocked(A("11.2.3.4"))
    assert not engine.is_blocked(A("1.2.3.4"))
    assert engine.observe(probe(src="1.2.3.4")).verdict is Verdict.BLOCK


def test_repeats_from_a_blocked_host_are_reported_once_per_interval():
    engine = Engine(Policy(repeat_report_interval=60))
    engine.observe(probe(t=0))
    first = engine.observe(probe(port=2, t=1))
    assert first.verdict is Verdict.ALREADY_BLOCKED and first.report is False
    later = engine.observe(probe(port=3, t=61))
    assert later.verdict is Verdict.ALREADY_BLOCKED and later.report is True
    assert engine.observe(probe(port=4, t=62)).report is False


def test_ipv4_mapped_ipv6_is_the_same_host():
    engine = Engine(Policy())
    engine.observe(probe(src="198.51.100.2"))
    assert engine.observe(probe(src="::ffff:198.51.100.2")).verdict is Verdict.ALREADY_BLOCKED


@pytest.mark.parametrize("level, expected", [
    (0, Verdict.ALERT), (1, Verdict.BLOCK), (2, Verdict.BLOCK)])
def test_block_levels(level, expected):
    engine = Engine(Policy(block_tcp=level, run_cmd=True))
    decision = engine.observe(probe())
    assert decision.verdict is expected
    if level == 2:
        assert decision.actions == (RUN_CMD,)


def test_block_0_does_not_record_the_host_as_blocked():
    engine = Engine(Policy(block_tcp=0))
    assert engine.observe(probe()).verdict is Verdict.ALERT
    assert not engine.is_blocked(A("198.51.100.2"))
    assert engine.observe(probe(port=2)).verdict is Verdict.ALERT


def test_block_udp_is_separate_from_block_tcp():
    engine = Engine(Policy(block_tcp=1, block_udp=0))
    assert engine.observe(probe(proto=UDP, kind=Kind.UDP)).verdict is Verdict.ALERT
    assert engine.observe(probe(proto=TCP)).verdict is Verdict.BLOCK


def test_block_2_without_run_cmd_only_alerts():
    engine = Engine(Policy(block_tcp=2, run_cmd=False))
    assert engine.observe(probe()).verdict is Verdict.ALERT


def test_action_order_follows_portsentry():
    policy = Policy(nftables=False, hosts_deny=True, kill_route=True, run_cmd=True)
    assert policy.actions_for(TCP) == (HOSTS_DENY, KILL_ROUTE, RUN_CMD)
    first = Policy(nftables=False, hosts_deny=True, kill_route=True, run_cmd=True,
                   run_cmd_first=True)
    assert first.actions_for(TCP) == (RUN_CMD, HOSTS_DENY, KILL_ROUTE)
    assert Policy(nftables=True, kill_route=False).actions_for(UDP) == (NFTABLES,)


def test_forget_lets_a_failed_block_retry():
    engine = Engine(Policy())
    engine.observe(probe())
    assert engine.forget(A("198.51.100.2"))
    assert engine.observe(probe(port=2)).verdict is Verdict.BLOCK


def test_bans_expire_after_ban_time():
    engine = Engine(Policy(ban_time=100))
    engine.observe(probe(t=0))
    assert engine.expired(99) == []
    assert engine.expired(100) == [A("198.51.100.2")]
    assert not engine.is_blocked(A("198.51.100.2"))


def test_expired_ban_is_blocked_again_on_next_probe():
    engine = Engine(Policy(ban_time=10))
    engine.observe(probe(t=0))
    assert engine.observe(probe(t=11)).verdict is Verdict.BLOCK


def test_ban_time_0_is_forever():
    engine = Engine(Policy(ban_time=0))
    engine.observe(probe(t=0))
    assert engine.expired(10**9) == []


def test_pending_hosts_are_bounded_oldest_evicted():
    engine = Engine(Policy(scan_trigger=2, host_capacity=100))
    for i in range(10_000):
        engine.observe(probe(src=str(ipaddress.IPv4Address(0x0A000000 + i)), port=1))
    assert engine.pending_hosts == 100
    # the oldest were evicted: their first port no longer counts
    assert engine.observe(probe(src="10.0.0.0", port=2)).verdict is Verdict.PENDING
    # the newest are remembered
    assert engine.observe(probe(src=str(ipaddress.IPv4Address(0x0A000000 + 9999)),
                                port=2)).verdict is Verdict.BLOCK


def test_bans_are_bounded():
    engine = Engine(Policy(ban_capacity=50))
    for i in range(500):
        engine.observe(probe(src=str(ipaddress.IPv4Address(0x0A000000 + i))))
    assert len(engine.bans()) == 50


@pytest.mark.parametrize("flags, kind", [
    (SYN, Kind.SYN), (FIN, Kind.FIN), (0, Kind.NULL), (FIN | URG | PSH, Kind.XMAS),
    (SYN | FIN, Kind.OTHER), (FIN | PSH, Kind.OTHER), (SYN | 0x40 | 0x80, Kind.SYN)])
def test_classify_tcp(flags, kind):
    assert classify_tcp(flags) is kind


def test_ack_and_rst_are_not_classified_as_stealth_kinds():
    assert classify_tcp(SYN | ACK) is Kind.OTHER
    assert classify_tcp(RST) is Kind.OTHER


def test_repeat_offenders_are_banned_longer_up_to_a_cap():
    engine = Engine(Policy(ban_time=100, ban_time_increment=2, ban_time_max=500))
    lengths = []
    for t in range(5):
        decision = engine.observe(probe(t=t * 1000))
        lengths.append(decision.ban_seconds)
        engine.forget(A("198.51.100.2"))
    assert lengths == [100, 200, 400, 500, 500]


def test_escalation_remembers_restored_offences():
    engine = Engine(Policy(ban_time=100, ban_time_increment=3))
    engine.restore_offences({A("198.51.100.2"): 2})
    assert engine.observe(probe()).ban_seconds == 900


def test_forever_bans_do_not_escalate_into_numbers():
    engine = Engine(Policy(ban_time=0, ban_time_increment=2))
    assert engine.observe(probe()).ban_seconds == 0
    assert engine.expired(10**12) == []


def test_manual_ban_with_explicit_length():
    engine = Engine(Policy(ban_time=100))
    assert engine.ban(A("2001:db8::9"), now=10, seconds=5) == 5
    assert engine.expired(16) == [A("2001:db8::9")]


def test_check_then_count_equals_observe():
    engine = Engine(Policy(scan_trigger=2))
    assert engine.check(probe(port=1)) is None
    assert engine.count(probe(port=1)).verdict is Verdict.PENDING
    assert engine.check(probe(port=2)) is None
    assert engine.count(probe(port=2)).verdict is Verdict.BLOCK
    assert engine.check(probe(port=3)).verdict is Verdict.ALREADY_BLOCKED


def peer_probe(kind=Kind.SYN, proto=TCP, port=1, t=0.0, src="198.51.100.3"):
    return Probe(A(src), port, proto, kind, t, peer=True)


@pytest.mark.parametrize("kind, proto", [(Kind.SYN, TCP), (Kind.FIN, TCP), (Kind.NULL, TCP),
                                         (Kind.XMAS, TCP), (Kind.OTHER, TCP), (Kind.UDP, UDP)])
def test_stateless_probes_from_a_peer_are_decoys(kind, proto):
    engine = Engine(Policy())
    decision = engine.observe(peer_probe(kind, proto))
    assert decision.verdict is Verdict.DECOY and decision.report
    assert not engine.is_blocked(A("198.51.100.3"))
    assert engine.observe(peer_probe(kind, proto, port=2, t=1)).report is False  # throttled


def test_a_completed_handshake_to_a_trap_is_bannable_even_from_a_peer():
    engine = Engine(Policy())
    assert engine.observe(peer_probe(Kind.CONNECT)).verdict is Verdict.BLOCK


def test_decoy_grace_can_be_turned_off():
    engine = Engine(Policy(decoy_grace=False))
    assert engine.observe(peer_probe()).verdict is Verdict.BLOCK


def test_ban_rate_limit_keeps_detecting_but_stops_banning():
    engine = Engine(Policy(ban_rate=10, ban_burst=5))
    verdicts = [engine.observe(probe(src=f"10.0.0.{i}", t=0.001 * i)).verdict for i in range(50)]
    assert verdicts.count(Verdict.BLOCK) == 5  # the burst, within 50 ms
    assert set(verdicts[5:]) == {Verdict.RATE_LIMITED}
    # the bucket refills: one second later ten more
    later = [engine.observe(probe(src=f"10.0.1.{i}", t=1.05 + 0.001 * i)).verdict for i in range(20)]
    assert later.count(Verdict.BLOCK) == 5  # capped at the burst again


def test_rate_limited_reports_are_throttled():
    engine = Engine(Policy(ban_rate=1, ban_burst=1))
    engine.observe(probe(src="10.0.0.1", t=0))
    reports = [engine.observe(probe(src=f"10.0.0.{i}", t=0.01 * i)).report for i in range(2, 50)]
    assert reports.count(True) == 1


def test_probes_slightly_out_of_order_do_not_mint_tokens():
    """Two sensors' kernel timestamps interleave within a second; a larger
    step back is the clock itself (see test_kernel_bans)."""
    engine = Engine(Policy(ban_rate=1, ban_burst=1))
    assert engine.observe(probe(src="10.0.0.1", t=100)).verdict is Verdict.BLOCK
    assert engine.observe(probe(src="10.0.0.2", t=99.2)).verdict is Verdict.RATE_LIMITED
    assert engine.observe(probe(src="10.0.0.3", t=100.5)).verdict is Verdict.RATE_LIMITED
    assert engine.observe(probe(src="10.0.0.4", t=101.1)).verdict is Verdict.BLOCK


def test_a_flood_of_spoofed_sources_keeps_memory_bounded():
    engine = Engine(Policy(scan_trigger=3, host_capacity=1000, ban_rate=5, ban_burst=5))
    for i in range(200_000):
        engine.observe(probe(src=str(ipaddress.IPv6Address((0x20010DB8 << 96) + i)), t=i * 1e-5))
    assert engine.pending_hosts == 1000 and len(engine.bans()) == 0
    # a real scanner is still seen: three ports, then a decision
    for port in (1, 2, 3):
        last = engine.observe(probe(src="198.51.100.2", port=port, t=5.0))
    assert last.verdict is Verdict.BLOCK


def test_sequential_test_bans_a_scan_that_avoids_the_traps():
    from portsentinel.trw import SequentialDetector

    engine = Engine(Policy(), SequentialDetector(key=b"k" * 16))
    probes = [Probe(A("198.51.100.2"), port, TCP, Kind.SYN, port, trap=False)
              for port in (2001, 2002, 2003, 2004)]
    trials = [engine.trial(p, served=False) for p in probes]
    assert trials == [None, None, None, 4]
    decision = engine.decide(probes[3], slow_scan=4)
    assert decision.verdict is Verdict.BLOCK and decision.slow_scan == 4
    assert engine.is_blocked(A("198.51.100.2"))


def test_sequential_test_respects_decoy_grace_and_udp_is_not_a_trial():
    from portsentinel.trw import SequentialDetector

    engine = Engine(Policy(), SequentialDetector(key=b"k" * 16))
    peer = Probe(A("198.51.100.3"), 2004, TCP, Kind.SYN, 0, peer=True)
    assert engine.decide(peer, slow_scan=4).verdict is Verdict.DECOY
    assert engine.trial(Probe(A("198.51.100.4"), 53, UDP, Kind.UDP, 0), False) is None
