"""nftables through libnftables (the library behind the `nft` command).

Each call runs a batch of nft commands inside this process: no fork per ban.
Our rules live in their own table, `inet <name>`, so we never touch the
admin's other tables, and everything we add can be removed in one command.

The table:
- `ban4`/`ban6`: banned sources, with per-element timeouts; dropped in
  prerouting (priority raw), before connection tracking.
- the kernel trap (optional): in the input hook, a TCP packet without ACK/RST
  or a UDP datagram to a trap port that no local socket serves adds its
  source to the ban set right there, so the very next packet is dropped. The
  never-block sets are checked first; a reply to this host's own traffic is
  never a probe. Each ban the kernel makes is also sent to the daemon (NFLOG
  group), which logs and records it like its own.
"""

from __future__ import annotations

import ctypes
import errno
import ctypes.util
import ipaddress
import json
import threading
from dataclasses import dataclass

from .addrset import AddressSet, canonical
from .nfnetlink import SetElements, dump_set

NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_TERSE = 1 << 11  # no set elements in listings
BAN_SET_SIZE = 262144  # per family; the kernel refuses additions beyond it
PEER_MATURITY = 2  # seconds after its first completed handshake before a host is a peer
LOG_PREFIX = "portsentinel ban"  # NFLOG prefix of the kernel's own bans
STATIC_SETS = ("trap_tcp", "trap_udp", "never4", "never6")  # only we change them


def _uncounted(expressions: list) -> list:
    return [e for e in expressions if not (isinstance(e, dict) and "counter" in e)]


class NftError(Exception):
    pass


class SetFull(NftError):
    pass


class Nft:
    def __init__(self):
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as err:
            raise NftError(f"libnftables not found ({err}); install the nftables package") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, commands: str, as_json: bool = False, terse: bool = False) -> str:
        flags = (NFT_CTX_OUTPUT_JSON if as_json else 0) | (NFT_CTX_OUTPUT_TERSE if terse else 0)
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


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


def _limit(rate: tuple[float, int]) -> str:
    per_second, burst = rate
    if per_second >= 1:
        return f"{int(per_second)}/second burst {max(1, burst)} packets"
    if per_second * 60 >= 1:
        return f"{int(per_second * 60)}/minute burst {max(1, burst)} packets"
    return f"{max(1, int(per_second * 3600))}/hour burst {max(1, burst)} packets"


def port_ranges(ports) -> tuple[tuple[int, int], ...]:
    ranges: list[list[int]] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1][1] = port
        else:
            ranges.append([port, port])
    return tuple((a, b) for a, b in ranges)


def _set_for(address) -> str:
    return "ban4" if address.version == 4 else "ban6"


def _elements(ranges, fmt) -> str:
    return ", ".join(fmt(a) if a == b else f"{fmt(a)}-{fmt(b)}" for a, b in ranges)


