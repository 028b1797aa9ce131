import ipaddress

import pytest

from portsentinel.addrset import AddressSet
from portsentinel.engine import (ACK, FIN, HOSTS_DENY, KILL_ROUTE, NFTABLES, PSH, RST,
                                 RUN_CMD, SYN, TCP, UDP, URG, Engine, Facts, Kind, Policy, Probe,
                                 Verdict, classify_tcp)
from portsentinel.trw import TrwParameters

A = ipaddress.ip_address


def probe(src="198.51.100.2", port=1, proto=TCP, t=0.0, kind=Kind.SYN):
    return Probe(A(src), port, proto, kind, t)


def test_first_probe_blocks_with_trigger_0_and_1():
    for trigger in (0, 1):
        engine = Engine(Policy(scan_trigger=trigger))
        decision = engine.handle(probe())
        assert decision.verdict is Verdict.BLOCK
        assert decision.actions == (NFTABLES,)


def test_trigger_counts_distinct_ports_not_packets():
    engine = Engine(Policy(scan_trigger=3))
    assert engine.handle(probe(port=1)).verdict is Verdict.PENDING
    for _ in range(10):  # repeats to one port never add up
        assert engine.handle(probe(port=1)).verdict is Verdict.PENDING
    assert engine.handle(probe(port=2)).verdict is Verdict.PENDING
    assert engine.handle(probe(port=3)).verdict is Verdict.BLOCK


def test_trigger_forgets_ports_outside_the_window():
    engine = Engine(Policy(scan_trigger=2, scan_window=10))
    assert engine.handle(probe(port=1, t=0)).verdict is Verdict.PENDING
    assert engine.handle(probe(port=2, t=10.5)).verdict is Verdict.PENDING  # port 1 aged out
    assert engine.handle(probe(port=3, t=11)).verdict is Verdict.BLOCK


def test_tcp_and_udp_ports_are_distinct():
    engine = Engine(Policy(scan_trigger=2))
    assert engine.handle(probe(port=7, proto=TCP)).verdict is Verdict.PENDING
    assert engine.handle(probe(port=7, proto=UDP, kind=Kind.UDP)).verdict is Verdict.BLOCK


def test_hosts_counted_separately():
    engine = Engine(Policy(scan_trigger=2))
    assert engine.handle(probe(src="198.51.100.2", port=1)).verdict is Verdict.PENDING
    assert engine.handle(probe(src="198.51.100.3", port=2)).verdict is Verdict.PENDING


def test_never_block_set_wins():
    engine = Engine(Policy(never_block=AddressSet(["198.51.100.0/24", "2001:db8::/64"])))
    assert engine.handle(probe()).verdict is Verdict.IGNORED
    assert engine.handle(probe(src="2001:db8::2")).verdict is Verdict.IGNORED
    assert engine.handle(probe(src="2001:db9::2")).verdict is Verdict.BLOCK


def test_already_blocked_is_exact_address_not_substring():
    engine = Engine(Policy())
    engine.handle(probe(src="11.2.3.4"))
    assert engine.is_blocked(A("11.2.3.4"))
    assert not engine.is_blocked(A("1.2.3.4"))
    assert engine.handle(probe(src="1.2.3.4")).verdict is Verdict.BLOCK


def test_repeats_from_a_blocked_host_are_reported_once_per_interval():
    engine = Engine(Policy(repeat_report_interval=60))
    engine.handle(probe(t=0))
    first = engine.handle(probe(port=2, t=1))
    assert first.verdict is Verdict.ALREADY_BLOCKED and first.report is False
    later = engine.handle(probe(port=3, t=61))
    assert later.verdict is Verdict.ALREADY_BLOCKED and later.report is True
    assert engine.handle(probe(port=4, t=62)).report is False


def test_ipv4_mapped_ipv6_is_the_same_host():
    engine = Engine(Policy())
    engine.handle(probe(src="198.51.100.2"))
    assert engine.handle(probe(src="::ffff:198.51.100.2")).verdict is Verdict.ALREADY_BLOCKED


@pytest.mark.parametrize("level, expected", [
    (0, Verdict.ALERT), (1, Verdict.BLOCK), (2, Verdict.BLOCK)])
def test_block_levels(level, expected):
    engine = Engine(Policy(block_tcp=level, run_cmd=True))
    decision = engine.handle(probe())
    assert decision.verdict is expected
    if level == 2:
        assert decision.actions == (RUN_CMD,)


def test_block_0_does_not_record_the_host_as_blocked():
    engine = Engine(Policy(block_tcp=0))
    assert engine.handle(probe()).verdict is Verdict.ALERT
    assert not engine.is_blocked(A("198.51.100.2"))
    assert engine.handle(probe(port=2)).verdict is Verdict.ALERT


