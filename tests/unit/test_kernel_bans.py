import re
"""Unit tests for the trust pieces: canonical addresses, the kernel's own bans
(NFLOG messages and the engine's record of them), the trap's rules, the
soonest-expiring bans."""

import ipaddress
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from portsentinel.addrset import AddressSet, canonical, canonical_network
from portsentinel.engine import SYN, TCP, UDP, Engine, Facts, Kind, Policy, Probe, Verdict
from portsentinel.nflog import NFULA_PAYLOAD, NFULA_PREFIX, NFULA_TIMESTAMP, KernelBanLog, _attributes
from portsentinel.nft import NftBans
from portsentinel.ruleset import (CONTACT_PREFIX, HIT_PREFIX, LOG_PREFIX, SERVED_PREFIX,
                                  KernelTrap, table_commands)
from portsentinel.store import BanRecord, Store

from test_packets import ipv4, ipv6, tcp, udp

A = ipaddress.ip_address


def _bare_bans(nft, table: str, size: int) -> NftBans:
    """An NftBans on a fake libnftables, without the netlink socket."""
    bans = NftBans.__new__(NftBans)
    bans.nft, bans.table, bans.set_size = nft, table, size
    bans.expected = bans.checked_generation = bans.queue_error = bans.made_anew = None
    bans._trap, bans._ban_time, bans._never, bans._clean = None, 0.0, [], None
    return bans


@pytest.mark.parametrize("text, expected", [
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("198.51.100.7", "198.51.100.7"),
    ("2001:db8::7", "2001:db8::7"),
    ("fe80::1%eth0", "fe80::1"),
    (A("::ffff:10.0.0.1"), "10.0.0.1"),
])
def test_canonical_address(text, expected):
    assert str(canonical(text)) == expected


@pytest.mark.parametrize("hostile", ["2001:db8::5%\nALL: ALL", "1.2.3.4\n", "", "::ffff:1.2.3"])
def test_canonical_refuses_what_is_not_one_address(hostile):
    with pytest.raises(ValueError):
        canonical(hostile)


def test_canonical_network_maps_ipv4_mapped_prefixes():
    assert str(canonical_network("::ffff:198.51.100.0/120")) == "198.51.100.0/24"
    assert str(canonical_network("::ffff:198.51.100.7")) == "198.51.100.7/32"
    assert str(canonical_network("2001:db8::/64")) == "2001:db8::/64"


def test_a_mapped_source_on_the_wire_is_the_ipv4_address():
    from portsentinel import packets
    p = packets.parse(ipv6(6, tcp(111, SYN), src="::ffff:198.51.100.9"))
    assert p.source == A("198.51.100.9") and p.source_port == 40000


def _nflog_message(payload: bytes, prefix: bytes = LOG_PREFIX.encode() + b"\0",
                   stamp=(1764070000, 250000)) -> bytes:
    def attr(kind, data):
        length = 4 + len(data)
        return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)
    body = (attr(NFULA_PREFIX, prefix) + attr(NFULA_TIMESTAMP, struct.pack("!QQ", *stamp))
            + attr(NFULA_PAYLOAD, payload))
    header = struct.pack("=IHHII", 16 + 4 + len(body), (4 << 8), 0, 0, 0)
    return header + struct.pack("=BBH", 2, 0, 0) + body


SENSOR_PREFIXES = {LOG_PREFIX: "ban", HIT_PREFIX: "hit", CONTACT_PREFIX: "contact",
                   SERVED_PREFIX: "served"}


def _log(prefixes=None):
    log = KernelBanLog.__new__(KernelBanLog)  # parsing only: no socket
    log.prefix, log.malformed = LOG_PREFIX.encode(), 0
    log.prefixes = {p.encode(): what for p, what in (prefixes or {LOG_PREFIX: "ban"}).items()}
    return log


def _probe_of(message: bytes):
    log = _log()
    return log.to_probe(_attributes(message, 20)), log


def test_the_kernel_sensor_says_what_it_judged():
    log = _log(SENSOR_PREFIXES)
    for prefix, what, trap in ((HIT_PREFIX, "hit", True), (CONTACT_PREFIX, "contact", False),
                               (SERVED_PREFIX, "served", False), (LOG_PREFIX, "ban", True)):
        message = _nflog_message(ipv4(6, tcp(2001, SYN), src="198.51.100.12"),
                                 prefix=prefix.encode() + b"\0")
        said, probe = log.to_logged(_attributes(message, 20))
        assert said == what and probe.trap is trap and probe.port == 2001
    assert _log().to_logged(_attributes(_nflog_message(ipv4(6, tcp(1, SYN)),
                                                       prefix=HIT_PREFIX.encode() + b"\0"),
                                        20)) is None  # not asked for: not ours


