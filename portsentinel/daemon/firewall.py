"""Our nftables table kept as it should be: installed with the kernel trap,
the never-block sets and the ports served lately; put back when another
program changes it; its ban sets reconciled with the state; never full."""

from __future__ import annotations

import ipaddress
import time

from .. import logs
from ..engine import TCP, UDP
from ..listeners import loaded_transports, transport_bound
from ..nft import NftError
from ..nftwatch import RulesetWatch
from ..store import BanRecord
from .assembly import RECONCILE_EVERY
from .context import Context
from .ledger import BanLedger

CHECK_DELAY = 0.05  # after a deletion in our table: let a burst of events pass
TROUBLE_RETRY = 2.0  # s between tries while our table cannot be restored
FOUND_LINES = 1000  # bans found in the firewall with a line each (the count is logged too)
RECONCILE_PER_BAN = 0.001  # a dump costs ~10 us a ban, so at most ~1 % of a core
SET_WARN, SET_EVICT, SET_EVICT_TO = 0.80, 0.95, 0.90  # of BAN_SET_SIZE
TRANSPORT_SERVED_FOR = 30.0  # s a served SCTP/UDP-Lite/DCCP port is kept (polled every 10 s)


class Firewall:
    def __init__(self, ctx: Context, ledger: BanLedger, listening):
        self.ctx, self.ledger, self.listening = ctx, ledger, listening
        self.kernel_trap = None  # as last installed (put back after a flush)
        self.never_block = ctx.engine.policy.never_block  # as last pushed
        self.watch: RulesetWatch | None = None
        self.check_due = 0.0  # monotonic time of the next check of our table; 0: none
        self.next_reconcile = time.monotonic() + RECONCILE_EVERY
        self._served_pushed: dict[str, dict[int, float]] = {TCP: {}, UDP: {}}
        self._set_warned = False
        self._unlisted: set[str] = set()  # transports whose sockets cannot be listed (said)
        self.bypass = ledger.bypass
        self.trouble: str | None = None  # why our table could not be restored, while so
        self.dropped: dict[str, tuple[int, int]] = {}  # packets, bytes at the last reconciliation

    # -- owner thread ------------------------------------------------------
    def install(self, kernel_trap, trapped) -> None:
        """The table, its kernel trap and never-block sets (start, reload)."""
        self.kernel_trap = kernel_trap
        self._install_table()
        self.reset_served()
        for protocol in trapped:
            self.ctx.log(f"adminalert: kernel trap armed for {protocol.upper()}: the first "
                         "probe to a trap port is banned inside the kernel", logs.INFO)

    def _install_table(self) -> None:
        bans = self.ctx.bans
        bans.install(self.kernel_trap, self.ctx.config.ban_time, self.never_block)
        if bans.made_anew:
            self.ctx.log.error(f"adminalert: WARNING: our nftables table could not be refilled "
                               f"({bans.made_anew}); it was deleted and made anew, its bans "
                               "kept")

    def kernel_decides(self, protocol: str) -> bool:
        """Is the kernel trap armed for `protocol`, with its bans reported to us?"""
        trap = self.kernel_trap
        return bool(trap and trap.log_group and (trap.ban_tcp if protocol == TCP
                                                  else trap.ban_udp))

    def set_never_block(self, never_block) -> None:
        self.never_block = never_block
        if self.ctx.bans is None:
            return
        try:
            self.ctx.bans.set_never_block(never_block)
        except NftError as err:
            self.ctx.log.error(f"adminalert: ERROR: kernel never-block set not updated: {err}")

    def reset_served(self) -> None:
        self._served_pushed = {TCP: {}, UDP: {}}
        self.push_served()

    def push_served(self) -> None:
        """Ports served lately go to the kernel's served_* sets, so that the
        trap spares a service's port while it restarts (SERVICE_MEMORY)."""
        memory = self.ctx.config.service_memory
        if self.ctx.bans is None:
            return
        self._push_transports(memory)
        if not memory:
            return
        now = time.monotonic()
        for protocol in (TCP, UDP):
            if self.listening.age(protocol) > 0.9:  # asked for a probe just now: fresh
                self.listening.refresh(protocol)
            pushed = self._served_pushed[protocol]
            due = [p for p, at in self.listening.last_served[protocol].items()
                   if now - at <= memory and now - pushed.get(p, float("-inf")) > memory / 4]
            if due:
                self.ctx.bans.elements.refresh_ports(f"served_{protocol}", due, memory)
                pushed.update((p, now) for p in due)

    def _push_transports(self, memory: float) -> None:
        """The SCTP, UDP-Lite and DCCP ports sockets serve: the kernel's socket
        lookup knows only TCP and UDP, so their probes' evidence rules read
        these sets. A transport the kernel has not loaded serves nothing."""
        trap = self.kernel_trap
        judged = set(trap.transports) if trap and trap.ack_window > 0 else set()
        for name in sorted(judged & loaded_transports()):
            try:
                ports = transport_bound(name)
            except OSError as err:
                if name not in self._unlisted:
                    self._unlisted.add(name)
                    self.ctx.log.error(
                        f"adminalert: WARNING: cannot list this host's {name.upper()} sockets "
                        f"({err.strerror}): {name.upper()} port scans are not banned (any "
                        "port might be a service's)")
                continue
            self._unlisted.discard(name)
            if ports:
                self.ctx.bans.elements.refresh_ports(f"served_{name}", ports,
                                                     max(memory, TRANSPORT_SERVED_FOR))

    def watch_fill(self, active: int) -> None:
        """The ban sets must never fill silently: a full set bans no one more.
        Warn at 80 %; past 95 %, lift the automatic bans that end soonest,
        down to 90 %, so that a new scanner always finds room."""
        size = self.ctx.config.ban_set_size
        self.ctx.metrics.ban_set_fill.set(active / size)
        if active >= SET_WARN * size and not self._set_warned:
            self._set_warned = True
            self.ctx.log.error(
                f"adminalert: WARNING: {active} bans in force, {active / size:.0%} of "
                f"BAN_SET_SIZE ({size}); past {SET_EVICT:.0%} the bans that end soonest are "
                "lifted to make room (a spoofed flood?)")
        elif active < SET_WARN * size:
            self._set_warned = False
        full = self.ledger.set_full
        if (active >= SET_EVICT * size or full) and not self.ledger.expiring:
            self.ledger.set_full = False
            excess = active - int(SET_EVICT_TO * size)
            if full:  # the kernel's count is ahead of the state's
                excess = max(excess, size // 20)
            if excess <= 0:
                return
            self.ledger.lift_later(self.ctx.store.soonest_expiring(excess), "evict")

    def reconcile_due(self, active: int) -> bool:
        if self.ctx.bans is None or time.monotonic() < self.next_reconcile:
            return False
        self.next_reconcile = time.monotonic() + max(RECONCILE_EVERY, active * RECONCILE_PER_BAN)
        return True

    def open_watch(self) -> RulesetWatch | None:
        if self.ctx.bans is None:
            return None
        try:
            self.watch = RulesetWatch(self.ctx.config.nft_table)
        except OSError as err:
            self.ctx.log.error(f"adminalert: ERROR: cannot watch the ruleset ({err}); a "
                               "flushed firewall is found by reconciliation instead")
        return self.watch

    def ruleset_event(self) -> None:
        if self.watch.touched() and not self.check_due:
            self.check_due = time.monotonic() + CHECK_DELAY

    def _retry(self) -> None:
        """Owner thread: check again soon (a table that cannot be restored
        may go without an event, e.g. with the process that owned it)."""
        if not self.check_due:
            self.check_due = time.monotonic() + TROUBLE_RETRY

    def check_now(self) -> None:
        """Owner thread: the check after ruleset events, on the worker."""
        self.check_due = 0.0
        self.ctx.worker.put(self.verify)

    # -- worker -------------------------------------------------------------
    def verify(self) -> bool:
        """Another program deleted something of our table: if anything is
        missing, install the table again and put back every ban. Was it put
        back (False too when it could not be: then `trouble` says why)?"""
        bans = self.ctx.bans
        if bans is None or bans.intact():
            return False
        started = time.perf_counter()
        if self.trouble is None:  # said once; while it lasts, each failed try says why
            self.ctx.metrics.drift.labels("table").inc()
            self.ctx.log.error("adminalert: WARNING: our nftables table was changed by another "
                               "program (a ruleset flush?); restoring it, the kernel trap and "
                               "every ban")
        try:
            self._install_table()
        except NftError as err:
            trouble = f"our nftables table could not be restored ({err})"
            if trouble != self.trouble:  # said once; `status` says it while it lasts
                self.ctx.log.error(f"adminalert: ERROR: {trouble}: bans and the kernel trap "
                                   f"may not be in force; tried again every {TROUBLE_RETRY:g} s")
            self.trouble = trouble
            self.ctx.inbox.post(self._retry)
            return False
        self.trouble = None
        self.ctx.inbox.post(self.reset_served)
        now = time.time()
        records = self.ledger.in_force(now)
        bans.elements.add_each(self._again(records, now))
        self.ctx.log(f"adminalert: firewall restored: table, kernel trap and {len(records)} "
                     f"bans, in {1000 * (time.perf_counter() - started):.0f} ms", logs.NOTICE)
        return True

    def reconcile(self) -> dict:
        """Kernel sets against the state: each difference is logged, counted and
        fixed (a ban only in the kernel is recorded; one only in the state is put
        back). A missing or changed table is installed anew first (verify)."""
        self.ledger.flush()  # the state as complete on disk as the sets compared with it
        restored = self.verify()  # the table, its rules and static sets (a lost event?)
        if self.trouble:  # nothing to compare with: said, and tried again meanwhile
            return {"kernel_only": [], "state_only": [], "table_restored": False,
                    "firewall_trouble": self.trouble}
        now = time.time()
        try:
            counted = self.ctx.bans.banned_counted()
        except NftError as err:
            self.ctx.report_error(f"reconciliation: cannot list the ban sets: {err}")
            return {"kernel_only": [], "state_only": [], "table_restored": restored}
        kernel = {address: left for address, (left, _, _) in counted.items()}
        self.dropped = {a: (n, size or 0) for a, (_, n, size) in counted.items() if n}
        self.ctx.metrics.banned_dropped.set(sum(n for n, _ in self.dropped.values()))
        self.bypass.check(kernel)
        stored = {r.address: r for r in self.ledger.in_force(now + 1)}
        unknown = {a: left for a, left in kernel.items()
                   if a not in stored and a not in self.ledger.expiring}
        decided = self.ctx.inbox.call(self._engine_holds, list(unknown))  # not stored yet
        kernel_only = {a: left for a, left in unknown.items() if a not in decided}
        state_only = [r for a, r in stored.items() if a not in kernel
                      and not self.ctx.bans.holds(a)]  # a dump during a resize can miss some
        if kernel_only:
            self.record_found(kernel_only, now)
            self.ctx.metrics.drift.labels("kernel_only").inc(len(kernel_only))
            self.ctx.log.error(f"adminalert: WARNING: {len(kernel_only)} bans were in the "
                               f"firewall but not in the state; now recorded: "
                               f"{_some(kernel_only)}")
        if state_only:
            self.ctx.bans.elements.add_each(self._again(state_only, now))
            self.ctx.metrics.drift.labels("state_only").inc(len(state_only))
            self.ctx.log.error(f"adminalert: WARNING: {len(state_only)} bans were missing "
                               f"from the firewall and are back: "
                               f"{_some(r.address for r in state_only)}")
        return {"kernel_only": sorted(kernel_only), "state_only": [r.address for r in state_only],
                "table_restored": restored, "bypass": self.bypass.status()}

    def _again(self, records, now: float):
        """Bans to put back, each with what it had dropped by the last
        reconciliation (its counter went with the element)."""
        return [(r.address, r.remaining(now) or 0, self.dropped.get(r.address))
                for r in records]

    def _engine_holds(self, addresses: list[str]) -> set[str]:
        engine = self.ctx.engine
        return {a for a in addresses if engine.is_blocked(ipaddress.ip_address(a))}

    def adopt(self, known: set[str]) -> None:
        """Bans in our nftables sets that the state does not know (e.g. made by
        the kernel trap while the daemon was down) are recorded, not dropped."""
        found = {a: left for a, left in self.ctx.bans.banned().items() if a not in known}
        if not found:
            return
        self.record_found(found, time.time())
        self.ctx.metrics.active_bans.set(self.ctx.store.count())
        self.ctx.log(f"adminalert: adopted {len(found)} bans found only in the firewall",
                     logs.INFO)

    def record_found(self, found: dict[str, float | None], now: float) -> None:
        """Record bans found only in our sets (address -> seconds left), never
        over a record made meanwhile."""
        records = [BanRecord(a, now, None if left is None else now + left,
                             reason="found in the firewall", origin="kernel")
                   for a, left in found.items()]
        self.ctx.store.add_bans(records, replace=False)
        self.ctx.inbox.post(self._engine_restore, records)
        # no silent ban: each gets a line (one whose report a SIGKILL lost, say)
        for address in sorted(found)[:FOUND_LINES]:
            self.ctx.log(f"attackalert: Host {address} was found blocked in the firewall "
                         "with no record (banned while the daemon was down, or just before "
                         "it stopped); recorded", logs.NOTICE)

    def _engine_restore(self, records: list[BanRecord]) -> None:
        for r in records:
            self.ctx.engine.restore(ipaddress.ip_address(r.address), r.since, r.until)

    def unrecorded(self, network, known: set[str]) -> list[str]:
        """Addresses in our ban sets, within `network`, that nothing recorded."""
        if self.ctx.bans is None:
            return []
        try:
            banned = self.ctx.bans.banned()
        except NftError:
            return []
        return [a for a in banned if a not in known and ipaddress.ip_address(a) in network]


def _some(addresses, most: int = 10) -> str:
    listed = sorted(addresses)
    more = f" and {len(listed) - most} more" if len(listed) > most else ""
    return ", ".join(listed[:most]) + more