def test_block_udp_is_separate_from_block_tcp():
    engine = Engine(Policy(block_tcp=1, block_udp=0))
    assert engine.handle(probe(proto=UDP, kind=Kind.UDP)).verdict is Verdict.ALERT
    assert engine.handle(probe(proto=TCP)).verdict is Verdict.BLOCK


def test_block_2_without_run_cmd_only_alerts():
    engine = Engine(Policy(block_tcp=2, run_cmd=False))
    assert engine.handle(probe()).verdict is Verdict.ALERT


def test_action_order_follows_portsentry():
    policy = Policy(nftables=False, hosts_deny=True, kill_route=True, run_cmd=True)
    assert policy.actions_for(TCP) == (HOSTS_DENY, KILL_ROUTE, RUN_CMD)
    first = Policy(nftables=False, hosts_deny=True, kill_route=True, run_cmd=True,
                   run_cmd_first=True)
    assert first.actions_for(TCP) == (RUN_CMD, HOSTS_DENY, KILL_ROUTE)
    assert Policy(nftables=True, kill_route=False).actions_for(UDP) == (NFTABLES,)


def test_forget_lets_a_failed_block_retry():
    engine = Engine(Policy())
    engine.handle(probe())
    assert engine.lift(A("198.51.100.2"))
    assert engine.handle(probe(port=2)).verdict is Verdict.BLOCK


def test_bans_expire_after_ban_time():
    engine = Engine(Policy(ban_time=100))
    engine.handle(probe(t=0))
    assert engine.expired(99) == []
    assert engine.expired(100) == [A("198.51.100.2")]
    assert not engine.is_blocked(A("198.51.100.2"))


def test_expired_ban_is_blocked_again_on_next_probe():
    engine = Engine(Policy(ban_time=10))
    engine.handle(probe(t=0))
    assert engine.handle(probe(t=11)).verdict is Verdict.BLOCK


def test_ban_time_0_is_forever():
    engine = Engine(Policy(ban_time=0))
    engine.handle(probe(t=0))
    assert engine.expired(10**9) == []


def test_pending_hosts_are_bounded_oldest_evicted():
    engine = Engine(Policy(scan_trigger=2, host_capacity=100))
    for i in range(10_000):
        engine.handle(probe(src=str(ipaddress.IPv4Address(0x0A000000 + i)), port=1))
    assert engine.pending_hosts == 100
    # the oldest were evicted: their first port no longer counts
    assert engine.handle(probe(src="10.0.0.0", port=2)).verdict is Verdict.PENDING
    # the newest are remembered
    assert engine.handle(probe(src=str(ipaddress.IPv4Address(0x0A000000 + 9999)),
                                port=2)).verdict is Verdict.BLOCK


def test_bans_are_bounded():
    engine = Engine(Policy(ban_capacity=50))
    for i in range(500):
        engine.handle(probe(src=str(ipaddress.IPv4Address(0x0A000000 + i))))
    assert len(engine.bans()) == 50


@pytest.mark.parametrize("flags, kind", [
    (SYN, Kind.SYN), (FIN, Kind.FIN), (0, Kind.NULL), (FIN | URG | PSH, Kind.XMAS),
    (SYN | FIN, Kind.OTHER), (FIN | PSH, Kind.OTHER), (SYN | 0x40 | 0x80, Kind.SYN)])
def test_classify_tcp(flags, kind):
    assert classify_tcp(flags) is kind


def test_syn_with_fin_is_never_the_ack_family_even_with_ack():
    """The kernel bans SYN+FIN at once, ACK or not (no stack sends it): its
    line names the flags and its ban is graded on one packet, not as the
    ACK family's repeated evidence (an adversarial try found 'TCP ACK scan',
    'repeated', and BAN_TIME_BY_EVIDENCE's longer ban for one packet)."""
    for flags in (SYN | FIN | ACK, SYN | FIN | ACK | PSH, SYN | FIN | PSH | URG):
        assert classify_tcp(flags) is Kind.OTHER
        decision = Engine(Policy()).handle(probe(port=80, kind=classify_tcp(flags)),
                                           Facts(banned_by_kernel=True))
        assert decision.verdict is Verdict.BLOCK and decision.evidence == "single"


def test_ack_and_rst_are_not_classified_as_stealth_kinds():
    assert classify_tcp(SYN | ACK) is Kind.ACK  # unsolicited: the ACK family, counted apart
    assert classify_tcp(RST) is Kind.OTHER


def test_repeat_offenders_are_banned_longer_up_to_a_cap():
    engine = Engine(Policy(ban_time=100, ban_time_increment=2, ban_time_max=500))
    lengths = []
    for t in range(5):
        decision = engine.handle(probe(t=t * 1000))
        lengths.append(decision.ban_seconds)
        engine.lift(A("198.51.100.2"))
    assert lengths == [100, 200, 400, 500, 500]


