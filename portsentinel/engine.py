"""The detection engine: probes in, decisions out. Pure: no I/O, no clock.

One entry for probes: `Engine.handle(probe, facts)`. `facts` answers the
questions the engine may ask about a probe (is the port served? is the source
a peer? is it a reply, a port forward's client, a ban the kernel made?); the
engine reads only what it needs, so the daemon can answer them lazily (each
may cost a kernel lookup). Bans asked for by an admin or a fleet member go
through `block` and `fleet_ban`; the policy changes through `reconfigure`.
The engine has one owner thread (the daemon's run loop).

Time is whatever the caller puts in `Probe.time` (seconds, any epoch), so the
engine is driven by tests and by kernel packet timestamps alike.

Counting (SCAN_TRIGGER): a host triggers when it has touched
max(1, scan_trigger) *distinct* ports (per protocol) within `scan_window`
seconds; repeats to one port do not add up. 0 and 1 both react on the first
probe, as in PortSentry 1.2.

Memory is bounded: pending hosts live in a fixed-capacity LRU table (the
oldest evicted first) keyed by the packed address, whose `bytes` hash is
randomised per process (SipHash), so attackers cannot aim collisions at it.
The ban and offender tables are bounded the same way.

Escalation: a host's n-th ban lasts ban_time * ban_time_increment**(n-1),
capped at ban_time_max (like fail2ban's bantime.increment).

Spoofing: SYN/FIN/NULL/XMAS/UDP probes can carry any source address. When the
source is a peer (it completed a TCP handshake with us recently, which a blind
spoofer cannot do), such probes give DECOY, not BLOCK. A completed handshake
to a trap port (tcp mode, Kind.CONNECT) is always bannable. A token bucket
(ban_rate, ban_burst) caps new bans: past it, RATE_LIMITED: detected and
reported, not banned, so a spoofed flood cannot fill the firewall.

Slow scans: every TCP first contact the packet sensor sees is a trial for the
sequential test (trw.py): success when a service answers the port. A failed
first contact is judged `trial_delay` later (the decision says so with
`recheck_after`), when connection tracking surely knows whether destination
NAT forwarded it.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

from .addrset import Address, AddressSet
from .trw import SequentialDetector, TrwParameters

TCP = "tcp"
UDP = "udp"
IP = "ip"  # any other IP protocol (a probe's port is then the protocol number)
# the other transports with ports (Kind.TRANSPORT's protocols): number, and the
# name that both our lines and /proc/net/protocols use
TRANSPORTS = {"sctp": (132, "SCTP"), "udplite": (136, "UDP-Lite"), "dccp": (33, "DCCP")}
# stateless evidence (ACK family, protocols, transports' ports) is remembered this
# many windows after a source's last probe: pausing between rounds earns nothing
EVIDENCE_WINDOWS = 5

# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


class Kind(enum.Enum):
    CONNECT = "connect"  # a completed handshake / a datagram to a bound port
    SYN = "syn"
    FIN = "fin"
    NULL = "null"
    XMAS = "xmas"
    OTHER = "other"  # any other flag mix without ACK/RST
    ACK = "ack"  # ACK without RST that matches no connection (nmap -sA, -sW, -sM)
    PROTOCOL = "protocol"  # an IP protocol other than TCP, UDP, ICMP (nmap -sO)
    TRANSPORT = "transport"  # an SCTP INIT, UDP-Lite datagram or DCCP Request (nmap -sY)
    FRAGMENT = "fragment"  # a TCP header split across fragments (nmap -f): flags unseen
    UDP = "udp"  # a datagram seen by the packet sensor


STATELESS_EVIDENCE = (Kind.ACK, Kind.PROTOCOL, Kind.TRANSPORT)  # one proves nothing


def classify_tcp(flags: int) -> Kind:
    """Name a stealth TCP probe by its flags, as PortSentry 1.2 does."""
    significant = flags & (FIN | SYN | RST | PSH | ACK | URG)
    if significant == SYN:
        return Kind.SYN
    if significant == FIN:
        return Kind.FIN
    if significant == 0:
        return Kind.NULL
    if significant == FIN | URG | PSH:
        return Kind.XMAS
    if significant & (SYN | FIN) == SYN | FIN:  # no stack sends it, ACK or not: the
        return Kind.OTHER                        # kernel bans it at once (ruleset.BOGUS_FLAGS)
    if significant & (ACK | RST) == ACK:  # SYN+ACK too: unsolicited, it is the same probe
        return Kind.ACK
    return Kind.OTHER


@dataclass(frozen=True, slots=True)
class Probe:
    source: Address
    port: int
    protocol: str  # TCP, UDP, IP; for Kind.TRANSPORT: "sctp", "udplite", "dccp"
    kind: Kind
    time: float
    flags: int = 0
    ip_options: bool = False
    trap: bool = True  # False: a port outside the traps (seen for the sequential test only)
    source_port: int = 0  # with `destination`: lets the daemon ask conntrack "a reply?"
    destination: Address | None = None


@dataclass(frozen=True)
class Facts:
    """What the daemon knows of a probe. The engine reads only the fields it
    needs; the daemon passes an object with the same attributes that looks
    each one up on first use."""

    served: bool = False  # a local socket serves the port (or did, SERVICE_MEMORY)
    peer: bool = False  # the source completed a TCP handshake with us lately
    reply: bool = False  # connection tracking: an answer to this host's own traffic
    forwarded: bool = False  # connection tracking: destination NAT forwarded it
    kernel_decides: bool = False  # the kernel trap judges strangers' trap hits (NFLOG reports)
    banned_by_kernel: bool = False  # the kernel trap banned the source for this probe
    young: bool = False  # first sight: too early to know whether NAT forwarded it


NO_FACTS = Facts()


class Verdict(enum.Enum):
    IGNORED = "ignored"  # source is in the never-block set
    PENDING = "pending"  # counted, below SCAN_TRIGGER
    ALERT = "alert"  # triggered; BLOCK_* = 0 says log only
    BLOCK = "block"  # triggered; run `actions` in order
    ALREADY_BLOCKED = "already_blocked"
    DECOY = "decoy"  # triggered by stateless probes from a peer: logged, not blocked
    RATE_LIMITED = "rate_limited"  # triggered, but the ban rate limit is reached
    REPLY = "reply"  # an answer to this host's own traffic: no probe
    FORWARDED = "forwarded"  # a client of a port forward (DNAT): no probe
    REFUSED = "refused"  # a ban asked for that cannot be (see Order.error)


# Evidence grades: what made a ban (shown with it; BAN_TIME_BY_EVIDENCE maps them).
HANDSHAKE = "handshake"  # a completed TCP handshake to a trap port: the source is real
REPEATED = "repeated"  # several stateless probes: SCAN_TRIGGER, ACK / protocol scans, slow scans
SINGLE = "single"  # one stateless probe (its source could be spoofed)
FLEET = "fleet"  # the fleet's correlation (trap hits on several members); or a shared
#                  ban that came without a grade
MANUAL = "manual"  # an admin's
GRADES = (HANDSHAKE, REPEATED, SINGLE, FLEET, MANUAL)

# Action names, in the order they are run.
NFTABLES = "nftables"
HOSTS_DENY = "hosts_deny"
KILL_ROUTE = "kill_route"
RUN_CMD = "run_cmd"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    probe: Probe
    actions: tuple[str, ...] = ()
    report: bool = True  # False: a repeat that should not be logged again
    ban_seconds: float = 0.0  # BLOCK: how long (0 = forever), escalated for repeat offenders
    escalated: bool = False  # BLOCK: not BAN_TIME, so it replaces the kernel trap's timeout
    slow_scan: int = 0  # > 0: decided by the sequential test after this many failed contacts
    recheck_after: float = 0.0  # > 0: hand the probe in again this much later, not young
    evidence: str = ""  # BLOCK: its grade (GRADES)
    # PENDING: a trap hit below SCAN_TRIGGER, evidence for the fleet (a failed first
    # contact to a port outside the traps is not: a monitor checking a port that
    # no member serves would be banned fleet-wide)
    fleet_evidence: bool = False


@dataclass(frozen=True, slots=True)
class Order:
    """The engine's answer to a ban asked for by an admin or a fleet member."""

    verdict: Verdict  # BLOCK, ALREADY_BLOCKED (its time set anew), IGNORED, REFUSED
    address: Address
    since: float = 0.0
    until: float | None = None  # None = forever
    actions: tuple[str, ...] = ()
    ban_seconds: float = 0.0  # from now; 0 = forever
    error: str = ""
    evidence: str = ""  # BLOCK: MANUAL, or the grade a fleet member gave it


