"""Our nftables table, `inet <name>` (its rules: ruleset.py), so we never
touch the admin's other tables and everything we add goes in one command.

Two ways in, both inside this process (no fork): the table and its rules
through libnftables (the library behind the `nft` command), once at start,
reload or repair; bans, lifts and lookups as raw netlink set-element
messages (nfnetlink.py): tens of microseconds, on the packet path.
"""

from __future__ import annotations

import ctypes
import errno
import ctypes.util
import ipaddress
import json
import threading

from .addrset import AddressSet, canonical, text
from . import nfnetlink
from .nfnetlink import (STATIC_SETS, SetElements, add_compat_queue_rule, dump_counted, dump_keys,
                        dump_set, generation)
from .ruleset import HOLD_CHAIN, KernelTrap, elements, queue_rule, table_commands

NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_TERSE = 1 << 11  # no set elements in listings
BAN_SET_SIZE = 262144  # per family; the kernel refuses additions beyond it
CHAIN_KEYS = ("type", "hook", "prio", "policy")  # a chain as declared (its handle is not)
RACE_TRIES = 3  # our table made again while other programs commit meanwhile


def _generation_or_none() -> int | None:
    try:
        return generation()
    except OSError:
        return None


def never_commands(t: str, never: AddressSet) -> list[str]:
    """The never-block sets emptied and filled with `never`."""
    commands = [f"flush set inet {t} never4", f"flush set inet {t} never6"]
    for version, name in ((4, "never4"), (6, "never6")):
        cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        ranges = never.ranges(version)
        if ranges:
            commands.append(f"add element inet {t} {name} {{ "
                            f"{elements(ranges, lambda v: str(cls(v)))} }}")
    return commands


def _uncounted(expressions: list) -> list:
    return [e for e in expressions if not (isinstance(e, dict) and "counter" in e)]


class NftError(Exception):
    pass


def _readable(errors: str, most: int = 3) -> str:
    """libnftables' error text for a whole batch: each error once, without
    the echoed input and caret lines (they point into the batch, not at the
    command), the first `most` of them."""
    seen: list[str] = []
    for line in errors.splitlines():
        line = line.strip()
        if line.startswith("Error:") and line not in seen:
            seen.append(line)
    if not seen:
        return errors.strip()
    more = f" (and {len(seen) - most} more)" if len(seen) > most else ""
    return "; ".join(seen[:most]) + more


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
            raise NftError(_readable(err) or f"nft failed ({rc})")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _set_for(address) -> str:
    return "ban4" if address.version == 4 else "ban6"