def test_escalation_remembers_restored_offences():
    engine = Engine(Policy(ban_time=100, ban_time_increment=3))
    engine.restore_offences({A("198.51.100.2"): 2})
    assert engine.handle(probe()).ban_seconds == 900


def test_forever_bans_do_not_escalate_into_numbers():
    engine = Engine(Policy(ban_time=0, ban_time_increment=2))
    assert engine.handle(probe()).ban_seconds == 0
    assert engine.expired(10**12) == []


def test_manual_ban_with_explicit_length():
    engine = Engine(Policy(ban_time=100))
    order = engine.block(A("2001:db8::9"), now=10, seconds=5)
    assert order.verdict is Verdict.BLOCK and order.ban_seconds == 5 and order.until == 15
    assert order.actions == (NFTABLES,)
    assert engine.expired(16) == [A("2001:db8::9")]


def test_manual_ban_of_a_blocked_host_only_sets_its_time():
    engine = Engine(Policy(ban_time=100))
    engine.handle(probe(t=0))
    order = engine.block(A("198.51.100.2"), now=50, seconds=None)
    assert order.verdict is Verdict.ALREADY_BLOCKED and order.since == 0
    assert order.until == 150 and not order.actions
    assert engine.expired(149) == [] and engine.expired(150) == [A("198.51.100.2")]


@pytest.mark.parametrize("address", ["127.0.0.1", "224.0.0.1", "255.255.255.255", "::",
                                     "ff02::1", "198.51.100.250"])
def test_manual_ban_refuses_what_must_or_cannot_be_blocked(address):
    never = AddressSet(["127.0.0.0/8", "198.51.100.250/32"])
    engine = Engine(Policy(never_block=never))
    order = engine.block(A(address), now=1)
    assert order.verdict is Verdict.REFUSED and order.error
    assert not engine.is_blocked(A(address))


def test_manual_ban_without_a_firewall_action_is_refused_and_not_recorded():
    engine = Engine(Policy(nftables=False, run_cmd=True))  # KILL_RUN_CMD is for scans only
    order = engine.block(A("198.51.100.9"), now=1)
    assert order.verdict is Verdict.REFUSED and "no block action" in order.error
    assert not engine.is_blocked(A("198.51.100.9"))


def test_manual_bans_escalate_and_a_pardon_starts_afresh():
    engine = Engine(Policy(ban_time=10, ban_time_increment=3))
    source = A("198.51.100.7")
    assert engine.block(source, now=0).ban_seconds == 10
    engine.lift(source)
    assert engine.block(source, now=1).ban_seconds == 30
    engine.lift(source, pardon=True)  # an admin's unblock: the next ban is a first one
    assert engine.block(source, now=2).ban_seconds == 10


def test_fleet_bans_skip_the_known_the_over_and_the_never_blocked():
    engine = Engine(Policy(never_block=AddressSet(["198.51.100.250/32"])))
    assert engine.fleet_ban(A("198.51.100.5"), now=10, until=9).verdict is Verdict.IGNORED
    ignored = engine.fleet_ban(A("198.51.100.250"), now=10, until=None)
    assert ignored.verdict is Verdict.IGNORED and ignored.error == "never blocked here"
    first = engine.fleet_ban(A("198.51.100.5"), now=10, until=70)
    assert first.verdict is Verdict.BLOCK and first.ban_seconds == 60 and first.until == 70
    assert engine.fleet_ban(A("198.51.100.5"), now=11, until=70).verdict \
        is Verdict.ALREADY_BLOCKED
    forever = engine.fleet_ban(A("198.51.100.6"), now=10, until=None)
    assert forever.ban_seconds == 0 and forever.until is None


def test_an_escalated_ban_says_it_replaces_the_kernel_trap_timeout():
    engine = Engine(Policy(ban_time=100, ban_time_increment=2))
    first = engine.handle(probe(t=0))
    assert first.ban_seconds == 100 and not first.escalated
    engine.lift(A("198.51.100.2"))
    second = engine.handle(probe(t=1))
    assert second.ban_seconds == 200 and second.escalated


def test_served_ports_are_no_trap():
    engine = Engine(Policy())
    assert engine.handle(probe(), Facts(served=True)).verdict is Verdict.PENDING
    assert not engine.is_blocked(A("198.51.100.2"))


def test_replies_and_port_forward_clients_are_no_probes():
    engine = Engine(Policy())
    reply = engine.handle(probe(), Facts(reply=True))
    assert reply.verdict is Verdict.REPLY and not reply.report
    forwarded = engine.handle(probe(), Facts(forwarded=True))
    assert forwarded.verdict is Verdict.FORWARDED and not forwarded.report
    # a completed handshake is no reply: it is bannable as ever
    assert engine.handle(probe(kind=Kind.CONNECT), Facts(reply=True)).verdict is Verdict.BLOCK