@dataclass(frozen=True)
class Policy:
    """What the engine needs from the configuration."""

    scan_trigger: int = 0
    scan_window: float = 300.0
    block_tcp: int = 1  # 0 log only, 1 all actions, 2 KILL_RUN_CMD only
    block_udp: int = 1
    nftables: bool = True
    hosts_deny: bool = False
    kill_route: bool = False
    run_cmd: bool = False
    run_cmd_first: bool = False
    ban_time: float = 0.0  # seconds; 0 = forever
    ban_time_increment: float = 1.0  # each earlier ban multiplies the next by this
    ban_time_max: float = 30 * 86400.0
    host_capacity: int = 65536
    ban_capacity: int = 262_144  # as many as the kernel sets hold
    repeat_report_interval: float = 60.0
    never_block: AddressSet = field(default_factory=AddressSet)
    decoy_grace: bool = True  # peers are not banned on stateless probes alone
    ban_rate: float = 0.0  # new bans per second at most; 0 = unlimited
    ban_burst: int = 1
    trial_delay: float = 0.05  # a failed first contact is judged this much later
    ack_scan_trigger: int = 5  # distinct ports an ACK-family scan must touch; 0 = off
    ack_scan_window: float = 60.0  # ... within this many seconds
    proto_scan_trigger: int = 4  # distinct IP protocols (other than TCP/UDP/ICMP); 0 = off
    proto_scan_window: float = 60.0
    ban_time_by_evidence: dict = field(default_factory=dict)  # grade -> seconds (0 = forever)

    def ban_seconds(self, earlier_bans: int, evidence: str = "") -> float:
        base = self.ban_time_by_evidence.get(evidence, self.ban_time)
        if base <= 0:
            return 0.0
        scaled = base * self.ban_time_increment ** min(earlier_bans, 64)
        return min(scaled, max(self.ban_time_max, base))

    def firewall_actions(self) -> tuple[str, ...]:
        """The blocking actions as configured (manual and fleet bans run these)."""
        return tuple(a for a, on in ((NFTABLES, self.nftables), (HOSTS_DENY, self.hosts_deny),
                                     (KILL_ROUTE, self.kill_route)) if on)

    @cached_property
    def _actions(self) -> dict[str, tuple[str, ...]]:
        return {TCP: self._actions_for(TCP), UDP: self._actions_for(UDP)}

    def actions_for(self, protocol: str) -> tuple[str, ...]:
        """A scan's actions: asked for every ban, so worked out once (frozen)."""
        return self._actions[UDP if protocol == UDP else TCP]  # IP protocol scans: BLOCK_TCP

    def _actions_for(self, protocol: str) -> tuple[str, ...]:
        level = self.block_tcp if protocol == TCP else self.block_udp
        if level == 2:
            return (RUN_CMD,) if self.run_cmd else ()
        if level != 1:
            return ()
        firewall = self.firewall_actions()
        if not self.run_cmd:
            return firewall
        if self.run_cmd_first:
            return (RUN_CMD, *firewall)
        return (*firewall, RUN_CMD)


