"""The ban ledger: one object applies and lifts a ban everywhere, in one
fixed order, whoever made it (engine, kernel trap, admin, fleet member).

Applying: the nftables set first (inline on the owner thread for a probe,
tens of microseconds over netlink; on the worker for an admin's or a fleet
member's ban), then on the worker: the compatibility actions in PortSentry's
order (hosts.deny, KILL_ROUTE, KILL_RUN_CMD), the state, the history and
blocked files, the fleet, the JSON log. A crash in between leaves a ban in
the firewall that the state does not know, which reconciliation records
("found in the firewall"): a ban is never lost. If every action fails, the
engine forgets the ban so that the next probe tries again.

Lifting (worker; the engine forgets first, on its own thread): the nftables
set, the compatibility undo as it was at ban time, then the state.

The state is written in groups: a settled ban waits in `pending` until the
worker's queue is empty, FLUSH_EVERY bans wait, or something reads the whole
state (reconciliation, a retry), then the group is one transaction. Until
then it is found, listed and liftable as if written, and wins over an older
record of its address. A crash loses only the group: its bans are in the
kernel's sets, which reconciliation records ("found in the firewall").

The state may refuse a write (locked by another program, a full disk): the
records are kept in memory (`unsaved`), listed and liftable, and written
later; a lifted ban whose removal failed is removed later and never put back
by reconciliation.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

from .. import logs
from ..addrset import from_stored
from ..engine import HOSTS_DENY, KILL_ROUTE, NFTABLES, RUN_CMD, Order
from ..nft import NftError, SetFull
from ..responders import ActionFailed, CompatActions, Records
from ..store import BanRecord
from .bypass import BypassWatch
from .context import Context

# bans this member made (shared with the fleet); any other origin is a fleet member's name
LOCAL_ORIGINS = ("local", "cli", "kernel", "correlation")
FLUSH_EVERY = 256  # pending bans at most: in a long burst, written every so many
LIFTED = {"expire": "expired", "fleet": "lifted by a fleet member",
          "evict": "lifted to make room (ban sets nearly full)", "unblock": "lifted by command"}


class BanLedger:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        # settled, not written yet: address -> (record, counts as an offence), in order
        self.pending: dict[str, tuple[BanRecord, bool]] = {}
        self.unsaved: dict[str, BanRecord] = {}  # bans whose state write failed: retried
        # writers: the worker, and a command run in place when the worker's queue is full
        self._writing = threading.RLock()
        self.unremoved: dict[str, str] = {}  # lifted bans whose removal failed -> cause
        self.expiring: set[str] = set()  # lifts queued, not done yet
        self.set_full = False  # the kernel refused a ban: make room now
        self.bypass = BypassWatch(ctx)  # bridges that forward banned sources' packets anyway
        self.configure()

    def configure(self) -> None:
        """The compatibility actions and files of the current config (start, reload)."""
        config = self.ctx.config
        self.compat = CompatActions(config, self.ctx.log)
        self.records = Records(config.history_file, config.blocked_file, self.ctx.log)

    # -- applying ---------------------------------------------------------
    def ban_now(self, address, seconds: float, replace: bool) -> str | Exception:
        """The nftables ban (owner thread, on the packet path): the command
        text for the log, or the error. `replace` sets this timeout even if
        the kernel trap put the address in already (an escalated ban)."""
        try:
            return self.ctx.bans.ban(address, seconds, replace=replace)
        except NftError as err:
            self.set_full = self.set_full or isinstance(err, SetFull)
            return err

    def ban_group(self, pairs: list) -> list:
        """Many (address, seconds) bans in one transaction (owner thread): each
        one's command text or error. A refused transaction changed nothing,
        so its bans are made one by one, each with its own outcome."""
        try:
            return self.ctx.bans.ban_each(pairs)
        except NftError:
            return [self.ban_now(address, seconds, replace=False) for address, seconds in pairs]

    def kernel_made(self, address, seconds: float, escalated: bool) -> str | Exception:
        """A ban the kernel trap made: its command text, or the escalation's outcome."""
        if escalated:
            return self.ban_now(address, seconds, replace=True)
        return self.ctx.bans.command(address, seconds)

    def settle(self, record: BanRecord, actions, nft_result, name: str | None = None,
               history: bool = True) -> bool:
        """Worker: the rest of a ban whose nftables part is done (`nft_result`):
        compatibility actions, state, files, fleet, JSON. False (and the engine
        forgets it) when no action worked."""
        done = sum(self._action(action, record, nft_result) for action in actions)
        if not done:
            self.ctx.inbox.post(self.ctx.engine.lift, from_stored(record.address))
            return False
        self.save(record)
        if NFTABLES in actions and not isinstance(nft_result, Exception):
            self.bypass.copy(record.address, record.remaining(time.time()))
        self.ctx.metrics.active_bans.inc()  # exact again at the next housekeeping
        self.ctx.metrics.bans.labels(
            record.origin if record.origin in LOCAL_ORIGINS else "fleet").inc()
        self.ctx.metrics.bans_by_evidence.labels(record.evidence or "ungraded").inc()
        if history:
            self.records.blocked(time.time(), record.address, name, record.port or 0,
                                 record.protocol, record.mode)
        if self.ctx.fleet is not None and record.origin in LOCAL_ORIGINS:
            self.ctx.fleet.announce_ban(announcement(record))
        self.json_event("block", record.address, port=record.port, protocol=record.protocol,
                        mode=record.mode, reason=record.reason, origin=record.origin,
                        until=record.until, actions=list(actions), evidence=record.evidence)
        return True

    def _action(self, action: str, record: BanRecord, nft_result) -> bool:
        target, port, mode = record.address, record.port or 0, record.mode or ""
        try:
            if action == NFTABLES:
                if isinstance(nft_result, Exception):
                    raise ActionFailed(f"nftables: {nft_result}")
                self.ctx.log(logs.route_line(target, nft_result))
            elif action == HOSTS_DENY:
                record.hosts_deny_line = self.compat.hosts_deny(target, port, mode)
                record.hosts_deny_file = str(self.ctx.config.hosts_deny_file)
            elif action == KILL_ROUTE:
                record.kill_route_command = self.compat.kill_route(target, port, mode)
                if record.kill_route_command:
                    record.kill_route_undo = self.compat.undo_for(
                        target, record.kill_route_command, port, mode)
            elif action == RUN_CMD:
                self.compat.run_cmd(target, port, mode)
            return True
        except (ActionFailed, OSError) as err:
            self.ctx.log.error(f"adminalert: ERROR: {action} for host {target} failed: {err}")
            return False

    def apply(self, order: Order, origin: str, reason: str, port: int | None = None,
              protocol: str | None = None) -> bool:
        """Worker: an admin's, a fleet member's or the fleet's correlation's
        ban, everywhere; with `port`, a detection here: in the history too."""
        record = BanRecord(str(order.address), order.since, order.until, port, protocol,
                           self.ctx.mode(protocol) if protocol else None, reason=reason,
                           origin=origin, evidence=order.evidence or None)
        nft_result = None
        if NFTABLES in order.actions:
            nft_result = self.ban_now(order.address, order.ban_seconds, replace=True)
        return self.settle(record, order.actions, nft_result, history=port is not None)

    def set_time(self, order: Order) -> str | None:
        """Worker: a ban in force gets a new end; an error, or None."""
        if self.ctx.bans is not None:
            try:
                self.ctx.bans.ban(order.address, order.ban_seconds, replace=True)
            except NftError as err:
                return f"could not set the ban time of {order.address}: {err}"
        record = self.find(str(order.address))
        if record is not None:  # none: its report, ahead in the queue, failed
            record.until = order.until
            self.save(record, count_offence=False)
        return None

    # -- lifting ----------------------------------------------------------
    def lift(self, record: BanRecord, cause: str) -> list[str]:
        """Worker: undo one ban everywhere; the problems, if any. A newer ban
        of the same address (made after this one was chosen for lifting, e.g.
        an expiry queued while the host scanned again) is left alone."""
        current = self.find(record.address)
        if current is not None and current.since != record.since:
            self.expiring.discard(record.address)
            return []
        if record.address in self.pending:  # written first, as one write a ban would be:
            self.flush()                    # the offence counts, the events are in order
        self.ctx.inbox.post(self.ctx.engine.lift, from_stored(record.address), False, record.since)
        if self.ctx.bans is not None:
            self.ctx.bans.unban(from_stored(record.address), pardon=cause == "unblock")
            self.bypass.uncopy(record.address)
        problems = self.compat.undo(record.address, record.hosts_deny_line,
                                    record.kill_route_command, record.port or 0,
                                    record.mode or "", record.hosts_deny_file,
                                    record.kill_route_undo)
        self.unsaved.pop(record.address, None)
        self.remove(record.address, cause)
        self.expiring.discard(record.address)
        self.ctx.metrics.unbans.labels(cause).inc()
        self.ctx.log(f"adminalert: Host {record.address} ban {LIFTED[cause]}; unblocked",
                     logs.NOTICE)
        for problem in problems:
            self.ctx.log.error(f"adminalert: ERROR: unblock {record.address}: {problem}")
        self.json_event("expire" if cause == "expire" else "unblock", record.address,
                        problems=problems)
        if cause == "unblock" and self.ctx.fleet is not None:  # an admin's word: fleet-wide
            self.ctx.fleet.announce_unban(record.address)
        return problems

    def lift_unrecorded(self, address: str) -> None:
        """Worker: a ban found in our sets that nothing recorded."""
        self.ctx.bans.unban(from_stored(address), pardon=True)
        self.ctx.metrics.unbans.labels("unblock").inc()
        self.ctx.log(f"adminalert: Host {address} was in the firewall's ban set without a "
                     "record (made behind our back?); lifted by command", logs.NOTICE)

    def lift_later(self, records: list[BanRecord], cause: str) -> None:
        """Owner thread: queue lifts (the engine forgot these already); what
        the queue cannot take now is offered again by the next housekeeping."""
        fresh = [r for r in records if r.address not in self.expiring]
        self.expiring.update(r.address for r in fresh)
        if cause == "evict":  # one job, one warning
            if fresh and not self.ctx.worker.put(lambda: self._evict(fresh)):
                self.expiring.difference_update(r.address for r in fresh)
            return
        for record in fresh:
            if not self.ctx.worker.put(lambda r=record: self.lift(r, cause)):
                self.expiring.discard(record.address)

    def _evict(self, victims: list[BanRecord]) -> None:
        for record in victims:
            self.lift(record, "evict")
        self.ctx.log.error(f"adminalert: WARNING: ban sets nearly full: lifted the "
                           f"{len(victims)} bans that end soonest to make room for new ones")

    # -- the state --------------------------------------------------------
    def find(self, address: str) -> BanRecord | None:
        """The newest record of `address`, written or not (any thread). Looked
        up where a record goes in turn (pending, unsaved, the state), so that
        one written meanwhile is not missed."""
        entry = self.pending.get(address)
        if entry is not None:
            return entry[0]
        return self.unsaved.get(address) or self.ctx.store.get_ban(address)

    def in_force(self, now: float | None = None) -> list[BanRecord]:
        """Every recorded ban, those not written yet included (the newest
        record of each address, read in `find`'s order); with `now`, only
        those not over and not being lifted."""
        newest = {r.address: r for r, _ in list(self.pending.values())}
        for record in list(self.unsaved.values()):
            newest.setdefault(record.address, record)
        records = [r for r in self.ctx.store.bans() if r.address not in newest]
        records += newest.values()
        if now is None:
            return records
        return [r for r in records
                if (r.until is None or r.until > now) and r.address not in self.unremoved]

    def save(self, record: BanRecord, count_offence: bool = True) -> None:
        """The record goes to the state with the next group (see `flush`)."""
        with self._writing:
            if record.address in self.pending:  # its earlier write first, each its own
                self.flush()
            self.pending[record.address] = (record, count_offence)
            if len(self.pending) >= FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:
        """Write what is pending, in one transaction: the worker calls this
        when its queue is empty, and before reading the whole state. What the
        state refuses is kept in `unsaved` (before it leaves `pending`, so a
        reader always finds it) and retried."""
        with self._writing:
            if not self.pending:
                return
            group = list(self.pending.values())
            try:
                self.ctx.store.add_bans_logged(group)
                for record, _ in group:
                    self.unsaved.pop(record.address, None)  # an older, failed write
            except sqlite3.Error as err:
                self._keep([record for record, _ in group], err)
            self.pending.clear()

    def _keep(self, records: list[BanRecord], err: sqlite3.Error) -> None:
        new = [r.address for r in records if r.address not in self.unsaved]
        self.unsaved.update((r.address, r) for r in records)
        if new:
            self.ctx.metrics.dropped.labels("state write failed").inc(len(new))
            what = f"the ban of {new[0]} is" if len(new) == 1 else \
                f"the bans of {len(new)} addresses ({new[0]}, ...) are"
            self.ctx.report_error(f"cannot write the state ({err}): {what} kept in memory "
                                  "and written later")

    def remove(self, address: str, cause: str) -> None:
        try:
            if self.ctx.store.remove_ban(address, cause) is not None:
                self.ctx.metrics.active_bans.dec()
            self.unremoved.pop(address, None)
        except sqlite3.Error as err:
            if address not in self.unremoved:
                self.ctx.metrics.dropped.labels("state write failed").inc()
                self.ctx.report_error(f"cannot write the state ({err}): the lifted ban of "
                                      f"{address} is removed from it later")
            self.unremoved[address] = cause

    def retry(self) -> None:
        """Worker: write what the state could not take (with what is pending)."""
        with self._writing:
            for address, record in list(self.unsaved.items()):
                self.pending.setdefault(address, (record, True))  # a newer record wins
            self.flush()
        for address, cause in list(self.unremoved.items()):
            self.remove(address, cause)
        if not self.unsaved and not self.unremoved:
            self.ctx.log("adminalert: the state is writable again; every ban is recorded",
                         logs.INFO)

    def json_event(self, event: str, address: str, **fields) -> None:
        path = self.ctx.config.json_log
        if path is None:
            return
        line = json.dumps({"time": round(time.time(), 6), "event": event, "address": address,
                           **fields})
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as err:
            self.ctx.metrics.dropped.labels("json log unwritable").inc()
            self.ctx.log.error(f"adminalert: ERROR: cannot write {path}: {err.strerror}")


def announcement(record: BanRecord) -> dict:
    """A ban as the fleet shares it."""
    return {"address": record.address, "since": record.since, "until": record.until,
            "reason": record.reason, "port": record.port, "protocol": record.protocol,
            "evidence": record.evidence}