def test_the_kernel_decides_a_strangers_trap_hit_but_not_a_peers():
    engine = Engine(Policy())
    left = engine.handle(probe(), Facts(kernel_decides=True))
    assert left.verdict is Verdict.PENDING and not engine.is_blocked(A("198.51.100.2"))
    peer = engine.handle(probe(src="198.51.100.3"), Facts(kernel_decides=True, peer=True))
    assert peer.verdict is Verdict.DECOY


class AskedFacts:
    """Facts that record which questions the engine asked."""

    def __init__(self, **answers):
        self.answers, self.asked = answers, []

    def __getattr__(self, name):
        self.asked.append(name)
        return self.answers.get(name, False)


def test_the_engine_asks_no_costly_question_it_does_not_need():
    engine = Engine(Policy())
    engine.handle(probe(t=0))  # banned
    facts = AskedFacts()
    assert engine.handle(probe(t=1), facts).verdict is Verdict.ALREADY_BLOCKED
    assert set(facts.asked) <= {"banned_by_kernel"}  # no socket, peer or conntrack lookup
    served = AskedFacts(served=True)
    engine.handle(probe(src="198.51.100.9"), served)
    assert "reply" not in served.asked and "forwarded" not in served.asked
    connect = AskedFacts()
    engine.handle(probe(src="198.51.100.10", kind=Kind.CONNECT), connect)
    assert "peer" not in connect.asked and "reply" not in connect.asked


@pytest.mark.parametrize("kind, proto", [(Kind.SYN, TCP), (Kind.FIN, TCP), (Kind.NULL, TCP),
                                         (Kind.XMAS, TCP), (Kind.OTHER, TCP), (Kind.UDP, UDP)])
def test_stateless_probes_from_a_peer_are_decoys(kind, proto):
    engine = Engine(Policy())
    peer = Facts(peer=True)
    decision = engine.handle(probe("198.51.100.3", kind=kind, proto=proto), peer)
    assert decision.verdict is Verdict.DECOY and decision.report
    assert not engine.is_blocked(A("198.51.100.3"))
    again = engine.handle(probe("198.51.100.3", port=2, t=1, kind=kind, proto=proto), peer)
    assert again.report is False  # throttled


def test_a_completed_handshake_to_a_trap_is_bannable_even_from_a_peer():
    engine = Engine(Policy())
    assert engine.handle(probe(kind=Kind.CONNECT), Facts(peer=True)).verdict is Verdict.BLOCK


def test_decoy_grace_can_be_turned_off():
    engine = Engine(Policy(decoy_grace=False))
    assert engine.handle(probe(), Facts(peer=True)).verdict is Verdict.BLOCK


def test_ban_rate_limit_keeps_detecting_but_stops_banning():
    engine = Engine(Policy(ban_rate=10, ban_burst=5))
    verdicts = [engine.handle(probe(src=f"10.0.0.{i}", t=0.001 * i)).verdict for i in range(50)]
    assert verdicts.count(Verdict.BLOCK) == 5  # the burst, within 50 ms
    assert set(verdicts[5:]) == {Verdict.RATE_LIMITED}
    # the bucket refills: one second later ten more
    later = [engine.handle(probe(src=f"10.0.1.{i}", t=1.05 + 0.001 * i)).verdict
             for i in range(20)]
    assert later.count(Verdict.BLOCK) == 5  # capped at the burst again


def test_rate_limited_reports_are_throttled():
    engine = Engine(Policy(ban_rate=1, ban_burst=1))
    engine.handle(probe(src="10.0.0.1", t=0))
    reports = [engine.handle(probe(src=f"10.0.0.{i}", t=0.01 * i)).report for i in range(2, 50)]
    assert reports.count(True) == 1


def test_probes_slightly_out_of_order_do_not_mint_tokens():
    """Two sensors' kernel timestamps interleave within a second; a larger
    step back is the clock itself (see test_kernel_bans)."""
    engine = Engine(Policy(ban_rate=1, ban_burst=1))
    assert engine.handle(probe(src="10.0.0.1", t=100)).verdict is Verdict.BLOCK
    assert engine.handle(probe(src="10.0.0.2", t=99.2)).verdict is Verdict.RATE_LIMITED
    assert engine.handle(probe(src="10.0.0.3", t=100.5)).verdict is Verdict.RATE_LIMITED
    assert engine.handle(probe(src="10.0.0.4", t=101.1)).verdict is Verdict.BLOCK