def test_nflog_message_becomes_the_probe_that_caused_the_ban():
    probe, _ = _probe_of(_nflog_message(ipv4(6, tcp(25, SYN), src="198.51.100.11")))
    assert (probe.source, probe.port, probe.protocol, probe.kind) == (
        A("198.51.100.11"), 25, TCP, Kind.SYN)
    assert probe.time == pytest.approx(1764070000.25)
    udp_probe, _ = _probe_of(_nflog_message(ipv6(17, udp(161), src="2001:db8::b")))
    assert (udp_probe.source, udp_probe.port, udp_probe.kind) == (A("2001:db8::b"), 161, Kind.UDP)


def test_an_sctp_udplite_or_dccp_probe_is_a_port_probe_except_in_the_protocol_count():
    """Issue 19: the same SCTP INIT is a port probe (the `transport` chain's
    line, the kernel's ban of it: alerted as "SCTP INIT scan ... to SCTP
    port: 80") and one IP protocol in -sO's count (`proto`: 132)."""
    from portsentinel.engine import IP
    from portsentinel.logs import alert_line, history_line
    from portsentinel.ruleset import PORT_SCAN_PREFIX, PROTO_PREFIX, TRANSPORT_PREFIX
    log = _log({LOG_PREFIX: "ban", PROTO_PREFIX: "proto", TRANSPORT_PREFIX: "transport",
                PORT_SCAN_PREFIX: "port scan"})
    init = struct.pack("!HHII", 40000, 80, 0, 0) + bytes([1, 0, 0, 20])
    lines = {}
    for prefix in (LOG_PREFIX, PROTO_PREFIX, TRANSPORT_PREFIX, PORT_SCAN_PREFIX):
        message = _nflog_message(ipv4(132, init, src="198.51.100.12"),
                                 prefix=prefix.encode() + b"\0")
        said, probe = log.to_logged(_attributes(message, 20))
        lines[said] = alert_line(probe)
        expected = ((IP, 132, Kind.PROTOCOL) if said == "proto"
                    else ("sctp", 80, Kind.TRANSPORT))
        assert (probe.protocol, probe.port, probe.kind) == expected and probe.trap
    assert lines["transport"] == lines["ban"] == lines["port scan"] == \
        "attackalert: SCTP INIT scan from host: 198.51.100.12/198.51.100.12 to SCTP port: 80"
    assert lines["proto"].endswith("to IP protocol: 132")
    for number, payload, line in (
            (136, udp(7000), "UDP-Lite scan from host: 2001:db8::2/2001:db8::2 to UDP-Lite port: 7000"),
            (33, struct.pack("!HHBBHBB", 1, 5001, 5, 0, 0, 1, 0), "DCCP Request scan from host: "
             "2001:db8::2/2001:db8::2 to DCCP port: 5001")):
        message = _nflog_message(ipv6(number, payload), prefix=TRANSPORT_PREFIX.encode() + b"\0")
        _, probe = log.to_logged(_attributes(message, 20))
        assert alert_line(probe) == f"attackalert: {line}"
    assert history_line(0, "192.0.2.1", None, 80, "sctp").endswith("Port: 80 SCTP Blocked")
    assert history_line(0, "192.0.2.1", None, 7, "udplite").endswith("Port: 7 UDP-Lite Blocked")


def test_nflog_ignores_other_prefixes_and_garbage():
    other, _ = _probe_of(_nflog_message(ipv4(6, tcp(25, SYN)), prefix=b"someone else\0"))
    assert other is None
    garbage, log = _probe_of(_nflog_message(b"\x45\x00"))
    assert garbage is None and log.malformed == 1