class NftBans:
    """The `inet <table>` table: ban sets, their drop rules, the kernel trap."""

    def __init__(self, nft: Nft, table: str = "portsentinel", set_size: int = BAN_SET_SIZE):
        self.nft, self.table, self.set_size = nft, table, set_size
        self.elements = SetElements(table)  # the fast path for bans
        self.expected: str | None = None  # fingerprint() as last installed
        self.checked_generation: int | None = None  # the ruleset's, when last found so
        self.queue_error: str | None = None  # why the hold has no queue statement
        self.made_anew: str | None = None  # why the last install deleted the table first
        self._clean: tuple | None = None  # (what was made, its fingerprint) when last settled
        self._trap: KernelTrap | None = None  # the table as last made: its trap,
        self._ban_time = 0.0  # ban expiry and never-block sets
        self._never = never_commands(table, AddressSet())

    def install(self, trap: KernelTrap | None = None, ban_time: float = 0,
                never: AddressSet | None = None) -> None:
        """Create or refresh the table in one transaction, never-block sets
        included (`never`; else as last set); bans already in the sets are
        kept (restart), rules are replaced (never duplicated). Every change
        of ours is such a whole make: a partial one (only the never-block
        sets) would be listed as ours with whatever another program committed
        since the last whole make.
        A set made otherwise than ours (a ban set of another BAN_SET_SIZE, an
        earlier version's served-port sets that the kernel could not fill) is
        made anew, its bans carried over with the time they have left."""
        self._trap, self._ban_time = trap, ban_time
        if never is not None:
            self._never = never_commands(self.table, never)
        self.made_anew = None
        try:
            self._install(trap, ban_time)
        except NftError as err:
            self._make_anew(trap, ban_time, err)

    def _make_anew(self, trap: KernelTrap | None, ban_time: float, err: NftError) -> None:
        """Our table as it is cannot be refilled: a set of ours declared
        otherwise is made anew; failing that (a table of our name that another
        program made: dormant, its sets of other types), the whole table.
        The bans are carried over with the time they have left."""
        try:
            kept = self.banned()
        except NftError:
            kept = {}
        changed = self._changed_sets()
        if changed:
            try:
                self._drop_sets(changed)
                self._install(trap, ban_time)
                if {"ban4", "ban6"} & set(changed):
                    self.elements.add_each((a, left or 0) for a, left in kept.items())
                return
            except NftError:
                pass
        self.nft.run(f"delete table inet {self.table}\n")
        try:
            self._install(trap, ban_time)
        except NftError:  # not the table's fault after all (the kernel lacks something)
            self._install(None, ban_time)  # the bans at least stay enforced
            self.elements.add_each((a, left or 0) for a, left in kept.items())
            raise
        self.elements.add_each((a, left or 0) for a, left in kept.items())
        self.made_anew = str(err)

    def _changed_sets(self) -> list[str]:
        """Our sets whose declaration is not what `table_commands` makes."""
        changed = []
        for name in ("ban4", "ban6", "served_tcp", "served_udp"):
            try:
                data = json.loads(self.nft.run(f"list set inet {self.table} {name}",
                                               as_json=True, terse=True))
            except (NftError, ValueError):
                continue
            for item in data.get("nftables", []):
                if "set" in item:
                    declared = item["set"]
                    ours = (declared.get("size") == self.set_size if name.startswith("ban")
                            else "dynamic" in declared.get("flags", []))
                    if not ours:
                        changed.append(name)
        return changed

    def _drop_sets(self, names: list[str]) -> None:
        """Our chains emptied (their rules may use the sets), then the sets
        deleted; `_install` fills both anew at once."""
        data = json.loads(self.nft.run(f"list table inet {self.table}", as_json=True,
                                       terse=True))
        chains = [i["chain"]["name"] for i in data.get("nftables", []) if "chain" in i]
        t = self.table
        self.nft.run("".join(f"flush chain inet {t} {c}\n" for c in chains)
                     + "".join(f"delete set inet {t} {n}\n" for n in names))

    def _install(self, trap: KernelTrap | None, ban_time: float) -> None:
        commands = table_commands(self.table, self.set_size, trap, ban_time) + self._never

        def make() -> int:
            self.nft.run("\n".join(commands + self._foreign_chains(commands)) + "\n")
            self.queue_error = None
            if trap is not None and trap.hold_queue:
                self.queue_error = self._add_queue_rule(trap.hold_queue)
                return 1 + (self.queue_error is None)
            return 1
        settled = self._made(make)
        made = (tuple(commands), self.queue_error)
        if settled:
            self._clean = (made, self.expected)
        elif self._clean is not None and self._clean[0] == made:
            self.expected = self._clean[1]  # the same table as last settled: that is ours
        else:
            self.expected = None  # cannot tell ours from theirs: the next check makes it again

    def _foreign_chains(self, commands: list[str]) -> list[str]:
        """Chains in our table that `commands` does not make (another
        program's, e.g. a hooked chain with policy drop): emptied, then
        deleted, in the same transaction as ours are filled anew."""
        prefix = f"add chain inet {self.table} "
        ours = {c[len(prefix):].split()[0] for c in commands if c.startswith(prefix)}
        try:
            data = json.loads(self.nft.run("list chains inet", as_json=True))
        except (NftError, ValueError):
            return []  # no table yet
        foreign = sorted({i["chain"]["name"] for i in data.get("nftables", [])
                          if "chain" in i and i["chain"].get("table") == self.table
                          and i["chain"]["name"] not in ours})
        return ([f"flush chain inet {self.table} {name}" for name in foreign]
                + [f"delete chain inet {self.table} {name}" for name in foreign])

    def _add_queue_rule(self, queue: int) -> str | None:
        """The hold chain's queue statement: nftables' own, or else the
        xtables NFQUEUE target; what failed, or None. Without it the hold
        chain is empty and held SYNs simply pass (fail open)."""
        try:
            self.nft.run(queue_rule(self.table, queue) + "\n")
            return None
        except NftError as native:
            try:
                add_compat_queue_rule(self.table, HOLD_CHAIN, queue)
                return None
            except OSError as compat:
                return f"no queue in this kernel: {native}; xtables NFQUEUE: {compat}"

    def fingerprint(self) -> str | None:
        """Our chains, rules (without their counters), table flags and static
        sets (trap ports, never-block) as they are now; None when the table is gone. Listed
        without the dynamic sets' elements: milliseconds, whatever the bans."""
        try:
            data = json.loads(self.nft.run(f"list table inet {self.table}", as_json=True,
                                           terse=True))
            items = data.get("nftables", [])
            parts = sorted(json.dumps([c["name"]] + [c.get(k) for k in CHAIN_KEYS])
                           for c in (i["chain"] for i in items if "chain" in i))
            parts += [json.dumps([i["rule"]["chain"], _uncounted(i["rule"]["expr"])])
                      for i in items if "rule" in i]
            # any table flag (dormant: every rule off; nft 1.0.6 garbles its name)
            parts += [json.dumps(["table flags", "flags" in i["table"]])
                      for i in items if "table" in i]
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

    def _made(self, make) -> bool:
        """Run `make` (our commits; it returns how many) and take the table as
        it made it: its fingerprint, and the generation (reconciliation need
        not list it again until something else is committed). Had another
        program committed meanwhile (the generation moved more than ours), its
        change could be in the listing and taken for ours: the table is made
        again, RACE_TRIES times at most. Settled (the listing is ours)? Also
        True where the generation cannot be read (nothing to tell by)."""
        for _ in range(RACE_TRIES):
            before = _generation_or_none()
            commits = make()
            now = _generation_or_none()
            self.expected = self.fingerprint()
            settled = None not in (before, now) and now == before + commits \
                and _generation_or_none() == now
            if settled or before is None:
                break
        self.checked_generation = now if settled else None
        nfnetlink.OWN_COMMITS.checked(self.checked_generation)
        return settled or before is None

    def intact(self) -> bool:
        """Is our table still as we installed it: rules, ban sets, trap ports,
        never-block list? (Another program may flush or rewrite any of it.)
        Listed only if a change was committed since it was last found so."""
        if self.expected is None:
            return False
        now = _generation_or_none()  # before the listing: a change meanwhile moves it again
        if now is not None and self.checked_generation is not None \
                and now in (self.checked_generation, nfnetlink.OWN_COMMITS.trusted):
            return True  # nothing committed since, or only our own bans and the like
        if self.fingerprint() != self.expected:
            return False
        self.checked_generation = now
        nfnetlink.OWN_COMMITS.checked(now)
        return True

    def set_never_block(self, never: AddressSet) -> None:
        """Replace the never-block sets atomically (the table made whole)."""
        if never_commands(self.table, never) != self._never:
            self.install(self._trap, self._ban_time, never)

    def is_peer(self, address) -> bool:
        """A mature peer: a completed handshake within PEER_MEMORY, the first
        one more than ruleset.PEER_MATURITY seconds ago (kernel sets peers*, young*)."""
        ip = ipaddress.ip_address(address)
        v = "4" if ip.version == 4 else "6"
        return self.elements.contains(f"peers{v}", ip) and not self.elements.contains(f"young{v}", ip)

    def disarm_trap(self) -> None:
        """Stop trapping (daemon stopping); bans stay enforced."""
        self.install(None, self._ban_time)

    def command(self, address, timeout: float) -> str:
        ip = canonical(address)  # never format anything but an address
        expiry = f" timeout {int(timeout)}s" if timeout > 0 else ""
        return f"add element inet {self.table} {_set_for(ip)} {{ {text(ip)}{expiry} }}"

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

    def ban_each(self, pairs: list) -> list[str]:
        """Ban (address, timeout) pairs in one transaction (all or none); the
        command text of each."""
        try:
            self.elements.add_each(pairs)
        except OSError as err:
            if err.errno == errno.ENFILE:
                raise SetFull(f"the ban set is full (BAN_SET_SIZE={self.set_size})") from None
            raise NftError(str(err)) from None
        return [self.command(address, timeout) for address, timeout in pairs]

    def unban(self, address, pardon: bool = False) -> bool:
        """False when the address was not banned. `pardon` (an admin's
        unblock): its scan counts in the kernel go too, so that its next late
        ACK does not ban again (set dumps: not for expiries and evictions)."""
        try:
            self.elements.delete([address])
        except OSError:
            return False
        if pardon:
            ip = canonical(address)
            for counts, seen in (("ackers", "acked"), ("protocolers", "protos")):
                self._forget(ip, f"{counts}{ip.version}", f"{seen}{ip.version}")
        return True

    def _forget(self, ip, counts: str, seen: str) -> None:
        """A pardoned host's scan count in the kernel (ACK or IP protocol
        scans): its token bucket and the (source, port) pairs seen, so that
        a port probed again counts."""
        try:
            pairs = [k for k in dump_keys(self.table, seen) if k.startswith(ip.packed)]
        except OSError:
            return  # no such rules
        for name, keys in ((counts, [ip.packed]), (seen, pairs)):
            try:
                if keys:
                    self.elements.delete_keys(name, keys)
            except OSError:
                pass  # none counted (or expired meanwhile)

    def banned(self) -> dict[str, float | None]:
        """Address -> seconds left (None when the ban has no timeout). A dump
        taken while the kernel resizes the set may miss elements: confirm an
        absence with `holds` before acting on it."""
        return self._ban_sets(dump_set, lambda left: left)

    def banned_counted(self) -> dict[str, tuple[float | None, int | None, int | None]]:
        """Address -> (seconds left, packets and bytes its ban dropped): `banned`,
        with each element's counter (None in a table made before the counters)."""
        return self._ban_sets(dump_counted, lambda value: value[0])

    def _ban_sets(self, dump, left_of) -> dict:
        """Both ban sets as `dump` reads them (address -> its value); a mapped
        address found in ban6 is moved to ban4 on the way."""
        found = {}
        try:
            for name in ("ban4", "ban6"):
                for address, value in dump(self.table, name).items():
                    ip = ipaddress.ip_address(address)
                    if ip.version == 6 and ip.ipv4_mapped is not None:
                        address = self._move_mapped(ip, left_of(value))
                    found[address] = value
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