def test_a_flood_of_spoofed_sources_keeps_memory_bounded():
    engine = Engine(Policy(scan_trigger=3, host_capacity=1000, ban_rate=5, ban_burst=5))
    for i in range(200_000):
        engine.handle(probe(src=str(ipaddress.IPv6Address((0x20010DB8 << 96) + i)), t=i * 1e-5))
    assert engine.pending_hosts == 1000 and len(engine.bans()) == 0
    # a real scanner is still seen: three ports, then a decision
    for port in (1, 2, 3):
        last = engine.handle(probe(src="198.51.100.2", port=port, t=5.0))
    assert last.verdict is Verdict.BLOCK


def contact(port, t=None, src="198.51.100.2"):
    return Probe(A(src), port, TCP, Kind.SYN, port if t is None else t, trap=False)


def test_sequential_test_bans_a_scan_that_avoids_the_traps():
    engine = Engine(Policy(), TrwParameters())
    verdicts = [engine.handle(contact(port)).verdict for port in (2001, 2002, 2003)]
    assert verdicts == [Verdict.PENDING] * 3
    decision = engine.handle(contact(2004))
    assert decision.verdict is Verdict.BLOCK and decision.slow_scan == 4
    assert engine.is_blocked(A("198.51.100.2"))


def test_a_young_failed_first_contact_is_judged_later():
    engine = Engine(Policy(trial_delay=0.05), TrwParameters())
    for port in (2001, 2002, 2003, 2004):
        young = engine.handle(contact(port), Facts(young=True))
        assert young.verdict is Verdict.PENDING and young.recheck_after == 0.05
    assert not engine.is_blocked(A("198.51.100.2"))  # nothing judged yet
    # later: one was a port forward's client (a success), the rest failed
    assert engine.handle(contact(2001), Facts(forwarded=True)).verdict is Verdict.PENDING
    verdicts = [engine.handle(contact(p)).verdict for p in (2002, 2003, 2004)]
    assert Verdict.BLOCK not in verdicts[:2]
    served = engine.handle(contact(2005), Facts(young=True, served=True))
    assert served.recheck_after == 0  # a served port is judged at once


def test_sequential_test_respects_decoy_grace_and_udp_is_not_a_trial():
    engine = Engine(Policy(), TrwParameters())
    for port in (2001, 2002, 2003):
        engine.handle(contact(port, src="198.51.100.3"), Facts(peer=True))
    assert engine.handle(contact(2004, src="198.51.100.3"), Facts(peer=True)).verdict \
        is Verdict.DECOY
    udp = Probe(A("198.51.100.4"), 53, UDP, Kind.UDP, 0, trap=False)
    assert engine.handle(udp, Facts(young=True)).recheck_after == 0


def test_reconfigure_keeps_bans_and_counts_and_the_slow_scan_state():
    engine = Engine(Policy(scan_trigger=3), TrwParameters())
    engine.handle(probe(port=1))
    engine.handle(probe(src="198.51.100.5"))
    engine.handle(probe(src="198.51.100.5", port=2))
    engine.handle(probe(src="198.51.100.5", port=3))
    sequential = engine.sequential
    engine.reconfigure(Policy(scan_trigger=2), TrwParameters())
    assert engine.sequential is sequential and engine.is_blocked(A("198.51.100.5"))
    assert engine.handle(probe(port=2)).verdict is Verdict.BLOCK  # port 1 still counted
    engine.reconfigure(Policy(), TrwParameters(p_false=0.001))
    assert engine.sequential is not sequential
    engine.reconfigure(Policy(), None)
    assert engine.sequential is None


def test_ack_probes_ban_only_as_a_scan_of_distinct_ports_and_never_a_peer():
    """Issue 19: nmap -sA/-sW/-sM send ACKs (or FIN/ACKs) that match no
    connection. Late ACKs after connection tracking forgot a connection are
    normal, so one never bans, nor do repeats to one port, nor ports spread
    beyond the window; ack_scan_trigger distinct ports within it do, with the
    "TCP ACK scan" kind. A peer's (spoofable) ACKs never ban."""
    from portsentinel.engine import ACK, FIN, PSH, classify_tcp
    assert classify_tcp(ACK) is classify_tcp(FIN | ACK) is classify_tcp(ACK | PSH) is Kind.ACK
    engine = Engine(Policy(ack_scan_trigger=3, ack_scan_window=60))
    ack = lambda port, t, src="198.51.100.2": probe(src, port, t=t, kind=Kind.ACK)
    assert engine.handle(ack(80, 0.0)).verdict is Verdict.PENDING
    assert engine.handle(ack(80, 1.0)).verdict is Verdict.PENDING  # the same port again
    # counted over five windows, as the kernel's bucket remembers: port 80's is too old
    assert engine.handle(ack(81, 310.0)).verdict is Verdict.PENDING
    assert engine.handle(ack(82, 311.0)).verdict is Verdict.PENDING
    assert engine.handle(ack(83, 312.0, "198.51.100.3"), Facts(served=True)).verdict \
        is Verdict.PENDING
    decision = engine.handle(ack(83, 312.0))
    assert decision.verdict is Verdict.BLOCK and decision.probe.kind is Kind.ACK
    peer = "198.51.100.4"
    verdicts = [engine.handle(ack(p, 1.0, peer), Facts(peer=True)).verdict for p in range(1, 9)]
    assert Verdict.BLOCK not in verdicts and Verdict.DECOY in verdicts
    off = Engine(Policy(ack_scan_trigger=0))
    assert {off.handle(ack(p, 0.0)).verdict for p in range(1, 20)} == {Verdict.PENDING}