def test_engine_records_a_kernel_ban_once_escalates_and_refuses_never_block():
    engine = Engine(Policy(ban_time=100, ban_time_increment=2,
                           never_block=AddressSet([ipaddress.ip_network("198.51.100.250/32")])))
    banned = Facts(banned_by_kernel=True)
    first = engine.handle(Probe(A("198.51.100.11"), 25, TCP, Kind.SYN, 10.0), banned)
    assert first.verdict is Verdict.BLOCK and first.ban_seconds == 100 and not first.escalated
    again = engine.handle(Probe(A("198.51.100.11"), 26, TCP, Kind.SYN, 11.0), banned)
    assert again.verdict is Verdict.ALREADY_BLOCKED and not again.report
    engine.lift(A("198.51.100.11"))
    third = engine.handle(Probe(A("198.51.100.11"), 25, TCP, Kind.SYN, 12.0), banned)
    assert third.ban_seconds == 200 and third.escalated  # replaces the kernel's 100 s
    never = engine.handle(Probe(A("198.51.100.250"), 25, UDP, Kind.UDP, 12.0), banned)
    assert never.verdict is Verdict.IGNORED


class _RecordingNft:
    def __init__(self):
        self.batches = []

    def run(self, commands, as_json=False, terse=False):
        if not commands.startswith("list"):
            self.batches.append(commands)
        return '{"nftables": []}' if as_json else ""


def test_trap_rules_spare_any_socket_replies_and_mapped_sources_and_log_each_ban():
    nft = _RecordingNft()
    bans = _bare_bans(nft, "t", 1000)
    bans._install(KernelTrap(((1, 1023),), ((1, 1023),), log_group=7417), 3600)
    rules = nft.batches[-1]
    assert "socket wildcard le 1 return" not in rules  # breaks on TIME_WAIT / SYN_RECV sockets
    assert "add rule inet t trap socket transparent 0 return" in rules
    assert "add rule inet t trap socket transparent 1 return" in rules
    assert "add rule inet t trap ct direction reply return" in rules
    assert "ip6 saddr ::ffff:0.0.0.0/96 return" in rules
    assert rules.count(f'log group 7417 prefix "{LOG_PREFIX}" counter drop') == 2
    assert "size 1000;" in rules
    # the order matters: every exemption comes before the ban
    assert rules.index("trap ct direction reply") < rules.index("trap socket transparent 0") \
        < rules.index("add @ban4")


@pytest.mark.parametrize("sensor", [False, True])
def test_flags_no_stack_sends_are_trap_hits_even_to_served_ports(sensor):
    """Issue 19: NULL, FIN, XMAS, SYN+FIN and SYN+RST (nmap -O's probes to
    open ports) go to the trap's verdict (peers, rate, ban) whether a socket
    serves the port or not; only replies and ports neither trapped nor served
    are left alone. Nothing a real stack sends matches."""
    trap = KernelTrap(((1, 1023),), (), 600, (20.0, 40), log_group=7417, sensor=sensor)
    rules = table_commands("t", 1000, trap, 3600)
    bogus = [r for r in rules if r.startswith("add rule inet t bogus ")]
    assert bogus[0] == "add rule inet t bogus ct direction reply return"
    assert all(r.endswith("goto trapped") for r in bogus[1:]), bogus
    assert "add rule inet t bogus socket transparent 0 goto trapped" in bogus
    assert "add rule inet t bogus tcp dport @served_tcp goto trapped" in bogus
    jumps = [r for r in rules if r.endswith("jump bogus")]
    assert len(jumps) == 4
    from portsentinel.engine import ACK, FIN, PSH, RST, URG

    def matches(flags: int) -> bool:  # the three jumps' tests, as the kernel applies them
        return (flags & (SYN | ACK | RST) == 0 or flags & (SYN | FIN) == SYN | FIN
                or flags & (SYN | RST) == SYN | RST or flags & (FIN | RST | ACK) == FIN | RST)
    assert "tcp flags & (syn | ack | rst) == 0 jump bogus" in jumps[0]
    for bogus_flags in (0, FIN, FIN | PSH | URG, SYN | FIN, SYN | FIN | PSH | URG, SYN | RST,
                        FIN | RST):
        assert matches(bogus_flags)
    for real in (SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, SYN | 0x40 | 0x80,
                 FIN | RST | ACK):
        assert not matches(real), real  # (SYN with ECE and CWR: an ECN set-up)
    no_ban = table_commands("t", 1000, replace(trap, ban_tcp=False, sensor=False), 0)
    assert not any("bogus" in r for r in no_ban)  # BLOCK_TCP=0 beside the packet sensor