@dataclass(slots=True)
class Ban:
    address: Address
    since: float
    until: float | None  # None = forever
    last_report: float


def _key(address: Address) -> bytes:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.packed


def _grade(probe: Probe, repeated: bool) -> str:
    """The evidence grade of a ban made for `probe` (`repeated`: it took several)."""
    return HANDSHAKE if probe.kind is Kind.CONNECT else REPEATED if repeated else SINGLE


def _not_a_host(address: Address) -> bool:
    return (address.is_multicast or address.is_unspecified
            or address == ipaddress.IPv4Address("255.255.255.255"))


class TokenBucket:
    """BAN_RATE_LIMIT: at most `rate` new bans a second, `burst` at once; time
    comes from the probes (the policy may change the rate on reload)."""

    def __init__(self, burst: int):
        self.tokens, self.at = float(burst), None

    def take(self, now: float, rate: float, burst: int) -> bool:
        if rate <= 0:
            return True
        if self.at is not None and now > self.at:
            self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        # probes come slightly out of order (max keeps the bucket monotonic), but
        # a clock stepped back by more than a second restarts the bucket's time
        # there, or it would not refill until the clock caught up
        if self.at is None or now < self.at - 1.0:
            self.at = now
        else:
            self.at = max(now, self.at)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Engine:
    def __init__(self, policy: Policy, trw: TrwParameters | None = None):
        self.policy = policy
        self.sequential = None if trw is None else SequentialDetector(trw)  # slow scans
        # key -> {(protocol, port): last seen}
        self._pending: OrderedDict[bytes, dict[tuple[str, int], float]] = OrderedDict()
        self._acks: OrderedDict[bytes, dict[tuple[str, int], float]] = OrderedDict()
        self._protocols: OrderedDict[bytes, dict[tuple[str, int], float]] = OrderedDict()
        self._transports: OrderedDict[bytes, dict[tuple[str, int], float]] = OrderedDict()
        self._bans: OrderedDict[bytes, Ban] = OrderedDict()
        self._offences: OrderedDict[bytes, int] = OrderedDict()  # earlier bans per host
        self._decoys: OrderedDict[bytes, float] = OrderedDict()  # host -> last reported
        self._bucket = TokenBucket(policy.ban_burst)
        self._limit_reported = float("-inf")

    def reconfigure(self, policy: Policy, trw: TrwParameters | None) -> None:
        """A new policy (reload, never-block list changed); counts and bans
        are kept, and so is the slow-scan state unless its parameters changed."""
        self.policy = policy
        if trw is None:
            self.sequential = None
        elif self.sequential is None or self.sequential.p != trw:
            self.sequential = SequentialDetector(trw)

    # -- probes -----------------------------------------------------------
    def handle(self, probe: Probe, facts=NO_FACTS) -> Decision:
        """The one entry for a probe: its decision."""
        if facts.banned_by_kernel:
            return self._kernel_ban(probe)
        decision = self._check(probe)
        if decision is not None:
            return decision
        if probe.kind is Kind.ACK:  # over the windows the kernel's bucket remembers: a
            # scan a little slower than its refill (one port a window) is banned here
            return self._evidence(probe, facts, self._acks, self.policy.ack_scan_trigger,
                                  self.policy.ack_scan_window * EVIDENCE_WINDOWS)
        if probe.kind is Kind.PROTOCOL:
            return self._evidence(probe, facts, self._protocols,
                                  self.policy.proto_scan_trigger, self.policy.proto_scan_window)
        if probe.kind is Kind.TRANSPORT:  # ports of SCTP, UDP-Lite, DCCP: judged here alone
            return self._evidence(probe, facts, self._transports, self.policy.ack_scan_trigger,
                                  self.policy.ack_scan_window * EVIDENCE_WINDOWS)
        stateless = probe.kind is not Kind.CONNECT
        counted = None
        if probe.trap and not facts.served:
            peer = stateless and self.policy.decoy_grace and facts.peer
            if stateless and not peer and facts.kernel_decides:
                pass  # the kernel trap judges it (after NAT, replies spared); NFLOG reports it
            elif stateless and facts.reply:
                return Decision(Verdict.REPLY, probe, report=False)
            elif stateless and facts.forwarded:
                return Decision(Verdict.FORWARDED, probe, report=False)
            else:
                counted = self._count(probe, peer)
                if counted.verdict is not Verdict.PENDING:
                    return counted
                # below SCAN_TRIGGER here: evidence for the fleet, unless a peer's (a
                # client's mistyped port, even through the challenge, is no sweep)
                if not (self.policy.decoy_grace and facts.peer):
                    counted = dataclasses.replace(counted, fleet_evidence=True)
        contact = self._first_contact(probe, facts)
        if contact is None:
            return counted or Decision(Verdict.PENDING, probe)
        if counted is not None and counted.fleet_evidence and contact.verdict is Verdict.PENDING:
            contact = dataclasses.replace(contact, fleet_evidence=True)  # judged again later
        return contact

    def _check(self, probe: Probe) -> Decision | None:
        """The cheap part: IGNORED or ALREADY_BLOCKED, else None (count it)."""
        if probe.source in self.policy.never_block:
            return Decision(Verdict.IGNORED, probe)
        key = _key(probe.source)
        ban = self._bans.get(key)
        if ban is not None:
            if ban.until is None or probe.time < ban.until:
                return self._repeat(ban, probe)
            del self._bans[key]
        return None

    def _count(self, probe: Probe, peer: bool) -> Decision:
        """Count a trap hit; maybe trigger."""
        key = _key(probe.source)
        if not self._triggered(key, probe):
            return Decision(Verdict.PENDING, probe)
        return self._decide(key, probe, peer, _grade(probe, self.policy.scan_trigger > 1))

    def _evidence(self, probe: Probe, facts, table: OrderedDict, trigger: int,
                  window: float) -> Decision:
        """A probe that alone proves nothing: an ACK that matches no
        connection, to a port nothing serves (late ACKs after connection
        tracking forgot a connection are normal), or a packet of an IP
        protocol such as GRE or ESP (a tunnel's). Only `trigger` distinct
        ports (protocols) within `window` ban, and never a peer's (a
        spoofable, stateless probe)."""
        if not trigger or facts.served:
            return Decision(Verdict.PENDING, probe, report=False)
        key = _key(probe.source)
        if not self._distinct(table, key, probe, trigger, window):
            return Decision(Verdict.PENDING, probe, report=False)
        if facts.peer:
            return Decision(Verdict.DECOY, probe, report=self._decoy_report(key, probe.time))
        return self._decide(key, probe, False, REPEATED)

    def _kernel_ban(self, probe: Probe) -> Decision:
        """The kernel trap banned `probe.source` by itself: BLOCK (record it, with
        the escalated length and the configured actions), ALREADY_BLOCKED when
        known, IGNORED when it must never be blocked (the caller lifts it)."""
        if probe.source in self.policy.never_block:
            return Decision(Verdict.IGNORED, probe)
        if self.is_blocked(probe.source):
            return Decision(Verdict.ALREADY_BLOCKED, probe, report=False)
        evidence = _grade(probe, probe.kind in STATELESS_EVIDENCE)  # their evidence chains
        return self._ban_decision(probe, self.policy.actions_for(probe.protocol), evidence)

    def _first_contact(self, probe: Probe, facts) -> Decision | None:
        """A TCP first-contact trial for the sequential test (stateless probes
        only: the packet sensor sees every SYN)."""
        if self.sequential is None or probe.protocol != TCP or probe.kind is Kind.CONNECT:
            return None
        served = facts.served or (not facts.young and facts.forwarded)
        if not served and facts.young:
            return Decision(Verdict.PENDING, probe, report=False,
                            recheck_after=self.policy.trial_delay)
        key = _key(probe.source)
        failures = self.sequential.contact(key, probe.port, served, probe.time)
        if failures is None:
            return None
        peer = self.policy.decoy_grace and facts.peer
        return dataclasses.replace(self._decide(key, probe, peer, REPEATED), slow_scan=failures)

    def _decide(self, key: bytes, probe: Probe, peer: bool, evidence: str) -> Decision:
        """A source was found scanning: decoy, alert only, rate limited, or ban."""
        if peer and probe.kind is not Kind.CONNECT:
            return Decision(Verdict.DECOY, probe, report=self._decoy_report(key, probe.time))
        actions = self.policy.actions_for(probe.protocol)
        if not actions:
            return Decision(Verdict.ALERT, probe)
        if not self._bucket.take(probe.time, self.policy.ban_rate, self.policy.ban_burst):
            report = probe.time - self._limit_reported >= 1.0
            if report:
                self._limit_reported = probe.time
            return Decision(Verdict.RATE_LIMITED, probe, report=report)
        return self._ban_decision(probe, actions, evidence)

    def _ban_decision(self, probe: Probe, actions: tuple[str, ...], evidence: str) -> Decision:
        seconds = self._ban(probe.source, probe.time, evidence=evidence)
        return Decision(Verdict.BLOCK, probe, actions, ban_seconds=seconds,
                        escalated=seconds != self.policy.ban_time, evidence=evidence)

    def _decoy_report(self, key: bytes, now: float) -> bool:
        last = self._decoys.pop(key, float("-inf"))
        report = now - last >= self.policy.repeat_report_interval
        self._decoys[key] = now if report else last
        if len(self._decoys) > self.policy.host_capacity:
            self._decoys.popitem(last=False)
        return report

    def _repeat(self, ban: Ban, probe: Probe) -> Decision:
        report = probe.time - ban.last_report >= self.policy.repeat_report_interval
        if report:
            ban.last_report = probe.time
        return Decision(Verdict.ALREADY_BLOCKED, probe, report=report)

    def _triggered(self, key: bytes, probe: Probe) -> bool:
        threshold = max(1, self.policy.scan_trigger)
        if threshold == 1:
            return True
        return self._distinct(self._pending, key, probe, threshold, self.policy.scan_window)

    def _distinct(self, table: OrderedDict, key: bytes, probe: Probe, threshold: int,
                  window: float) -> bool:
        """Has the source touched `threshold` distinct ports within `window`
        (counting this probe)? Then it is forgotten in `table` (an LRU table)."""
        ports = table.get(key)
        if ports is None:
            ports = table[key] = {}
            if len(table) > self.policy.host_capacity:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        horizon = probe.time - window
        for seen_key in [k for k, t in ports.items() if t < horizon]:
            del ports[seen_key]
        ports[(probe.protocol, probe.port)] = probe.time
        if len(ports) < threshold:
            return False
        del table[key]
        return True

    # -- bans asked for: an admin, a fleet member ---------------------------
    def block(self, address: Address, now: float, seconds: float | None = None,
              recorded: tuple[float, float | None] | None = None) -> Order:
        """An admin's ban, escalated unless `seconds` is given. An address
        blocked already (here, or `recorded` (since, until) in the state) only
        gets its ban time set: `seconds` if given, else a manual ban's (the
        manual grade's time, else BAN_TIME; not escalated) unless it ends
        sooner than the ban in force (a block keeps a host out, it never
        shortens its ban): no action runs twice."""
        refused = self._refusal(address)
        if refused:
            return Order(Verdict.REFUSED, address, now, error=refused)
        if recorded is not None and self._active(address, now) is None:
            self.restore(address, *recorded)
        ban = self._active(address, now)
        if ban is not None:
            if seconds is not None:
                length = float(seconds)
            elif ban.until is None:
                length = 0.0  # forever stays forever
            else:
                length = self.policy.ban_time_by_evidence.get(MANUAL, self.policy.ban_time)
                if length and now + length < ban.until:
                    length = ban.until - now  # never shortened
            ban.until = now + length if length else None
            return Order(Verdict.ALREADY_BLOCKED, address, ban.since, ban.until,
                         ban_seconds=length)
        return self._order(address, now, seconds, MANUAL)

    def fleet_ban(self, address: Address, now: float, until: float | None,
                  evidence: str = FLEET) -> Order:
        """A fleet member's ban: applied here unless known, over, or never
        blocked; it keeps the grade its member gave it."""
        if until is not None and until <= now:
            return Order(Verdict.IGNORED, address, now)
        if self._active(address, now) is not None:
            return Order(Verdict.ALREADY_BLOCKED, address, now)
        if address in self.policy.never_block:
            return Order(Verdict.IGNORED, address, now, error="never blocked here")
        refused = self._refusal(address)
        if refused:
            return Order(Verdict.REFUSED, address, now, error=refused)
        return self._order(address, now, 0.0 if until is None else until - now,
                           evidence if evidence in GRADES else FLEET)

    def fleet_correlation(self, address: Address, now: float, peer: bool) -> Order:
        """The fleet's evidence (trap hits on several members) says `address`
        scans: a detection like a scan here, so BLOCK_TCP's actions, the ban
        rate limit, the grade's ban time and escalation apply; never a peer
        (the evidence is stateless probes: a decoy's source can be forged)."""
        if self._active(address, now) is not None:
            return Order(Verdict.ALREADY_BLOCKED, address, now)
        refused = self._refusal(address)
        if refused:
            return Order(Verdict.IGNORED, address, now, error=refused)
        if peer and self.policy.decoy_grace:
            return Order(Verdict.DECOY, address, now, error="it completed a TCP handshake "
                         "with this host lately (the evidence is spoofable probes)")
        actions = tuple(a for a in self.policy.actions_for(TCP) if a != RUN_CMD)
        if not actions:
            return Order(Verdict.ALERT, address, now, error="BLOCK_TCP says log only")
        if not self._bucket.take(now, self.policy.ban_rate, self.policy.ban_burst):
            return Order(Verdict.RATE_LIMITED, address, now, error="the ban rate limit "
                         f"({self.policy.ban_rate:g}/s) is reached")
        length = self._ban(address, now, None, FLEET)
        return Order(Verdict.BLOCK, address, now, now + length if length else None, actions,
                     length, evidence=FLEET)

    def _refusal(self, address: Address) -> str:
        if address in self.policy.never_block:
            return (f"{address} is never blocked (this host, its gateways and resolvers, "
                    "loopback or the ignore files)")
        if _not_a_host(address):
            return (f"{address} is not a host that can send a probe "
                    "(multicast, broadcast or unspecified)")
        return ""

    def _order(self, address: Address, now: float, seconds: float | None,
               evidence: str) -> Order:
        actions = self.policy.firewall_actions()  # KILL_RUN_CMD is for scans only
        if not actions:
            return Order(Verdict.REFUSED, address, now,
                         error=f"could not block {address}: no block action is configured")
        length = self._ban(address, now, seconds, evidence)
        return Order(Verdict.BLOCK, address, now, now + length if length else None, actions,
                     length, evidence=evidence)

    # -- the ban table ------------------------------------------------------
    def _ban(self, address: Address, now: float, seconds: float | None = None,
             evidence: str = "") -> float:
        """Record a ban; its length (BAN_TIME, or its grade's) is escalated
        unless `seconds` is given. Returns the length (0 = forever)."""
        key = _key(address)
        earlier = self._offences.pop(key, 0)
        self._offences[key] = earlier + 1
        if len(self._offences) > self.policy.ban_capacity:
            self._offences.popitem(last=False)
        if seconds is None:
            seconds = self.policy.ban_seconds(earlier, evidence)
        until = now + seconds if seconds > 0 else None
        self._bans.pop(key, None)
        self._bans[key] = Ban(address, now, until, now)
        if len(self._bans) > self.policy.ban_capacity:
            self._bans.popitem(last=False)
        return seconds

    def _active(self, address: Address, now: float) -> Ban | None:
        ban = self._bans.get(_key(address))
        return ban if ban is not None and (ban.until is None or ban.until > now) else None

    def restore(self, address: Address, since: float, until: float | None) -> None:
        """A ban made earlier (the state at start, one found in the firewall)."""
        self._bans[_key(address)] = Ban(address, since, until, since)

    def restore_many(self, bans) -> None:
        """(address, since, until) of many bans made earlier (a restart)."""
        for address, since, until in bans:
            self._bans[_key(address)] = Ban(address, since, until, since)

    def restore_offences(self, counts: dict[Address, int]) -> None:
        for address, count in counts.items():
            self._offences[_key(address)] = count

    def lift(self, address: Address, pardon: bool = False, since: float | None = None) -> bool:
        """Drop a ban (lifted, or every action failed so the next probe retries).
        `pardon`: an admin says it was a mistake, so the next ban is a first one.
        `since`: only the ban that started then (a newer one stays)."""
        key = _key(address)
        if pardon:  # and what counted toward its ban counts no more
            self._offences.pop(key, None)
            self._acks.pop(key, None)
            self._protocols.pop(key, None)
            self._transports.pop(key, None)
            self._pending.pop(key, None)
        ban = self._bans.get(key)
        if ban is None or (since is not None and ban.since != since):
            return False
        del self._bans[key]
        return True

    def is_blocked(self, address: Address) -> bool:
        return _key(address) in self._bans

    def expired(self, now: float) -> list[Address]:
        """Bans whose time is up, removed from the table."""
        gone = [k for k, b in self._bans.items() if b.until is not None and b.until <= now]
        return [self._bans.pop(k).address for k in gone]

    def bans(self) -> list[Ban]:
        return list(self._bans.values())

    @property
    def pending_hosts(self) -> int:
        return len(self._pending)