def test_a_slow_ack_scan_is_banned_by_the_daemon_within_five_windows():
    """The kernel's bucket refills one port a window, so a scan of one new
    port a little slower than that never overflows it (an adversarial try:
    one ACK every 62 s, nothing said, never banned). The daemon is told of
    each (source, port) once a window and counts them over five windows, as
    the kernel's bucket remembers, as it does the other transports' ports."""
    engine = Engine(Policy())  # ACK_SCAN_TRIGGER 5, ACK_SCAN_WINDOW 60 s
    ack = lambda port, t: probe("198.51.100.2", port, t=t, kind=Kind.ACK)
    verdicts = [engine.handle(ack(600 + n, 62.0 * n)).verdict for n in range(5)]
    assert verdicts == [Verdict.PENDING] * 4 + [Verdict.BLOCK]
    slower = Engine(Policy())  # one every 80 s: five take 320 s, beyond five windows
    assert {slower.handle(ack(600 + n, 80.0 * n)).verdict for n in range(8)} \
        == {Verdict.PENDING}


def test_a_pardoned_host_starts_counting_afresh():
    """Found by an adversarial try: the ACKs counted before the kernel's ban
    still counted after `unblock`, so one late ACK banned the host again."""
    engine = Engine(Policy(ack_scan_trigger=5))
    for port in range(1, 5):
        assert engine.handle(probe(port=port, kind=Kind.ACK)).verdict is Verdict.PENDING
    source = A("198.51.100.2")
    assert engine.handle(probe(port=5, kind=Kind.SYN), Facts(banned_by_kernel=True)).verdict \
        is Verdict.BLOCK
    engine.lift(source, pardon=True)
    assert engine.handle(probe(port=6, t=1.0, kind=Kind.ACK)).verdict is Verdict.PENDING


def test_ip_protocol_probes_ban_only_as_a_scan_of_distinct_protocols():
    """Issue 19, nmap -sO: a GRE or ESP peer sends one protocol or two, so
    only proto_scan_trigger distinct protocols within the window ban, with
    BLOCK_TCP's actions; a peer's never."""
    from portsentinel.engine import IP
    engine = Engine(Policy(proto_scan_trigger=3, proto_scan_window=60))
    proto = lambda number, t=0.0, src="198.51.100.2": Probe(A(src), number, IP, Kind.PROTOCOL, t)
    assert engine.handle(proto(47)).verdict is Verdict.PENDING
    assert engine.handle(proto(47, 1.0)).verdict is Verdict.PENDING
    assert engine.handle(proto(50, 2.0)).verdict is Verdict.PENDING
    decision = engine.handle(proto(132, 3.0))
    assert decision.verdict is Verdict.BLOCK and decision.actions == (NFTABLES,)
    peer = [engine.handle(proto(n, 1.0, "198.51.100.4"), Facts(peer=True)).verdict
            for n in (2, 4, 41, 47, 50)]
    assert Verdict.BLOCK not in peer