def test_the_trap_learns_a_served_port_from_its_traffic():
    """A port a socket serves goes to served_* as soon as a client's packet
    reaches it (SERVICE_MEMORY): a service that restarts before the daemon's
    poll has seen it is still no trap. Only packets a client sent (not replies
    to this host's own sockets) teach it; `add` leaves a known port's timeout
    alone, so a busy port costs a lookup, no write."""
    trap = KernelTrap(((1, 1023),), ((1, 1023),), log_group=7417, service_memory=3600)
    for rules in ("\n".join(table_commands("t", 1000, trap, 3600)),
                  "\n".join(table_commands("t", 1000, replace(trap, sensor=True), 3600))):
        for protocol in ("tcp", "udp"):
            for transparent in (0, 1):
                assert (f"add rule inet t trap meta l4proto {protocol} socket transparent "
                        f"{transparent} add @served_{protocol} {{ {protocol} dport timeout "
                        "3600s } return") in rules
        assert rules.index("trap ct direction reply return") < rules.index("add @served_tcp")
        assert rules.index("add @served_udp") < rules.index("add @ban4")
    without = "\n".join(table_commands("t", 1000, replace(trap, service_memory=0), 3600))
    assert "add @served" not in without and "trap socket transparent 0 return" in without


def test_soonest_expiring_never_offers_manual_or_permanent_bans(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    store.add_bans([BanRecord("198.51.100.1", 0, 50.0), BanRecord("198.51.100.2", 0, 10.0),
                    BanRecord("198.51.100.3", 0, None),
                    BanRecord("198.51.100.4", 0, 5.0, origin="cli"),
                    BanRecord("198.51.100.5", 0, 20.0, origin="kernel")])
    assert [r.address for r in store.soonest_expiring(10)] == [
        "198.51.100.2", "198.51.100.5", "198.51.100.1"]
    assert [r.address for r in store.soonest_expiring(1)] == ["198.51.100.2"]


def test_a_clock_stepped_back_does_not_freeze_the_ban_rate_limit():
    """The token bucket must not wait for the clock to catch up with its last
    refill: after a 1 h step back, new scanners are banned at the normal rate."""
    engine = Engine(Policy(ban_rate=1.0, ban_burst=5))
    t = 10_000.0
    for i in range(5):
        assert engine.handle(Probe(A(f"198.51.100.{i + 1}"), 1, TCP, Kind.SYN, t)).verdict \
            is Verdict.BLOCK
    t -= 3600  # NTP steps the clock back an hour
    verdicts = [engine.handle(Probe(A(f"198.51.100.{i + 20}"), 1, TCP, Kind.SYN,
                                     t + 2 * i)).verdict for i in range(10)]
    assert verdicts.count(Verdict.BLOCK) >= 9, verdicts


def test_a_challenge_bans_once_per_connection_and_spares_served_ports():
    """After an unblock, a challenged connection's later packets (a FIN
    retransmitted) must not ban again; a port served lately is never a trap."""
    nft = _RecordingNft()
    bans = _bare_bans(nft, "t", 1000)
    bans._install(KernelTrap(((1, 1023),), ((1, 1023),), peer_memory=600, challenge_port=4000,
                             log_group=7417), 3600)
    rules = nft.batches[-1]
    assert ("tcp dport 4000 ct status dnat socket wildcard 0 ip saddr . tcp sport != @chal4 "
            "add @chal4 { ip saddr . tcp sport timeout 10m } jump challenged") in rules
    assert "add rule inet t trap tcp dport @served_tcp return" in rules
    assert "add rule inet t trap udp dport @served_udp return" in rules
    assert "add rule inet t challenge tcp dport @served_tcp return" in rules


def test_a_flood_of_new_sources_cannot_fill_the_hit_meter_and_silence_the_trap():
    """The userspace path (KERNEL_TRAP="0") logs each trap hit through a
    per-source meter (`hits`): a source it cannot add (the set full) was
    accepted unlogged, never seen, never banned. 65,536 sources remembered
    10 s each filled it at 6,554 new sources a second. It must hold a
    sustained 20,000 a second (issue 18), and a source it cannot hold is
    still logged, at a bounded overall rate, not let through unseen."""
    import re
    trap = KernelTrap(((1, 1023),), ((1, 1023),), 600, (0.0, 0), ban_tcp=False,
                      ban_udp=False, challenge_port=41234, log_group=7417, sensor=True)
    rules = "\n".join(table_commands("t", 1000, trap, 3600))
    for v, field in (("4", "ip saddr"), ("6", "ip6 saddr")):
        size = int(re.search(rf"add set inet t hits{v} {{[^}}]* size (\d+);", rules)[1])
        update = re.search(rf"hit meta nfproto \S+ update @hits{v} {{ {field} timeout (\d+)s "
                           r"limit rate (\d+)/second burst (\d+) packets", rules)
        timeout, rate, burst = map(int, update.groups())
        assert size / timeout >= 20000, (size, timeout)
        assert timeout >= burst / rate  # forgotten only once its bucket is full again
        # over its rate, a source in the meter is dropped from the log; one the
        # meter could not take (full) is logged, globally limited
        member = rules.index(f"add rule inet t hit {field} @hits{v} accept")
        assert member > rules.index(update[0])
        fallback = re.search(rf"add rule inet t hit meta nfproto \S+ limit rate \d+/second "
                             rf'burst \d+ packets log group 7417 prefix "{HIT_PREFIX}" accept',
                             rules[member:])
        assert fallback, rules[member:member + 600]


def test_the_sensed_trap_logs_only_what_userspace_must_judge():
    trap = KernelTrap(((1, 1023),), ((1, 1023),), 600, (20.0, 40), ban_tcp=True,
                      ban_udp=False, challenge_port=41234, log_group=7417, sensor=True,
                      contacts=True)
    rules = "\n".join(table_commands("t", 1000, trap, 3600))
    # a stranger's TCP trap hit is banned in the kernel; UDP (no kernel ban) goes up
    assert "trapped meta l4proto tcp meta nfproto ipv4 add @ban4" in rules
    assert "meta l4proto udp meta nfproto ipv4 add @ban4" not in rules
    assert "add rule inet t trap goto trapped" in rules
    assert "add rule inet t trapped goto hit" in rules
    # every exemption comes before any ban or log
    assert rules.index("trap ct direction reply return") < rules.index("trap socket "
                                                                        "transparent 0 return") \
        < rules.index("@peers4 ip saddr != @young4 goto peer_hit") \
        < rules.index("trapped meta l4proto tcp meta nfproto ipv4 add @ban4")
    # hits: per source, a limited rate; contacts: each (source, port) once
    assert "update @hits4 { ip saddr timeout 2s limit rate 20/second burst 40 packets }" \
        in rules
    assert "contact ip saddr . tcp dport @seen4 return" in rules
    assert f'contact_new socket transparent 0 log group 7417 prefix "{SERVED_PREFIX}" return' \
        in rules
    assert rules.rstrip().endswith(f'contact_new log group 7417 prefix "{CONTACT_PREFIX}"')
    # the breaker's hits still reach userspace (it alerts, rate limited)
    assert f'limit rate over 20/second burst 40 packets log group 7417 prefix "{HIT_PREFIX}" ' \
           "accept" in rules
    without = "\n".join(table_commands("t", 1000, KernelTrap(((1, 1023),), (), log_group=7417,
                                                              sensor=True), 0))
    assert "jump contact" not in without  # no slow-scan test: no contacts logged


def test_a_kernel_logged_trap_hit_says_whether_its_source_is_a_peer():
    """The kernel saw the peer sets when it logged the hit: its prefix carries
    the answer, so userspace asks no netlink question per hit."""
    from portsentinel.daemon.probes import KernelFacts
    from portsentinel.ruleset import PEER_HIT_PREFIX, KernelTrap, table_commands

    class NoLookups:
        def is_peer(self, address):
            raise AssertionError("a lookup")

    probe = Probe(ipaddress.ip_address("198.51.100.9"), 23, TCP, Kind.SYN, 0.0)
    assert KernelFacts(NoLookups(), probe, False, peer=False).peer is False
    assert KernelFacts(NoLookups(), probe, False, peer=True).peer is True
    with pytest.raises(AssertionError):
        KernelFacts(NoLookups(), probe, True).peer  # a first contact: asked
    rules = table_commands("t", 1024, KernelTrap(((1, 1023),), (), 600, log_group=5,
                                                 sensor=True), 60)
    assert "add rule inet t trapped ip saddr @peers4 ip saddr != @young4 goto peer_hit" in rules
    peer_logs = [r for r in rules if r.startswith("add rule inet t peer_hit ") and "log" in r]
    assert peer_logs and all(f'prefix "{PEER_HIT_PREFIX}"' in r for r in peer_logs)
    hit_logs = [r for r in rules if r.startswith("add rule inet t hit ") and "log" in r]
    assert hit_logs and all(f'prefix "{HIT_PREFIX}"' in r for r in hit_logs)


def test_the_table_is_listed_again_only_when_the_ruleset_generation_moved(monkeypatch):
    """Reconciliation checks our table every 30 s; listing it through
    libnftables costs milliseconds. nf_tables counts every committed change
    (its generation; not the kernel's own set updates from packets), so an
    unchanged generation means an unchanged table."""
    import portsentinel.nft as nft_module
    bans = NftBans.__new__(NftBans)
    generations = iter([7, 7, 8, 9, 9])
    monkeypatch.setattr(nft_module, "generation", lambda: next(generations))
    listed = []
    table = ["as installed"]
    bans.fingerprint = lambda: listed.append(1) or table[0]
    bans.expected, bans.checked_generation = "as installed", None
    assert bans.intact() and len(listed) == 1  # generation 7: not checked yet
    assert bans.intact() and len(listed) == 1  # 7 again: nothing committed since
    assert bans.intact() and len(listed) == 2  # 8: someone committed something
    table[0] = "a chain flushed"
    assert not bans.intact() and len(listed) == 3
    assert not bans.intact() and len(listed) == 4  # found changed: never trusted again



def test_our_own_element_commits_do_not_make_the_table_listed_again(monkeypatch):
    """Bans, the served ports' refresh and the hold's releases are commits
    too: each moves the generation, and a scan that nmap drags to its 60 s
    timeout paid a libnftables listing (~5 ms) at each reconciliation
    (issue 18). A commit of ours that changed only dynamic sets' elements,
    and was the only commit since the table was last found intact, keeps it
    trusted; anything else in between (another program's commit, ours to a
    static set such as trap_tcp) has it listed again."""
    import portsentinel.nfnetlink as nfnetlink
    import portsentinel.nft as nft_module
    now = [7]
    monkeypatch.setattr(nft_module, "generation", lambda: now[0])
    monkeypatch.setattr(nfnetlink, "OWN_COMMITS", nfnetlink.OwnCommits())
    bans = NftBans.__new__(NftBans)
    listed = []
    bans.fingerprint = lambda: listed.append(1) or "as installed"
    bans.expected, bans.checked_generation = "as installed", None
    assert bans.intact() and len(listed) == 1  # checked at 7

    def ours(*sets):
        now[0] += 1
        nfnetlink.OWN_COMMITS.committed(set(sets), now[0])
    ours("ban4")
    ours("served_tcp", "clear6")
    assert bans.intact() and len(listed) == 1  # 9: only our element commits since 7
    now[0] += 1  # another program's commit
    ours("ban6")
    assert bans.intact() and len(listed) == 2  # listed: 11 is not all ours
    ours("trap_tcp")  # ours, but to a set the listing covers
    assert bans.intact() and len(listed) == 3
    ours("ban4")
    assert bans.intact() and len(listed) == 3


def test_our_table_is_made_again_when_another_commit_lands_while_it_is_made(monkeypatch):
    """The table as installed is what the listing right after our commits
    shows; another program's commit in that window (a rule slipped in while
    the daemon restored a flushed table) was taken for ours and never undone.
    Now the listing counts as ours only if the generation moved by exactly our
    commits; else the table is made again (RACE_TRIES at most)."""
    import portsentinel.nft as nft_module
    now = [10]
    monkeypatch.setattr(nft_module, "generation", lambda: now[0])
    bans = NftBans.__new__(NftBans)
    bans.fingerprint = lambda: f"listed at {now[0]}"
    made = []

    def make(foreign: int):
        def run() -> int:
            made.append(now[0])
            now[0] += 1 + (foreign if len(made) == 1 else 0)  # ours, and another's at first
            return 1
        return run
    bans._made(make(foreign=1))
    assert made == [10, 12] and bans.expected == "listed at 13"
    assert bans.checked_generation == 13
    made.clear()
    bans._made(make(foreign=0))
    assert made == [13] and bans.checked_generation == 14

    def racing() -> int:
        now[0] += 2  # someone commits every time
        return 1
    bans._made(racing)
    assert bans.checked_generation is None  # never settled: the next check lists it


class _Kernel:
    """Our table as commits leave it: ours (a complete make replaces every
    rule) and, after our `foreign_after`-th commit, another program's rule."""

    def __init__(self, foreign_after: int):
        self.generation, self.ours, self.foreign_after = 1, 0, foreign_after
        self.rules: set[str] = set()

    def run(self, commands: str, as_json: bool = False, terse: bool = False) -> str:
        if commands.startswith("list"):
            return '{"nftables": []}'
        self.generation += 1
        if f"flush chain inet {TABLE} input" in commands:
            self.rules = {"ours"}
        self.ours += 1
        if self.ours == self.foreign_after:
            self.generation += 1
            self.rules.add("foreign")
        return ""


TABLE = "portsentinel"


@pytest.mark.parametrize("foreign_after", [1, 2, 3])
def test_a_rule_another_program_adds_between_our_commits_is_never_taken_as_ours(
        monkeypatch, foreign_after):
    """CI found it: a foreign rule committed between the restored table and
    its never-block sets (two transactions, the second listed as "as
    installed") was taken for ours and kept. Whenever another program's
    commit lands, the table we take as ours holds no rule of its own."""
    import portsentinel.nft as nft_module
    kernel = _Kernel(foreign_after)
    monkeypatch.setattr(nft_module, "generation", lambda: kernel.generation)
    bans = _bare_bans(kernel, TABLE, 1024)
    bans.fingerprint = lambda: repr(sorted(kernel.rules))
    never = AddressSet(["198.51.100.1"])
    bans.install(None, 0, never)
    bans.set_never_block(AddressSet(["198.51.100.2"]))
    assert not ("foreign" in kernel.rules and bans.intact()), kernel.rules


def test_a_stream_of_foreign_commits_while_the_table_is_made_is_never_taken_as_ours(
        monkeypatch):
    """Found by an adversarial try: another program committing to our table
    every few milliseconds during a restore defeated the three tries, and the
    listing (with its change) became the table "as installed". A make that
    never settles takes the fingerprint of the same commands' last settled
    make; with none, no fingerprint: the next check makes the table again."""
    import portsentinel.nft as nft_module
    kernel = _Kernel(foreign_after=0)
    monkeypatch.setattr(nft_module, "generation", lambda: kernel.generation)
    bans = _bare_bans(kernel, TABLE, 1024)
    bans.fingerprint = lambda: repr(sorted(kernel.rules))
    bans.install(None, 0, AddressSet(["198.51.100.1"]))
    assert bans.intact()
    racing = kernel.run

    def run(commands: str, **kw) -> str:
        out = racing(commands, **kw)
        if not commands.startswith("list"):  # another commit after each of ours
            kernel.generation += 1
            kernel.rules.add("foreign")
        return out
    kernel.run = run
    bans.install(None, 0)  # the same table: its settled fingerprint stands
    assert "foreign" in kernel.rules and not bans.intact()
    bans.install(None, 0, AddressSet(["198.51.100.2"]))  # a new one, never settled
    assert bans.expected is None and not bans.intact()


def test_a_table_the_kernel_cannot_take_is_deleted_only_to_keep_its_bans_enforced(
        monkeypatch):
    """A table that cannot be refilled is deleted and made anew; when even
    the new one fails (the kernel lacks a statement: not the table's fault),
    the bans must not go with the deleted table: a table of the ban sets and
    their drop rules is made, the bans put back, and the error raised."""
    from types import SimpleNamespace

    import portsentinel.nft as nft_module
    from portsentinel.nft import NftError
    monkeypatch.setattr(nft_module, "generation", lambda: 1)

    class Kernel(_RecordingNft):
        def run(self, commands, as_json=False, terse=False):
            if "jump trap" in commands:
                raise NftError("Error: Could not process rule: Operation not supported")
            if commands.startswith("list set"):
                raise NftError("Error: No such file or directory")
            return super().run(commands, as_json, terse)
    kernel = Kernel()
    bans = _bare_bans(kernel, "t", 1000)
    bans.banned = lambda: {"198.51.100.9": 100.0}
    put_back = []
    bans.elements = SimpleNamespace(add_each=lambda pairs: put_back.extend(pairs))
    with pytest.raises(NftError, match="not supported"):
        bans.install(KernelTrap(((1, 1023),), (), log_group=7417), 3600)
    assert kernel.batches[0] == "delete table inet t\n"
    assert "add rule inet t prerouting ip saddr @ban4 counter drop" in kernel.batches[-1]
    assert put_back == [("198.51.100.9", 100.0)]


def test_the_kernel_log_gets_its_receive_buffer_past_the_systems_default_cap():
    """net.core.rmem_max is 208 KiB on a stock Debian: a plain SO_RCVBUF
    would silently get 416 KiB there, about 500 kernel log messages (830
    bytes each), 25 ms of a 20,000-a-second flood. The daemon (root) forces
    its size past the cap."""
    import socket
    from portsentinel.nflog import KERNEL_LOG_BUFFER

    cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
    assert KERNEL_LOG_BUFFER > cap  # else this test could not fail
    log = KernelBanLog(64999, "test")  # a group no rule logs to
    try:
        assert log.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * KERNEL_LOG_BUFFER
    finally:
        log.close()


def test_a_ban_elements_counter_is_read_from_the_kernels_dump():
    """Ban effectiveness: each ban's packets dropped, from its set element's
    counter, in the kernel's two layouts (one expression, or a list)."""
    from portsentinel.netlink import attr, nested
    from portsentinel.nfnetlink import (DATA_VALUE, SET_ELEM_EXPIRATION, SET_ELEM_KEY,
                                        SET_ELEM_LIST_ELEMENTS, _elements_into)
    # the kernel's NFTA_SET_ELEM_EXPR and NFTA_SET_ELEM_EXPRESSIONS (seen in a real dump)

    def counter(packets: int) -> bytes:
        return (attr(1, b"counter\0")
                + nested(2, attr(1, struct.pack("!Q", packets * 60)),
                         attr(2, struct.pack("!Q", packets))))

    def element(ip: str, *extra: bytes) -> bytes:
        return nested(1, nested(SET_ELEM_KEY, attr(DATA_VALUE, ipaddress.ip_address(ip).packed)),
                      attr(SET_ELEM_EXPIRATION, struct.pack("!Q", 5000)), *extra)

    listed = nested(SET_ELEM_LIST_ELEMENTS,
                    element("192.0.2.1", nested(7, counter(7))),
                    element("192.0.2.2", nested(10, nested(1, counter(3)))),
                    element("192.0.2.3"))
    found = []
    _elements_into(found, listed, 0, len(listed), counted=True)
    assert [(ipaddress.ip_address(k), left, n) for k, left, n in found] == [
        (ipaddress.ip_address("192.0.2.1"), 5.0, (7, 420)),
        (ipaddress.ip_address("192.0.2.2"), 5.0, (3, 180)),
        (ipaddress.ip_address("192.0.2.3"), 5.0, None)]


def test_the_ban_sets_count_what_each_ban_drops():
    rules = "\n".join(table_commands("t", 1000, None, 3600))
    for v in ("4", "6"):
        assert re.search(rf"add set inet t ban{v} {{[^}}]*counter;", rules), rules[:800]


@pytest.mark.parametrize("sensor", [True, False])
def test_a_peers_trap_hit_is_not_banned_and_not_answered(sensor):
    """A peer's FIN/NULL/XMAS or UDP probe of a trap port: no ban (a decoy
    may use its address), and no RST or ICMP answer either (those, beside
    the real services' silence, mapped the open ports). With BLOCK_UDP="0"
    (alerts only) its UDP is answered as a stranger's is."""
    trap = KernelTrap(((1, 1023),), ((1, 1023),), 600, log_group=5, sensor=sensor,
                      ban_udp=False)
    rules = table_commands("t", 1024, trap, 60)
    assert "add rule inet t unanswered meta l4proto tcp drop" in rules
    assert not any(r.startswith("add rule inet t unanswered meta l4proto udp") for r in rules)
    peer = "add rule inet t trapped ip saddr @peers4 ip saddr != @young4 goto "
    assert peer + ("peer_hit" if sensor else "unanswered") in rules
    if sensor:
        verdicts = [r for r in rules if r.startswith("add rule inet t peer_hit ")]
        assert verdicts and all(r.endswith(" goto unanswered") for r in verdicts)
        assert rules[-1] != "add rule inet t unanswered accept"
        assert "add rule inet t unanswered accept" in rules