class NftBans:
    """The `inet <table>` table: ban sets, their drop rules, the kernel trap."""

    def __init__(self, nft: Nft, table: str = "portsentinel", set_size: int = BAN_SET_SIZE):
        self.nft, self.table, self.set_size = nft, table, set_size
        self.elements = SetElements(table)  # the fast path for bans
        self.expected: str | None = None  # fingerprint() as last installed

    def install(self, trap: KernelTrap | None = None, ban_time: float = 0) -> None:
        """Create or refresh the table in one transaction; bans already in
        the sets are kept (restart), rules are replaced (never duplicated).
        A ban set of another size (BAN_SET_SIZE changed) is made anew, its
        bans carried over with the time they have left."""
        try:
            self._install(trap, ban_time)
        except NftError:
            kept = self._resize_ban_sets()
            if kept is None:
                raise
            self._install(trap, ban_time)
            self.elements.add_each((a, left or 0) for a, left in kept.items())

    def _resize_ban_sets(self) -> dict[str, float | None] | None:
        """Drop ban sets whose size is not ours; their bans, or None if none was."""
        sizes = {}
        for name in ("ban4", "ban6"):
            try:
                data = json.loads(self.nft.run(f"list set inet {self.table} {name}", as_json=True))
            except NftError:
                continue
            for item in data.get("nftables", []):
                if "set" in item:
                    sizes[name] = item["set"].get("size")
        if not sizes or all(size == self.set_size for size in sizes.values()):
            return None
        kept = self.banned()
        t = self.table
        chains = ("prerouting", "input", "trap", "challenged")
        self.nft.run("".join(f"flush chain inet {t} {c}\n" for c in chains)
                     + "".join(f"delete set inet {t} {n}\n" for n in sizes))
        return kept

    def _install(self, trap: KernelTrap | None, ban_time: float) -> None:
        t = self.table
        ban_flags = f"flags dynamic, timeout; size {self.set_size};"
        commands = [
            f"add table inet {t}",
            f"add set inet {t} ban4 {{ type ipv4_addr; {ban_flags} }}",
            f"add set inet {t} ban6 {{ type ipv6_addr; {ban_flags} }}",
            f"add set inet {t} never4 {{ type ipv4_addr; flags interval; }}",
            f"add set inet {t} never6 {{ type ipv6_addr; flags interval; }}",
            f"add set inet {t} trap_tcp {{ type inet_service; flags interval; }}",
            f"add set inet {t} trap_udp {{ type inet_service; flags interval; }}",
            f"add set inet {t} peers4 {{ type ipv4_addr; flags dynamic, timeout; size 65536; }}",
            f"add set inet {t} peers6 {{ type ipv6_addr; flags dynamic, timeout; size 65536; }}",
            f"add set inet {t} young4 {{ type ipv4_addr; flags dynamic, timeout; size 65536; }}",
            f"add set inet {t} young6 {{ type ipv6_addr; flags dynamic, timeout; size 65536; }}",
            f"add set inet {t} met4 {{ type ipv4_addr . inet_service; flags dynamic, timeout; size 262144; }}",
            f"add set inet {t} met6 {{ type ipv6_addr . inet_service; flags dynamic, timeout; size 262144; }}",
            # ports a service used lately (SERVICE_MEMORY): a restarting service is no trap
            f"add set inet {t} served_tcp {{ type inet_service; flags timeout; }}",
            f"add set inet {t} served_udp {{ type inet_service; flags timeout; }}",
            # completed challenges, per connection: only its first ACK may ban
            f"add set inet {t} chal4 {{ type ipv4_addr . inet_service; flags dynamic, timeout; size 65536; }}",
            f"add set inet {t} chal6 {{ type ipv6_addr . inet_service; flags dynamic, timeout; size 65536; }}",
            f"add chain inet {t} prerouting {{ type filter hook prerouting priority raw; policy accept; }}",
            f"add chain inet {t} input {{ type filter hook input priority filter - 10; policy accept; }}",
            f"add chain inet {t} trap",
            f"add chain inet {t} prerouting_nat {{ type nat hook prerouting priority dstnat - 10; policy accept; }}",
            f"add chain inet {t} challenge",
            f"add chain inet {t} challenged",
            f"flush chain inet {t} prerouting_nat",
            f"flush chain inet {t} challenge",
            f"flush chain inet {t} challenged",
            f"flush chain inet {t} prerouting",
            f"flush chain inet {t} input",
            f"flush chain inet {t} trap",
            f"flush set inet {t} trap_tcp",
            f"flush set inet {t} trap_udp",
            f"add rule inet {t} prerouting ip saddr @ban4 counter drop",
            f"add rule inet {t} prerouting ip6 saddr @ban6 counter drop",
        ]
        if trap and trap.peer_memory > 0:
            # an ACK of an established connection shows a completed handshake
            # (conntrack checks the sequence numbers, a blind spoofer cannot get
            # there). A new peer is "young" for PEER_MATURITY seconds: a scanner
            # that has just connected to a real service gets no grace.
            memory = f"timeout {int(trap.peer_memory)}s"
            young = f"timeout {PEER_MATURITY}s"
            established = "ct state established tcp flags & (syn | ack) == ack"
            for v, field in (("4", "ip saddr"), ("6", "ip6 saddr")):
                family = "ipv4" if v == "4" else "ipv6"
                commands += [
                    f"add rule inet {t} input meta nfproto {family} {established} "
                    f"{field} != @peers{v} add @young{v} {{ {field} {young} }}",
                    f"add rule inet {t} input meta nfproto {family} {established} "
                    f"update @peers{v} {{ {field} {memory} }}",
                ]
        if trap and trap.tcp:
            commands.append(f"add element inet {t} trap_tcp {{ {_elements(trap.tcp, str)} }}")
        if trap and trap.udp:
            commands.append(f"add element inet {t} trap_udp {{ {_elements(trap.udp, str)} }}")
        if trap and trap.challenge_port and trap.tcp and trap.peer_memory > 0:
            commands += self._challenge(trap.challenge_port)
        ban_tcp = bool(trap and trap.tcp and trap.ban_tcp)
        ban_udp = bool(trap and trap.udp and trap.ban_udp)
        expiry = f" timeout {int(ban_time)}s" if ban_time > 0 else ""
        log = f" log group {int(trap.log_group)} prefix \"{LOG_PREFIX}\"" if trap and trap.log_group else ""
        if ban_tcp and trap.challenge_port and trap.peer_memory > 0:
            # a completed handshake with the challenge socket proves the source. The
            # proof is the kernel's own: only then does an established child socket
            # (bound to our address: wildcard 0) exist for the connection's next
            # packet; a decoy's RST finds only the listener. (Not "ct state
            # established": conntrack says so as soon as we answered the SYN.)
            for v, field in (("4", "ip saddr"), ("6", "ip6 saddr")):
                # once per connection: its later packets (a FIN retransmitted after
                # an unblock) must not ban again
                commands.append(
                    f"add rule inet {t} input tcp dport {int(trap.challenge_port)} "
                    f"ct status dnat socket wildcard 0 {field} . tcp sport != @chal{v} "
                    f"add @chal{v} {{ {field} . tcp sport timeout 10m }} jump challenged")
            if trap.ban_rate[0] > 0:
                commands.append(f"add rule inet {t} challenged limit rate over "
                                f"{_limit(trap.ban_rate)} return")
            commands += [
                f"add rule inet {t} challenged meta nfproto ipv4 add @ban4 {{ ip saddr{expiry} }}{log}",
                f"add rule inet {t} challenged meta nfproto ipv6 add @ban6 {{ ip6 saddr{expiry} }}{log}",
            ]
        if ban_tcp or ban_udp:
            commands += [
                f"add rule inet {t} input meta pkttype != host return",
                f"add rule inet {t} input ip saddr @never4 return",
                f"add rule inet {t} input ip6 saddr @never6 return",
                # an IPv4-mapped source is an IPv4 address: only userspace judges
                # it (as that address), the kernel never bans it into ban6
                f"add rule inet {t} input ip6 saddr ::ffff:0.0.0.0/96 return",
            ]
            if ban_tcp and trap.first_contact_delay:
                commands += self._first_contact_delay()
            if ban_tcp:
                commands.append(f"add rule inet {t} input tcp flags & (ack | rst) == 0 "
                                "tcp dport @trap_tcp jump trap")
            if ban_udp:
                commands.append(f"add rule inet {t} input udp dport @trap_udp jump trap")
            commands += [
                # a local socket serves this packet: a real service, not a trap.
                # `socket transparent` matches any socket the lookup finds (full,
                # TIME_WAIT, SYN_RECV request); `socket wildcard` matches only full
                # ones, so a client reusing its port into our TIME_WAIT, or
                # retransmitting its SYN to a half-open one, would be banned.
                f"add rule inet {t} trap socket transparent 0 return",
                f"add rule inet {t} trap socket transparent 1 return",
                f"add rule inet {t} trap tcp dport @served_tcp return",
                f"add rule inet {t} trap udp dport @served_udp return",
                # a reply to this host's own traffic (e.g. an answer to a UDP query
                # whose socket is closed by now) is never a probe
                f"add rule inet {t} trap ct direction reply return",
            ]
            if trap.peer_memory > 0:  # a peer's address may be a decoy: userspace decides
                commands += [f"add rule inet {t} trap ip saddr @peers4 ip saddr != @young4 return",
                             f"add rule inet {t} trap ip6 saddr @peers6 ip6 saddr != @young6 return"]
            if trap.ban_rate[0] > 0:  # circuit breaker: past the rate, userspace only alerts
                commands.append(f"add rule inet {t} trap limit rate over {_limit(trap.ban_rate)} return")
            commands += [
                f"add rule inet {t} trap meta nfproto ipv4 add @ban4 {{ ip saddr{expiry} }}{log} counter drop",
                f"add rule inet {t} trap meta nfproto ipv6 add @ban6 {{ ip6 saddr{expiry} }}{log} counter drop",
            ]
        self.nft.run("\n".join(commands) + "\n")
        self.expected = self.fingerprint()

    def fingerprint(self) -> str | None:
        """Our rules (without their counters) and the static sets (trap ports,
        never-block) as they are now; None when the table is gone. Listed
        without the dynamic sets' elements: milliseconds, whatever the bans."""
        try:
            data = json.loads(self.nft.run(f"list table inet {self.table}", as_json=True,
                                           terse=True))
            items = data.get("nftables", [])
            parts = [json.dumps([i["rule"]["chain"], _uncounted(i["rule"]["expr"])])
                     for i in items if "rule" in i]
            names = {i["set"]["name"] for i in items if "set" in i}
            if not {"ban4", "ban6"} <= names:
                return None
            for name in STATIC_SETS:
                listed = json.loads(self.nft.run(f"list set inet {self.table} {name}",
                                                 as_json=True))
                parts += [json.dumps(i["set"].get("elem", [])) for i in listed["nftables"]
                          if "set" in i]
        except (NftError, ValueError, KeyError):
            return None
        return "\n".join(parts)

    def intact(self) -> bool:
        """Is our table still as we installed it: rules, ban sets, trap ports,
        never-block list? (Another program may flush or rewrite any of it.)"""
        return self.expected is not None and self.fingerprint() == self.expected

    def _challenge(self, port: int) -> list[str]:
        """A peer's SYN to an unserved TCP trap port goes to our catch-all
        socket: only a host that really sent it can complete the handshake
        (a spoofed decoy cannot), and a completed one is banned."""
        t = self.table
        syn = "tcp flags & (syn | ack | rst | fin) == syn"
        return [
            f"add rule inet {t} prerouting_nat fib daddr type != local return",
            f"add rule inet {t} prerouting_nat ip saddr @never4 return",
            f"add rule inet {t} prerouting_nat ip6 saddr @never6 return",
            f"add rule inet {t} prerouting_nat {syn} tcp dport @trap_tcp ip saddr @peers4 "
            "ip saddr != @young4 jump challenge",
            f"add rule inet {t} prerouting_nat {syn} tcp dport @trap_tcp ip6 saddr @peers6 "
            "ip6 saddr != @young6 jump challenge",
            f"add rule inet {t} challenge socket transparent 0 return",
            f"add rule inet {t} challenge socket transparent 1 return",
            f"add rule inet {t} challenge tcp dport @served_tcp return",
            f"add rule inet {t} challenge meta l4proto tcp redirect to :{int(port)}",
        ]

    def _first_contact_delay(self) -> list[str]:
        """FIRST_CONTACT_DELAY: the first SYN of a (source, port) pair to a served
        port is dropped once an hour. A real client retransmits after ~1 s; a
        scanner's burst meanwhile reaches a trap port and its retransmission
        meets the ban, so no real port answers it. Peers are spared."""
        t = self.table
        syn = "tcp flags & (syn | ack | rst | fin) == syn"
        rules = []
        for v, field in (("4", "ip saddr"), ("6", "ip6 saddr")):
            rules.append(
                f"add rule inet {t} input {syn} {field} != @peers{v} "
                f"{field} . tcp dport != @met{v} socket wildcard le 1 "
                f"add @met{v} {{ {field} . tcp dport timeout 1h }} drop")
        return rules

    def set_never_block(self, never: AddressSet) -> None:
        """Replace the never-block sets atomically."""
        t = self.table
        commands = [f"flush set inet {t} never4", f"flush set inet {t} never6"]
        for version, name in ((4, "never4"), (6, "never6")):
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            ranges = never.ranges(version)
            if ranges:
                commands.append(f"add element inet {t} {name} {{ "
                                f"{_elements(ranges, lambda v: str(cls(v)))} }}")
        self.nft.run("\n".join(commands) + "\n")
        self.expected = self.fingerprint()

    def is_peer(self, address) -> bool:
        """A mature peer: a completed handshake within PEER_MEMORY, the first
        one more than PEER_MATURITY seconds ago (kernel sets peers*, young*)."""
        ip = ipaddress.ip_address(address)
        v = "4" if ip.version == 4 else "6"
        return self.elements.contains(f"peers{v}", ip) and not self.elements.contains(f"young{v}", ip)

    def disarm_trap(self) -> None:
        """Stop trapping (daemon stopping); bans stay enforced."""
        self.nft.run(f"flush chain inet {self.table} input\n"
                     f"flush chain inet {self.table} prerouting_nat\n")
        self.expected = self.fingerprint()

    def command(self, address, timeout: float) -> str:
        ip = canonical(address)  # never format anything but an address
        expiry = f" timeout {int(timeout)}s" if timeout > 0 else ""
        return f"add element inet {self.table} {_set_for(ip)} {{ {ip}{expiry} }}"

    def ban(self, address, timeout: float = 0, replace: bool = False) -> str:
        """Ban now (one netlink batch); returns the equivalent nft command for the log.
        `replace`: set this timeout even if the address is already in the set."""
        try:
            if replace:
                self.elements.replace([address], timeout)
            else:
                self.elements.add([address], timeout)
        except OSError as err:
            if err.errno == errno.ENFILE:  # what nf_tables answers for a full set
                raise SetFull(f"the ban set is full (BAN_SET_SIZE={self.set_size})") from None
            raise NftError(str(err)) from None
        return self.command(address, timeout)

    def unban(self, address) -> bool:
        """False when the address was not banned."""
        try:
            self.elements.delete([address])
            return True
        except OSError:
            return False

    def banned(self) -> dict[str, float | None]:
        """Address -> seconds left (None when the ban has no timeout). A dump
        taken while the kernel resizes the set may miss elements: confirm an
        absence with `holds` before acting on it."""
        found: dict[str, float | None] = {}
        try:
            for name in ("ban4", "ban6"):
                for address, left in dump_set(self.table, name).items():
                    ip = ipaddress.ip_address(address)
                    if ip.version == 6 and ip.ipv4_mapped is not None:
                        address = self._move_mapped(ip, left)
                    found[address] = left
        except OSError as err:
            raise NftError(str(err)) from None
        return found

    def _move_mapped(self, ip: ipaddress.IPv6Address, left: float | None) -> str:
        """An IPv4-mapped address in ban6 (put there by hand) matches nothing
        and no unblock finds it: it is the IPv4 address, so it goes to ban4."""
        self.elements.delete_keys("ban6", [ip.packed])
        self.elements.add_each([(ip.ipv4_mapped, left or 0)])
        return str(ip.ipv4_mapped)

    def holds(self, address) -> bool:
        ip = canonical(address)
        return self.elements.contains(_set_for(ip), ip)