def test_sctp_udplite_and_dccp_port_probes_ban_as_ack_probes_do():
    """Issue 19: an SCTP INIT, a UDP-Lite datagram or a DCCP Request to an
    unserved port is evidence: ack_scan_trigger distinct (protocol, port)
    pairs within the window ban (BLOCK_TCP's actions, graded repeated), one
    port retried never does, a served port counts for nothing, a peer's
    probes are decoys, and a pardon starts the count afresh."""
    engine = Engine(Policy(ack_scan_trigger=3, ack_scan_window=60))
    port = lambda proto, number, t=0.0, src="198.51.100.2": Probe(A(src), number, proto,
                                                                   Kind.TRANSPORT, t, 1)
    for t in range(5):  # a client retrying one port (its service down)
        assert engine.handle(port("sctp", 80, float(t))).verdict is Verdict.PENDING
    assert engine.handle(port("udplite", 7000, 6.0), Facts(served=True)).verdict \
        is Verdict.PENDING
    assert engine.handle(port("dccp", 80, 7.0)).verdict is Verdict.PENDING  # another protocol's
    decision = engine.handle(port("udplite", 9, 8.0))
    assert decision.verdict is Verdict.BLOCK and decision.actions == (NFTABLES,)
    assert decision.evidence == "repeated"
    peer = [engine.handle(port("sctp", n, 1.0, "198.51.100.4"), Facts(peer=True)).verdict
            for n in range(1, 9)]
    assert Verdict.BLOCK not in peer and Verdict.DECOY in peer
    engine.lift(A("198.51.100.2"), pardon=True)
    assert engine.handle(port("sctp", 81, 9.0)).verdict is Verdict.PENDING
    off = Engine(Policy(ack_scan_trigger=0))
    assert {off.handle(port("sctp", n)).verdict for n in range(1, 20)} == {Verdict.PENDING}
    kernel = Engine(Policy()).handle(port("sctp", 5), Facts(banned_by_kernel=True))
    assert kernel.verdict is Verdict.BLOCK and kernel.evidence == "repeated"
    # a new service's client: its served ports are no evidence, its one unserved is one
    fresh = Engine(Policy(ack_scan_trigger=5))
    for number in range(7101, 7109):
        assert fresh.handle(port("udplite", number), Facts(served=True)).verdict \
            is Verdict.PENDING
    assert fresh.handle(port("sctp", 3301)).verdict is Verdict.PENDING


# -- evidence grades (issue 14) -----------------------------------------------
def test_every_ban_says_what_evidence_made_it():
    """handshake completed / repeated stateless probes / one stateless probe /
    manual; a fleet member's ban keeps the grade its member gave it."""
    def ban(engine, probe, facts=Facts()):
        decision = engine.handle(probe, facts)
        assert decision.verdict is Verdict.BLOCK, decision
        return decision.evidence

    a = ipaddress.ip_address
    assert ban(Engine(Policy()), Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0)) == "single"
    assert ban(Engine(Policy()), Probe(a("192.0.2.1"), 1, UDP, Kind.UDP, 0.0)) == "single"
    assert ban(Engine(Policy()), Probe(a("192.0.2.1"), 1, TCP, Kind.CONNECT, 0.0)) \
        == "handshake"
    engine = Engine(Policy(scan_trigger=2))
    assert engine.handle(Probe(a("192.0.2.2"), 1, TCP, Kind.SYN, 0.0)).verdict \
        is Verdict.PENDING
    assert ban(engine, Probe(a("192.0.2.2"), 2, TCP, Kind.SYN, 1.0)) == "repeated"
    engine = Engine(Policy(ack_scan_trigger=2))
    engine.handle(Probe(a("192.0.2.3"), 1, TCP, Kind.ACK, 0.0))
    assert ban(engine, Probe(a("192.0.2.3"), 2, TCP, Kind.ACK, 1.0)) == "repeated"
    # the kernel trap's own bans: by what the kernel saw
    kernel = Facts(banned_by_kernel=True)
    assert ban(Engine(Policy()), Probe(a("192.0.2.4"), 1, TCP, Kind.SYN, 0.0), kernel) \
        == "single"
    assert ban(Engine(Policy()), Probe(a("192.0.2.4"), 1, TCP, Kind.CONNECT, 0.0), kernel) \
        == "handshake"
    assert ban(Engine(Policy()), Probe(a("192.0.2.4"), 47, "ip", Kind.PROTOCOL, 0.0), kernel) \
        == "repeated"
    # an admin's, a fleet member's
    assert Engine(Policy()).block(a("192.0.2.5"), 0.0).evidence == "manual"
    assert Engine(Policy()).fleet_ban(a("192.0.2.6"), 0.0, None, "handshake").evidence \
        == "handshake"
    assert Engine(Policy()).fleet_ban(a("192.0.2.6"), 0.0, None).evidence == "fleet"


def test_ban_time_by_evidence_is_off_by_default_and_maps_grades_to_ban_times():
    a = ipaddress.ip_address
    plain = Engine(Policy(ban_time=3600))
    assert plain.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0)).ban_seconds == 3600
    graded = Engine(Policy(ban_time=3600, ban_time_increment=2,
                           ban_time_by_evidence={"single": 600, "handshake": 86400}))
    single = graded.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0))
    assert (single.ban_seconds, single.escalated) == (600, True)  # the kernel's time replaced
    connect = graded.handle(Probe(a("192.0.2.2"), 1, TCP, Kind.CONNECT, 0.0))
    assert connect.ban_seconds == 86400
    assert graded.block(a("192.0.2.3"), 0.0).ban_seconds == 3600  # not mapped: BAN_TIME
    graded.lift(a("192.0.2.1"))  # a second offence: escalated from its grade's time
    assert graded.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 10.0)).ban_seconds == 1200


