"""Our nftables table as text: pure, so the rules are tested without root.

The table `inet <name>` holds:
- `ban4`/`ban6`: banned sources, with per-element timeouts; dropped in
  prerouting (priority raw), before connection tracking.
- the kernel trap (optional): in the input hook, a TCP packet without ACK/RST
  or a UDP datagram to a trap port that no local socket serves adds its
  source to the ban set right there, so the very next packet is dropped. The
  never-block sets are checked first; a reply to this host's own traffic is
  never a probe. Each ban the kernel makes is also sent to the daemon (NFLOG
  group), which logs and records it like its own.
- peers (a completed handshake lately) and the challenge: a peer's stateless
  probe may carry a spoofed source, so it is redirected to a catch-all socket,
  and only a completed handshake there bans.
- the first-contact hold (optional): a stranger's SYN to a served port waits
  in a netfilter queue for a few milliseconds, so a scan's trap hit meanwhile
  bans it before a real port answers (see `_hold`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import EVIDENCE_WINDOWS, TRANSPORTS as TRANSPORT_PROTOCOLS

PEER_MATURITY = 2  # seconds after its first completed handshake before a host is a peer
LOG_PREFIX = "portsentinel ban"  # NFLOG prefix of the kernel's own bans
# what the kernel sensor logs for userspace (with `sensor`), judged as far as it can:
HIT_PREFIX = "portsentinel hit"  # a stranger's trap hit userspace decides (no kernel ban)
PEER_HIT_PREFIX = "portsentinel peer"  # a mature peer's trap hit (maybe a decoy's)
CONTACT_PREFIX = "portsentinel contact"  # a first SYN to a port nothing serves
SERVED_PREFIX = "portsentinel served"  # a first SYN to a served port
ACK_PREFIX = "portsentinel ack"  # an ACK matching no connection, to an unserved trap port
PROTO_PREFIX = "portsentinel proto"  # a packet of another IP protocol than TCP, UDP, ICMP
TRANSPORT_PREFIX = "portsentinel port"  # an SCTP INIT, UDP-Lite datagram, DCCP Request: unserved port
PORT_SCAN_PREFIX = "portsentinel port scan"  # ... past the source's bucket: own log limit
UNREPORTED_PREFIX = "portsentinel unreported"  # evidence past ACK_RATE went untold (a second's)
TRANSPORTS = tuple(TRANSPORT_PROTOCOLS)  # the other transports with ports, judged per port
ANSWER_MEMORY = "10m"  # what answers this host's own packet of those, this long after it
KNOWN_PROTOCOLS = "{ tcp, udp, icmp, ipv6-icmp }"  # what the other rules judge
ACK_RATE_PER_SECOND = 2000  # a spoofed ACK flood: userspace's work bounded
ACK_RATE = f"{ACK_RATE_PER_SECOND}/second burst {ACK_RATE_PER_SECOND} packets"
BUCKET_MEMORY = EVIDENCE_WINDOWS  # windows a source's bucket is remembered after its last probe
HIT_RATE = "20/second burst 40 packets"
# A source is forgotten by the hit meter once its bucket (HIT_RATE) is full
# again: remembering it longer changes nothing but fills the set. 262,144
# sources for 2 s each: 131,072 new sources a second before it is full.
HIT_MEMORY, HIT_METER_SIZE = "2s", 262144
HIT_OVERFLOW_RATE = "20000/second burst 20000 packets"  # a source the full meter cannot take
HOLD_CHAIN = "held"  # its one rule, the queue statement, is added apart (nft.py)
HOLD_ON_KEY = 6  # the element of `alive` (an inet_proto set): the daemon holds
STRANGER_CHAIN = "stranger"  # a stranger's SYN to a served port: hold it, or let it pass
HOLD_GRACE = 0.5  # s past its hold: a source not released by then passes (fail-open)
LAPSE_MEMORY = "10s"  # a source held this lately and not released passes at once
CONTACT_MEMORY = "10m"  # a (source, port) pair is logged once in this long
SYN_ONLY = "tcp flags & (syn | ack | rst | fin) == syn"
FAMILIES = (("4", "ipv4", "ip saddr"), ("6", "ipv6", "ip6 saddr"))


@dataclass(frozen=True)
class KernelTrap:
    """Trap ports per protocol as (first, last) ranges; empty = no trap."""

    tcp: tuple[tuple[int, int], ...] = ()
    udp: tuple[tuple[int, int], ...] = ()
    peer_memory: float = 0  # > 0: remember handshake peers; the trap spares them
    ban_rate: tuple[float, int] = (0.0, 0)  # (per second, burst); 0 = unlimited
    ban_tcp: bool = True  # ban trap hits in the kernel (else: only the sets and challenge)
    ban_udp: bool = True
    challenge_port: int = 0  # > 0: a peer's SYN to a TCP trap port is redirected here
    first_contact_delay: bool = False  # drop a stranger's first SYN to a served port once
    log_group: int = 0  # > 0: every kernel ban is reported to the daemon on this NFLOG group
    sensor: bool = False  # the kernel is the sensor: what userspace must see is logged
    contacts: bool = False  # with `sensor`: first SYNs too (the slow-scan test)
    hold_queue: int = 0  # > 0: a stranger's first SYN to a served port waits on this queue
    hold_rate: int = 0  # with hold_queue: SYNs held per second at most (0: no limit)
    ack_window: float = 0  # > 0, with `sensor`: ACK-family probes logged, each (source, port) once in this long
    ack_trigger: int = 0  # >= 2, with ack_window and ban_tcp: this many distinct ports ban in the kernel
    proto_window: float = 0  # > 0, with `sensor`: other IP protocols logged, each (source, protocol) once in this long
    proto_trigger: int = 0  # >= 2, with proto_window and ban_tcp: this many distinct protocols ban in the kernel
    hold_seconds: float = 0.0  # with hold_queue: how long a SYN waits (FIRST_CONTACT_HOLD)
    service_memory: float = 0.0  # > 0: a served port a client's packet reached goes to served_*
    transports: tuple[str, ...] = ()  # with ack_window: of TRANSPORTS, those judged per port
    local_ports: tuple[int, int] = (32768, 60999)  # ip_local_port_range: no transport trap there


def port_ranges(ports) -> tuple[tuple[int, int], ...]:
    ranges: list[list[int]] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1][1] = port
        else:
            ranges.append([port, port])
    return tuple((a, b) for a, b in ranges)


def elements(ranges, fmt) -> str:
    return ", ".join(fmt(a) if a == b else f"{fmt(a)}-{fmt(b)}" for a, b in ranges)


def limit(rate: tuple[float, int]) -> str:
    per_second, burst = rate
    if per_second >= 1:
        return f"{int(per_second)}/second burst {max(1, burst)} packets"
    if per_second * 60 >= 1:
        return f"{int(per_second * 60)}/minute burst {max(1, burst)} packets"
    return f"{max(1, int(per_second * 3600))}/hour burst {max(1, burst)} packets"


def table_commands(t: str, set_size: int, trap: KernelTrap | None, ban_time: float) -> list[str]:
    """One transaction that creates or refreshes table `t`: sets kept (their
    bans survive a restart), chains flushed and filled anew."""
    commands = _sets(t, set_size) + _chains(t)
    if trap is None:
        return commands
    sensed = trap.sensor and trap.log_group
    if sensed:
        commands += _sensor_sets(t)
    expiry = f" timeout {int(ban_time)}s" if ban_time > 0 else ""
    log = f' log group {int(trap.log_group)} prefix "{LOG_PREFIX}"' if trap.log_group else ""
    if trap.peer_memory > 0:
        commands += _peers(t, trap.peer_memory)
    if trap.tcp:
        commands.append(f"add element inet {t} trap_tcp {{ {elements(trap.tcp, str)} }}")
    if trap.udp:
        commands.append(f"add element inet {t} trap_udp {{ {elements(trap.udp, str)} }}")
    challenged = trap.challenge_port and trap.tcp and trap.peer_memory > 0
    if challenged:
        commands += _challenge(t, trap.challenge_port, _hit_log(t, trap) if sensed else [])
    ban_tcp, ban_udp = bool(trap.tcp and trap.ban_tcp), bool(trap.udp and trap.ban_udp)
    if ban_tcp and challenged:
        commands += _challenge_bans(t, trap, expiry, log)
    if sensed:
        commands += _sensed_trap(t, trap, ban_tcp, ban_udp, expiry, log)
    elif ban_tcp or ban_udp:
        commands += _trap(t, trap, ban_tcp, ban_udp, expiry, log)
    return commands


def bridge_commands(t: str, set_size: int) -> list[str]:
    """The `bridge <t>` table (bridges.py): copies of the ban sets, with
    counters, looked up for each IP frame a bridge forwards past the IP
    hooks; counted, never dropped (the hosts behind a bridge are not ours)."""
    copy = "flags timeout; counter;"
    return [f"add table bridge {t}",
            f"add set bridge {t} ban4 {{ type ipv4_addr; {copy} size {set_size}; }}",
            f"add set bridge {t} ban6 {{ type ipv6_addr; {copy} size {set_size}; }}",
            f"add chain bridge {t} forward {{ type filter hook forward priority -200; "
            "policy accept; }",
            f"flush chain bridge {t} forward",
            f"add rule bridge {t} forward ether type ip ip saddr @ban4",
            f"add rule bridge {t} forward ether type ip6 ip6 saddr @ban6"]


def _sets(t: str, set_size: int) -> list[str]:
    dynamic = "flags dynamic, timeout;"
    return [
        f"add table inet {t}",
        # each ban counts what it drops (`list`: ban effectiveness)
        f"add set inet {t} ban4 {{ type ipv4_addr; {dynamic} size {set_size}; counter; }}",
        f"add set inet {t} ban6 {{ type ipv6_addr; {dynamic} size {set_size}; counter; }}",
        f"add set inet {t} never4 {{ type ipv4_addr; flags interval; }}",
        f"add set inet {t} never6 {{ type ipv6_addr; flags interval; }}",
        f"add set inet {t} trap_tcp {{ type inet_service; flags interval; }}",
        f"add set inet {t} trap_udp {{ type inet_service; flags interval; }}",
        f"add set inet {t} peers4 {{ type ipv4_addr; {dynamic} size 65536; }}",
        f"add set inet {t} peers6 {{ type ipv6_addr; {dynamic} size 65536; }}",
        f"add set inet {t} young4 {{ type ipv4_addr; {dynamic} size 65536; }}",
        f"add set inet {t} young6 {{ type ipv6_addr; {dynamic} size 65536; }}",
        f"add set inet {t} met4 {{ type ipv4_addr . inet_service; {dynamic} size 262144; }}",
        f"add set inet {t} met6 {{ type ipv6_addr . inet_service; {dynamic} size 262144; }}",
        # ports a service used lately (SERVICE_MEMORY): a restarting service is no
        # trap; the daemon's poll and the trap (a client's packet) fill them
        f"add set inet {t} served_tcp {{ type inet_service; {dynamic} size 65536; }}",
        f"add set inet {t} served_udp {{ type inet_service; {dynamic} size 65536; }}",
        *(f"add set inet {t} served_{name} {{ type inet_service; flags timeout; size 65536; }}"
          for name in TRANSPORTS),  # no socket lookup for these: the daemon fills them
        # completed challenges, per connection: only its first ACK may ban
        f"add set inet {t} chal4 {{ type ipv4_addr . inet_service; {dynamic} size 65536; }}",
        f"add set inet {t} chal6 {{ type ipv6_addr . inet_service; {dynamic} size 65536; }}",
        # the first-contact hold: sources whose hold has passed; its on switch;
        # sources being held (their later SYNs too), held lately, and held but
        # never released (they passed: the daemon stalled)
        f"add set inet {t} clear4 {{ type ipv4_addr; flags timeout; size 262144; }}",
        f"add set inet {t} clear6 {{ type ipv6_addr; flags timeout; size 262144; }}",
        f"add set inet {t} alive {{ type inet_proto; flags timeout; }}",
        *(f"add set inet {t} {name}{v} {{ type {kind}; {dynamic} size {size}; }}"
          for name, size in (("holding", 65536), ("lapse", 262144), ("lapsed", 4096))
          for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr"))),
    ]


def _sensor_sets(t: str) -> list[str]:
    dynamic = "flags dynamic, timeout;"
    return [
        # per-source rate of trap hits logged for userspace
        f"add set inet {t} hits4 {{ type ipv4_addr; {dynamic} size {HIT_METER_SIZE}; }}",
        f"add set inet {t} hits6 {{ type ipv6_addr; {dynamic} size {HIT_METER_SIZE}; }}",
        # first contacts logged lately: each (source, port) once
        f"add set inet {t} seen4 {{ type ipv4_addr . inet_service; {dynamic} size 262144; }}",
        f"add set inet {t} seen6 {{ type ipv6_addr . inet_service; {dynamic} size 262144; }}",
    ]


def _chains(t: str) -> list[str]:
    return [
        f"add chain inet {t} prerouting {{ type filter hook prerouting priority raw; "
        "policy accept; }",
        f"add chain inet {t} input {{ type filter hook input priority filter - 10; "
        "policy accept; }",
        f"add chain inet {t} trap",
        f"add chain inet {t} trapped",
        f"add chain inet {t} prerouting_nat {{ type nat hook prerouting priority dstnat - 10; "
        "policy accept; }",
        f"add chain inet {t} challenge",
        f"add chain inet {t} challenged",
        f"add chain inet {t} hold",
        f"add chain inet {t} {STRANGER_CHAIN}",
        f"add chain inet {t} {HOLD_CHAIN}",
        *(f"flush chain inet {t} {chain}" for chain in (
            "prerouting_nat", "challenge", "challenged", "prerouting", "input", "trap", "trapped",
            "hold",
            STRANGER_CHAIN, HOLD_CHAIN)),
        f"flush set inet {t} trap_tcp",
        f"flush set inet {t} trap_udp",
        f"add rule inet {t} prerouting ip saddr @ban4 counter drop",
        f"add rule inet {t} prerouting ip6 saddr @ban6 counter drop",
    ]


def _peers(t: str, peer_memory: float) -> list[str]:
    """An ACK of an established connection shows a completed handshake
    (conntrack checks the sequence numbers, a blind spoofer cannot get
    there). A new peer is "young" for PEER_MATURITY seconds: a scanner that
    has just connected to a real service gets no grace."""
    established = "ct state established tcp flags & (syn | ack) == ack"
    rules = []
    for v, family, field in FAMILIES:
        rules += [f"add rule inet {t} input meta nfproto {family} {established} "
                  f"{field} != @peers{v} add @young{v} {{ {field} timeout {PEER_MATURITY}s }}",
                  f"add rule inet {t} input meta nfproto {family} {established} "
                  f"update @peers{v} {{ {field} timeout {int(peer_memory)}s }}"]
    return rules


def _hit_log(t: str, trap: KernelTrap, chain: str = "challenge",
             prefix: str = PEER_HIT_PREFIX) -> list[str]:
    """Log a trap hit for userspace, at most HIT_RATE per source (no verdict).
    The prefix tells whether the source is a mature peer, as the kernel saw
    it then: userspace need not ask."""
    return [f"add rule inet {t} {chain} meta nfproto {family} update @hits{v} {{ {field} "
            f'timeout {HIT_MEMORY} limit rate {HIT_RATE} }} log group {int(trap.log_group)} '
            f'prefix "{prefix}"' for v, family, field in FAMILIES]


def _unanswered(t: str, ban_tcp: bool, ban_udp: bool) -> list[str]:
    """A peer's trap hit: not banned (its address may be a decoy's), but not
    answered either where a stranger's would ban: the stack's RST (ICMP
    unreachable) from every trap port and its silence from the real ones
    would map the open ports for any host that once used a service. No real
    stack sends these probes (a peer's SYN goes to the challenge)."""
    rules = [f"add chain inet {t} unanswered", f"flush chain inet {t} unanswered"]
    return rules + [f"add rule inet {t} unanswered meta l4proto {protocol} drop"
                    for protocol in _banned_protocols(ban_tcp, ban_udp)]


def _banned_protocols(ban_tcp: bool, ban_udp: bool) -> list[str]:
    """The `meta l4proto` matches whose trap hits the kernel bans (IP protocol
    scans go by BLOCK_TCP)."""
    return [protocol for protocol, bans in (("tcp", ban_tcp), ("udp", ban_udp),
                                            (f"!= {KNOWN_PROTOCOLS}", ban_tcp)) if bans]


def _challenge(t: str, port: int, hit_log: list[str]) -> list[str]:
    """A peer's SYN to an unserved TCP trap port goes to our catch-all
    socket: only a host that really sent it can complete the handshake
    (a spoofed decoy cannot), and a completed one is banned. With the kernel
    as the sensor the hit is logged first (the decoy line: after the
    redirect the input hook sees only the challenge port)."""
    return [
        f"add rule inet {t} prerouting_nat fib daddr type != local return",
        f"add rule inet {t} prerouting_nat ip saddr @never4 return",
        f"add rule inet {t} prerouting_nat ip6 saddr @never6 return",
        f"add rule inet {t} prerouting_nat {SYN_ONLY} tcp dport @trap_tcp ip saddr @peers4 "
        "ip saddr != @young4 jump challenge",
        f"add rule inet {t} prerouting_nat {SYN_ONLY} tcp dport @trap_tcp ip6 saddr @peers6 "
        "ip6 saddr != @young6 jump challenge",
        f"add rule inet {t} challenge socket transparent 0 return",
        f"add rule inet {t} challenge socket transparent 1 return",
        f"add rule inet {t} challenge tcp dport @served_tcp return",
        *hit_log,
        # its own (local) destination, another port: `redirect` would take the incoming
        # interface's address, and drops the packet where it has none of that family
        f"add rule inet {t} challenge meta l4proto tcp dnat ip to ip daddr:{int(port)}",
        f"add rule inet {t} challenge meta l4proto tcp dnat ip6 to ip6 daddr:{int(port)}",
    ]


def _challenge_bans(t: str, trap: KernelTrap, expiry: str, log: str) -> list[str]:
    """A completed handshake with the challenge socket proves the source. The
    proof is the kernel's own: only then does an established child socket
    (bound to our address: wildcard 0) exist for the connection's next
    packet; a decoy's RST finds only the listener. (Not "ct state
    established": conntrack says so as soon as we answered the SYN.) Once per
    connection: its later packets (a FIN retransmitted after an unblock) must
    not ban again."""
    rules = [f"add rule inet {t} input tcp dport {int(trap.challenge_port)} "
             f"ct status dnat socket wildcard 0 {field} . tcp sport != @chal{v} "
             f"add @chal{v} {{ {field} . tcp sport timeout 10m }} jump challenged"
             for v, _, field in FAMILIES]
    if trap.ban_rate[0] > 0:
        rules.append(f"add rule inet {t} challenged limit rate over {limit(trap.ban_rate)} "
                     "return")
    rules += [f"add rule inet {t} challenged meta nfproto {family} "
              f"add @ban{v} {{ {field}{expiry} }}{log}" for v, family, field in FAMILIES]
    return rules


def _trap(t: str, trap: KernelTrap, ban_tcp: bool, ban_udp: bool, expiry: str,
          log: str) -> list[str]:
    """The kernel trap beside the packet sensor (it sees every packet itself)."""
    rules = _returns(t)
    if ban_tcp and trap.first_contact_delay:
        rules += _first_contact_delay(t)
    if ban_tcp:
        rules += _bogus(t)
        rules.append(f"add rule inet {t} input tcp flags & (ack | rst) == 0 "
                     "tcp dport @trap_tcp jump trap")
    if ban_udp:
        rules.append(f"add rule inet {t} input udp dport @trap_udp jump trap")
    rules += _hold(t, trap) + _spared(t, trap.service_memory)
    if trap.peer_memory > 0:  # a peer's address may be a decoy: userspace decides
        rules += _unanswered(t, ban_tcp, ban_udp)
        rules += [f"add rule inet {t} trapped ip saddr @peers4 ip saddr != @young4 "
                  "goto unanswered",
                  f"add rule inet {t} trapped ip6 saddr @peers6 ip6 saddr != @young6 "
                  "goto unanswered"]
    if trap.ban_rate[0] > 0:  # circuit breaker: past the rate, userspace only alerts
        rules.append(f"add rule inet {t} trapped limit rate over {limit(trap.ban_rate)} return")
    rules += [f"add rule inet {t} trapped meta nfproto {family} "
              f"add @ban{v} {{ {field}{expiry} }}{log} counter drop"
              for v, family, field in FAMILIES]
    return rules


def _sensed_trap(t: str, trap: KernelTrap, ban_tcp: bool, ban_udp: bool, expiry: str,
                 log: str) -> list[str]:
    """The kernel as the sensor: every trap hit and first contact is judged
    here as far as the kernel can (served? a reply? after NAT?), and only
    what userspace must still see is logged to it (NFLOG), once: a banned
    source's packets are dropped in prerouting before they get here."""
    group = int(trap.log_group)
    rules = _returns(t)
    for name in ("hit", "peer_hit", "contact", "contact_new"):
        rules += [f"add chain inet {t} {name}", f"flush chain inet {t} {name}"]
    if ban_tcp and trap.first_contact_delay:
        rules += _first_contact_delay(t)
    if trap.tcp:
        rules += _bogus(t)
        if trap.ack_window > 0 or trap.proto_window > 0:
            rules += _unreported(t, trap)
        if trap.ack_window > 0:
            rules += _ack_scans(t, trap)
        if trap.ack_window > 0 and trap.transports:
            rules += _transport_scans(t, trap)
        if trap.proto_window > 0:
            rules += _proto_scans(t, trap)
        rules.append(f"add rule inet {t} input tcp flags & (ack | rst) == 0 "
                     "tcp dport @trap_tcp jump trap")
    if trap.udp:
        rules.append(f"add rule inet {t} input udp dport @trap_udp jump trap")
    if trap.contacts:
        rules.append(f"add rule inet {t} input {SYN_ONLY} jump contact")
    rules += _hold(t, trap) + _spared(t, trap.service_memory)
    if trap.peer_memory > 0:  # a peer's address may be a decoy: userspace decides
        rules += [f"add rule inet {t} trapped ip saddr @peers4 ip saddr != @young4 goto peer_hit",
                  f"add rule inet {t} trapped ip6 saddr @peers6 ip6 saddr != @young6 "
                  "goto peer_hit"]
    if trap.ban_rate[0] > 0:  # circuit breaker: past the rate, userspace only alerts
        rules.append(f"add rule inet {t} trapped limit rate over {limit(trap.ban_rate)} "
                     f'log group {group} prefix "{HIT_PREFIX}" accept')
    for protocol in _banned_protocols(ban_tcp, ban_udp):
        rules += [f"add rule inet {t} trapped meta l4proto {protocol} meta nfproto {family} "
                  f"add @ban{v} {{ {field}{expiry} }}{log} counter drop"
                  for v, family, field in FAMILIES]
    rules.append(f"add rule inet {t} trapped goto hit")  # no kernel ban: userspace decides
    rules += _unanswered(t, ban_tcp, ban_udp) + [f"add rule inet {t} unanswered accept"]
    for chain, prefix, verdict in (("hit", HIT_PREFIX, "accept"),
                                   ("peer_hit", PEER_HIT_PREFIX, "goto unanswered")):
        rules += [f"{rule} {verdict}" for rule in _hit_log(t, trap, chain, prefix)]
        # past its rate (in the meter): seen enough; not in it, the meter was full
        # (a flood of new sources): logged all the same, within an overall rate
        rules += [f"add rule inet {t} {chain} {field} @hits{v} {verdict}"
                  for v, _, field in FAMILIES]
        rules += [f"add rule inet {t} {chain} meta nfproto {family} limit rate "
                  f'{HIT_OVERFLOW_RATE} log group {group} prefix "{prefix}" {verdict}'
                  for _, family, _ in FAMILIES]
        rules.append(f"add rule inet {t} {chain} {verdict}")
    rules += [f"add rule inet {t} contact {field} . tcp dport @seen{v} return"
              for v, _, field in FAMILIES]
    rules += [f"add rule inet {t} contact meta nfproto {family} add @seen{v} {{ {field} . "
              f"tcp dport timeout {CONTACT_MEMORY} }} goto contact_new"
              for v, family, field in FAMILIES]
    served = f'log group {group} prefix "{SERVED_PREFIX}" return'
    rules += [f"add rule inet {t} contact_new socket transparent 0 {served}",
              f"add rule inet {t} contact_new socket transparent 1 {served}",
              f"add rule inet {t} contact_new tcp dport @served_tcp {served}",
              f'add rule inet {t} contact_new log group {group} prefix "{CONTACT_PREFIX}"']
    return rules


BOGUS_FLAGS = (  # what no TCP stack sends: nmap's NULL/FIN/XMAS scans and OS probes
    "tcp flags & (syn | ack | rst) == 0",  # NULL, FIN, XMAS: after the SYN, all carry ACK
    "tcp flags & (syn | fin) == syn | fin",
    "tcp flags & (syn | rst) == syn | rst",
    "tcp flags & (fin | rst | ack) == fin | rst",  # without ACK only: conservative
)


def _bogus(t: str) -> list[str]:
    """A TCP packet with flags no stack sends is a probe to a served port
    too (nmap -O sends them to open ports): banned like a trap hit. A port
    neither trapped nor served (excluded, or past the trap's range) is left
    alone, as before; so is a reply to this host's own traffic."""
    rules = [f"add chain inet {t} bogus", f"flush chain inet {t} bogus"]
    rules += [f"add rule inet {t} input {flags} jump bogus" for flags in BOGUS_FLAGS]
    rules += [f"add rule inet {t} bogus ct direction reply return",
              f"add rule inet {t} bogus tcp dport @trap_tcp goto trapped",
              f"add rule inet {t} bogus socket transparent 0 goto trapped",
              f"add rule inet {t} bogus socket transparent 1 goto trapped",
              f"add rule inet {t} bogus tcp dport @served_tcp goto trapped"]
    return rules


def _ack_scans(t: str, trap: KernelTrap) -> list[str]:
    """nmap -sA, -sW, -sM: an ACK (FIN/ACK, SYN/ACK) that no connection
    expects (connection tracking says new or invalid) to a trap port nothing
    serves is evidence (late ACKs are normal; one never bans). A reply to
    this host's own traffic, and a port a socket serves, are left alone."""
    rules = [f"add chain inet {t} ack", f"flush chain inet {t} ack"]
    rules += [f"add set inet {t} acked{v} {{ type {kind} . inet_service; flags dynamic, "
              "timeout; size 262144; }"
              for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr"))]
    rules += [f"add rule inet {t} input ct state new,invalid tcp flags & (rst | ack) == ack "
              "tcp dport @trap_tcp jump ack",
              f"add rule inet {t} ack ct direction reply return",
              f"add rule inet {t} ack socket transparent 0 return",
              f"add rule inet {t} ack socket transparent 1 return",
              f"add rule inet {t} ack tcp dport @served_tcp return"]
    return rules + _distinct_evidence(t, "ack", "acked", "ackers", "tcp dport", trap.ack_window,
                                      trap.ack_trigger if trap.ban_tcp else 0,
                                      trap.log_group, ACK_PREFIX)


def _transport_scans(t: str, trap: KernelTrap) -> list[str]:
    """nmap -sY and -sZ (SCTP INIT, COOKIE-ECHO), and a UDP-Lite datagram or a
    DCCP Request: the opening packet of another transport, to a port no
    socket of this host serves (`served_*`, filled by the daemon: the
    kernel's socket lookup knows only TCP and UDP), is evidence as an
    ACK-family probe is, but the kernel never bans for it: a service started
    since the daemon's last poll is unknown here, so the daemon asks about
    each port it is told of and counts only those served by nothing. Past a
    source's bucket its ports go through `port_scan`, with a log limit of its
    own (a flood that used up the shared one does not hide a scanner's later
    ports). Ports in the local port range are left alone (late answers to
    this host's own traffic go there). They are not counted as IP protocols
    (`proto`): their own ports say more."""
    names = [name for name in TRANSPORTS if name in trap.transports]
    protocols = f"{{ {', '.join(names)} }}"
    first, last = trap.local_ports
    rules = [f"add chain inet {t} transport", f"flush chain inet {t} transport",
             f"add chain inet {t} port_scan", f"flush chain inet {t} port_scan",
             f"add chain inet {t} output {{ type filter hook output priority filter; "
             "policy accept; }", f"flush chain inet {t} output"]
    for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        rules += [f"add set inet {t} ported{v} {{ type {kind} . inet_proto . inet_service; "
                  "flags dynamic, timeout; size 262144; }",
                  f"add set inet {t} answers{v} {{ type {kind} . inet_proto . inet_service . "
                  "inet_service; flags dynamic, timeout; size 65536; }"]
    # this host's own traffic of these protocols: what answers it is no probe. Not
    # connection tracking's reply direction: it takes every UDP-Lite packet that
    # comes in for invalid (its checksum is checked as UDP's)
    rules += [f"add rule inet {t} output meta l4proto {protocols} meta nfproto {family} "
              f"update @answers{v} {{ {field.replace('saddr', 'daddr')} . meta l4proto . "
              f"th dport . th sport timeout {ANSWER_MEMORY} }}" for v, family, field in FAMILIES]
    rules += [f"add rule inet {t} input meta l4proto {protocols} jump transport",
              f"add rule inet {t} transport ct direction reply return",
              *(f"add rule inet {t} transport {field} . meta l4proto . th sport . th dport "
                f"@answers{v} return" for v, _, field in FAMILIES),
              # SCTP: the first chunk an INIT (1) or a COOKIE ECHO (10); DCCP: a Request
              f"add rule inet {t} transport meta l4proto sctp @th,96,8 != {{ 1, 10 }} return",
              f"add rule inet {t} transport meta l4proto dccp dccp type != request return",
              f"add rule inet {t} transport th dport {first}-{last} return"]
    rules += [f"add rule inet {t} transport meta l4proto {name} th dport @served_{name} return"
              for name in names]
    rules += [f"add rule inet {t} port_scan limit rate over {ACK_RATE} goto unreported",
              f'add rule inet {t} port_scan log group {int(trap.log_group)} '
              f'prefix "{PORT_SCAN_PREFIX}"']
    return rules + _distinct_evidence(t, "transport", "ported", "porters",
                                      "meta l4proto . th dport", trap.ack_window,
                                      trap.ack_trigger, trap.log_group, TRANSPORT_PREFIX,
                                      over="port_scan")


def _proto_scans(t: str, trap: KernelTrap) -> list[str]:
    """nmap -sO: packets of IP protocols other than TCP, UDP and ICMP are
    evidence; a tunnel's peer sends one or two (GRE, ESP)."""
    rules = [f"add chain inet {t} proto", f"flush chain inet {t} proto"]
    rules += [f"add set inet {t} protos{v} {{ type {kind} . inet_proto; flags dynamic, "
              "timeout; size 65536; }" for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr"))]
    known = KNOWN_PROTOCOLS
    if trap.ack_window > 0 and trap.transports:  # judged per port (`_transport_scans`)
        known = f"{{ {', '.join(['tcp', 'udp', 'icmp', 'ipv6-icmp', *trap.transports])} }}"
    rules += [f"add rule inet {t} input meta l4proto != {known} jump proto",
              f"add rule inet {t} proto ct direction reply return"]
    return rules + _distinct_evidence(t, "proto", "protos", "protocolers", "meta l4proto",
                                      trap.proto_window,
                                      trap.proto_trigger if trap.ban_tcp else 0,
                                      trap.log_group, PROTO_PREFIX)


def _unreported(t: str, trap: KernelTrap) -> list[str]:
    """Evidence past ACK_RATE is not told (a spoofed flood must not drown
    userspace), but that it happened is, once a second: the daemon counts
    the slow scans the kernel's buckets do not catch, and warns when it may
    have missed one."""
    return [f"add chain inet {t} unreported", f"flush chain inet {t} unreported",
            f"add rule inet {t} unreported limit rate 1/second burst 1 packets "
            f'log group {int(trap.log_group)} prefix "{UNREPORTED_PREFIX}"']


def _distinct_evidence(t: str, chain: str, seen: str, counts: str, what: str, seconds: float,
                       trigger: int, group: int, prefix: str, over: str = "trapped") -> list[str]:
    """Each (source, `what`) goes to userspace once (`seen`; one that goes on
    being seen counts once), at most ACK_RATE a second; with `trigger` >= 2
    the trigger-th distinct one within the window goes to chain `over`
    (`trapped`: banned here, reported as the kernel's ban): a token bucket per
    source (`counts`) of trigger-1 at once, then one more a window, so that
    one is always over, remembered BUCKET_MEMORY windows (a source that pauses
    between rounds of probes gets no fresh bucket). The bucket counts before
    the rate limit on what userspace is told: a spoofed flood of one-packet
    sources silences the log (said: `unreported`), not the kernel's count of a
    real scanner."""
    window = f"{max(1, int(seconds))}s"
    rules = [f"add rule inet {t} {chain} {field} . {what} @{seen}{v} update @{seen}{v} "
             f"{{ {field} . {what} timeout {window} }} return" for v, _, field in FAMILIES]
    remember = [f"add @{seen}{v} {{ {field} . {what} timeout {window} }}"
                for v, _, field in FAMILIES]
    if trigger >= 2:
        rate = limit((1 / max(1.0, seconds), trigger - 1))
        memory = f"{BUCKET_MEMORY * max(1, int(seconds))}s"
        rules += [f"add set inet {t} {counts}{v} {{ type {kind}; flags dynamic, timeout; "
                  "size 65536; }" for v, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr"))]
        rules += [f"add rule inet {t} {chain} meta nfproto {family} update @{counts}{v} "
                  f"{{ {field} timeout {memory} limit rate over {rate} }} {add} goto {over}"
                  for (v, family, field), add in zip(FAMILIES, remember)]
    rules.append(f"add rule inet {t} {chain} limit rate over {ACK_RATE} goto unreported")
    return rules + [f"add rule inet {t} {chain} meta nfproto {family} {add} log group "
                    f'{int(group)} prefix "{prefix}"'
                    for (v, family, field), add in zip(FAMILIES, remember)]


def _returns(t: str) -> list[str]:
    """What the kernel trap never looks at."""
    return [
        f"add rule inet {t} input meta pkttype != host return",
        f"add rule inet {t} input ip saddr @never4 return",
        f"add rule inet {t} input ip6 saddr @never6 return",
        # an IPv4-mapped source is an IPv4 address: only userspace judges
        # it (as that address), the kernel never bans it into ban6
        f"add rule inet {t} input ip6 saddr ::ffff:0.0.0.0/96 return",
    ]


def _spared(t: str, service_memory: float) -> list[str]:
    """A trap port that a local socket serves (or served lately), or a reply
    to this host's own traffic, is no trap. `socket transparent` matches any
    socket the lookup finds (full, TIME_WAIT, SYN_RECV request); `socket
    wildcard` matches only full ones, so a client reusing its port into our
    TIME_WAIT, or retransmitting its SYN to a half-open one, would be banned.
    A served port a client's packet reaches is remembered (SERVICE_MEMORY) at
    once, in the kernel: a service that restarts before the daemon's poll saw
    it is still no trap. `add` leaves a known port alone (a lookup, no write)."""
    rules = [f"add rule inet {t} trap ct direction reply return"]
    if service_memory > 0:  # only TCP and UDP come here: these are the socket checks
        memory = max(1, int(service_memory))
        rules += [f"add rule inet {t} trap meta l4proto {p} socket transparent {n} "
                  f"add @served_{p} {{ {p} dport timeout {memory}s }} return"
                  for p in ("tcp", "udp") for n in (0, 1)]
    else:
        rules += [f"add rule inet {t} trap socket transparent {n} return" for n in (0, 1)]
    return rules + [f"add rule inet {t} trap tcp dport @served_tcp return",
                    f"add rule inet {t} trap udp dport @served_udp return",
                    f"add rule inet {t} trap goto trapped"]  # a hit: judged there


def _first_contact_delay(t: str) -> list[str]:
    """FIRST_CONTACT_DELAY: the first SYN of a (source, port) pair to a served
    port is dropped once an hour. A real client retransmits after ~1 s; a
    scanner's burst meanwhile reaches a trap port and its retransmission
    meets the ban, so no real port answers it. Peers are spared."""
    return [f"add rule inet {t} input {SYN_ONLY} {field} != @peers{v} "
            f"{field} . tcp dport != @met{v} socket wildcard le 1 "
            f"add @met{v} {{ {field} . tcp dport timeout 1h }} drop" for v, _, field in FAMILIES]


def _hold(t: str, trap: KernelTrap) -> list[str]:
    """FIRST_CONTACT_HOLD: a stranger's SYN to a served port (not a peer, not
    cleared within PEER_MEMORY; the never-block sets returned earlier) waits in
    the daemon's queue. The daemon hands it back after the hold with a
    "repeat" verdict, so it walks this chain again: a ban made meanwhile (the
    scan's trap hit) drops it, and a source the daemon cleared passes. Fails
    open without any timer in the daemon: the queue is bypassed when no daemon
    reads it, nothing is queued once the daemon has switched the hold off
    (`alive`), and a source whose first SYN is still unreleased HOLD_GRACE
    after its hold (a stalled daemon) passes: its client's retransmission gets
    through, and the source is noted in `lapsed` for the daemon to report."""
    if not (trap.hold_queue and trap.tcp and trap.ban_tcp):
        return []
    rules = [f"add element inet {t} alive {{ {HOLD_ON_KEY} }}",
             f"add rule inet {t} input {SYN_ONLY} jump hold"]
    for v, _, field in FAMILIES:
        rules += [f"add rule inet {t} hold {field} @ban{v} drop",  # banned while held
                  f"add rule inet {t} hold {field} @clear{v} return",
                  f"add rule inet {t} hold {field} @peers{v} return"]
    rules.append(f"add rule inet {t} hold meta l4proto != @alive return")
    if trap.hold_rate > 0:  # past it (a spoofed flood), SYNs pass unheld
        rules.append(f"add rule inet {t} hold limit rate over {int(trap.hold_rate)}/second "
                     f"burst {int(trap.hold_rate)} packets return")
    rules += [f"add rule inet {t} hold socket transparent 0 goto {STRANGER_CHAIN}",
              f"add rule inet {t} hold socket transparent 1 goto {STRANGER_CHAIN}"]
    window = f"{round(1000 * (trap.hold_seconds + HOLD_GRACE))}ms"
    chain = f"inet {t} {STRANGER_CHAIN}"
    for v, _, field in FAMILIES:  # its later SYNs wait too, within the window
        rules.append(f"add rule {chain} {field} @holding{v} goto {HOLD_CHAIN}")
    for v, _, field in FAMILIES:  # held, never released: the daemon did not answer
        rules += [f"add rule {chain} {field} @lapse{v} add @lapsed{v} {{ {field} timeout 1h }}",
                  f"add rule {chain} {field} @lapse{v} return"]
    rules += [f"add rule {chain} meta nfproto {family} add @holding{v} {{ {field} "
              f"timeout {window} }} add @lapse{v} {{ {field} timeout {LAPSE_MEMORY} }} "
              f"goto {HOLD_CHAIN}" for v, family, field in FAMILIES]
    return rules


def queue_rule(t: str, queue: int) -> str:
    """The hold chain's one rule, where the kernel has nftables' own queue."""
    return f"add rule inet {t} {HOLD_CHAIN} queue num {int(queue)} bypass"