def test_blocking_a_banned_address_again_gives_it_the_manual_ban_time():
    """Found by an adversarial try: `block` of an address banned already
    reset it to BAN_TIME, where a fresh `block` gets the manual grade's time."""
    a = ipaddress.ip_address
    graded = Engine(Policy(ban_time=86400, ban_time_by_evidence={"single": 3600,
                                                                 "manual": 10800}))
    graded.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0))
    again = graded.block(a("192.0.2.1"), 100.0)
    assert again.verdict is Verdict.ALREADY_BLOCKED
    assert (again.ban_seconds, again.until) == (10800, 100.0 + 10800)
    assert graded.block(a("192.0.2.1"), 200.0, seconds=60).until == 260.0  # --for wins
    plain = Engine(Policy(ban_time=86400))
    plain.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0))
    assert plain.block(a("192.0.2.1"), 100.0).ban_seconds == 86400
    # ... and never shortens one (a second try): an admin's block keeps a host out
    longer = graded.block(a("192.0.2.1"), 300.0, seconds=43200)
    assert graded.block(a("192.0.2.1"), 400.0).until == longer.until
    graded.block(a("192.0.2.1"), 500.0, seconds=0)  # --for 0: forever
    forever = graded.block(a("192.0.2.1"), 600.0)
    assert (forever.until, forever.ban_seconds) == (None, 0)


def test_trap_hits_below_the_trigger_are_marked_as_fleet_evidence():
    """What a fleet shares to catch a scan spread over its members: a trap hit
    that did not ban here (below SCAN_TRIGGER); never a served port's, a
    peer's (maybe a decoy), one already banned, or a failed first contact to
    a port outside the traps (a monitor checking a port no member serves)."""
    a = ipaddress.ip_address
    engine = Engine(Policy(scan_trigger=3))
    hit = engine.handle(Probe(a("192.0.2.1"), 1, TCP, Kind.SYN, 0.0), Facts())
    assert hit.verdict is Verdict.PENDING and hit.fleet_evidence
    served = engine.handle(Probe(a("192.0.2.1"), 22, TCP, Kind.SYN, 1.0), Facts(served=True))
    assert not served.fleet_evidence
    peer = engine.handle(Probe(a("192.0.2.2"), 1, TCP, Kind.SYN, 0.0), Facts(peer=True))
    assert not peer.fleet_evidence
    slow = Engine(Policy(), TrwParameters())
    failed = slow.handle(Probe(a("192.0.2.3"), 5000, TCP, Kind.SYN, 0.0, trap=False), Facts())
    assert failed.verdict is Verdict.PENDING and not failed.fleet_evidence
    good = slow.handle(Probe(a("192.0.2.4"), 80, TCP, Kind.SYN, 0.0, trap=False),
                       Facts(served=True))
    assert not good.fleet_evidence
    banned = Engine(Policy())
    banned.handle(Probe(a("192.0.2.5"), 1, TCP, Kind.SYN, 0.0))
    assert not banned.handle(Probe(a("192.0.2.5"), 2, TCP, Kind.SYN, 1.0)).fleet_evidence
    # a packet sensor's trap hit, too young to judge for the slow-scan test yet
    young = Engine(Policy(scan_trigger=3), TrwParameters())
    hit = young.handle(Probe(a("192.0.2.6"), 1, TCP, Kind.SYN, 0.0), Facts(young=True))
    assert hit.recheck_after and hit.fleet_evidence


def test_a_fleet_correlation_is_judged_like_a_scan_here():
    """Rate limit, BLOCK_TCP, the grade's ban time and escalation; never a peer."""
    a = ipaddress.ip_address
    engine = Engine(Policy(ban_time=3600, ban_time_increment=2,
                           ban_time_by_evidence={"fleet": 600}, ban_rate=1, ban_burst=1))
    first = engine.fleet_correlation(a("192.0.2.1"), 0.0, peer=False)
    assert (first.verdict, first.ban_seconds, first.evidence) == (Verdict.BLOCK, 600, "fleet")
    assert engine.fleet_correlation(a("192.0.2.1"), 0.5, False).verdict \
        is Verdict.ALREADY_BLOCKED
    assert engine.fleet_correlation(a("192.0.2.2"), 0.1, False).verdict is Verdict.RATE_LIMITED
    assert engine.fleet_correlation(a("192.0.2.3"), 5.0, True).verdict is Verdict.DECOY
    engine.lift(a("192.0.2.1"))
    assert engine.fleet_correlation(a("192.0.2.1"), 10.0, False).ban_seconds == 1200
    log_only = Engine(Policy(block_tcp=0))
    assert log_only.fleet_correlation(a("192.0.2.4"), 0.0, False).verdict is Verdict.ALERT
    assert Engine(Policy()).fleet_correlation(a("255.255.255.255"), 0.0, False).verdict \
        is Verdict.IGNORED
