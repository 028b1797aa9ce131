"""Commands from outside: the control socket (status, list, block, unblock,
reconcile, reload; control thread) and fleet members' bans (fleet thread).
The engine's part goes through the inbox to the run loop; the firewall and
compatibility actions run on the worker, whose outcome the CLI waits for."""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import sqlite3
import time

from .. import __version__, logs
from ..addrset import canonical, canonical_network, from_stored
from ..engine import FLEET, HANDSHAKE, MANUAL, TCP, UDP, Order, Verdict
from ..control import TIMEOUT as CLIENT_TIMEOUT
from ..nft import NftError
from ..store import BanRecord
from .assembly import kernel_trap_armed
from .context import Context
from .firewall import Firewall
from .ledger import LOCAL_ORIGINS, BanLedger, announcement

# one fleet member's evidence in Redis, as fleet.py writes it: "<member> <port>/<protocol>"
# (anything else there is another program's, never logged)
EVIDENCE_ENTRY = re.compile(r"[A-Za-z0-9_.-]{1,64} (\d{1,5})/(?:tcp|udp)\Z")
CORRELATION_LINES = 2  # a second: "not banning" lines of the fleet's correlation (a flood's)

WORKER_WAIT = CLIENT_TIMEOUT - 5  # the firewall's part: answer before the CLI gives up
RELOAD_WAIT = 60.0


class Commands:
    def __init__(self, ctx: Context, ledger: BanLedger, firewall: Firewall, reload):
        self.ctx, self.ledger, self.firewall = ctx, ledger, firewall
        self.reload = reload  # the daemon's reload (owner thread)
        self._correlation_lines = logs.LineBudget(CORRELATION_LINES, CORRELATION_LINES)

    def handle(self, request: dict) -> dict:
        try:
            return self._handle(request)
        except TimeoutError as err:  # the run loop or the worker is stuck, or swamped
            return {"ok": False, "error": str(err) or "the daemon is busy; see the log"}
        except Exception as err:  # a reply, always, and the reason in the log
            self.ctx.log.error(f"adminalert: ERROR: {request.get('command')!r} failed: {err!r}")
            return {"ok": False, "error": f"failed: {err!r}; see the log"}

    def _handle(self, request: dict) -> dict:
        command = request.get("command")
        if command == "status":
            return self.status()
        if command == "list":
            return {"ok": True, "bans": self.list_bans()}
        if command == "unblock":
            return self.unblock(str(request.get("target", "")))
        if command == "block":
            return self.block(str(request.get("address", "")), request.get("seconds"))
        if command == "reconcile":  # the periodic check, now
            if self.ctx.bans is None:
                return {"ok": False, "error": "no nftables table to reconcile (BLOCK_NFTABLES=0)"}
            return {"ok": True, **self._on_worker(self.firewall.reconcile)}
        if command == "reload":
            return self.ctx.inbox.call(self.reload, timeout=RELOAD_WAIT)
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _on_worker(self, job, slow: str = "the firewall's part is taking long; see the log"):
        """Run `job` on the worker and wait for its result; when the worker's
        queue is full, here (an admin's command still gets done)."""
        outcome: queue.SimpleQueue = queue.SimpleQueue()

        def run():
            try:
                outcome.put((True, job()))
            except Exception as err:
                outcome.put((False, err))

        if not self.ctx.worker.put(run):
            run()
        try:
            ok, value = outcome.get(timeout=WORKER_WAIT)
        except queue.Empty:
            raise TimeoutError(slow) from None
        if not ok:
            raise value
        return value

    # -- status and list ----------------------------------------------------
    def status(self) -> dict:
        ctx, config = self.ctx, self.ctx.config
        pending = ctx.inbox.call(lambda: ctx.engine.pending_hosts)
        fleet = ctx.fleet
        return {"ok": True, "version": __version__, "pid": os.getpid(), "since": ctx.started,
                "modes": {"tcp": ctx.modes[TCP], "udp": ctx.modes[UDP]},
                "config": config.source,
                "firewall": f"nftables inet {config.nft_table}" if ctx.bans else "none",
                "firewall_trouble": self.firewall.trouble,
                "bypass": self.firewall.bypass.status(),
                "kernel_trap": [p for p in (TCP, UDP)
                                if kernel_trap_armed(config, p, ctx.modes[p])],
                "first_contact_hold": ctx.hold,
                "active_bans": ctx.store.count(), "pending_hosts": pending,
                "bans_by_evidence": ctx.store.evidence_counts(),
                "fleet": None if fleet is None else {
                    "member": fleet.member, "connected": fleet.connected.is_set(),
                    "unpublished": len(fleet.backlog), "evidence_sent": fleet.evidence_sent,
                    "evidence_dropped": fleet.evidence_dropped},
                "report_queue": ctx.worker.jobs.qsize(), "counters": self.counters()}

    def counters(self) -> dict[str, int]:
        return {name: int(value) for name, value in self.ctx.metrics.snapshot().items()}

    def list_bans(self) -> list[dict]:
        """Every ban, with the packets it dropped (its nftables set element's
        counter; None without one: no nftables ban, or a table made before)."""
        now = time.time()
        counted = {}
        if self.ctx.bans is not None:
            try:
                counted = self.ctx.bans.banned_counted()
            except NftError:
                pass
        return [{**dataclasses.asdict(r), "remaining": r.remaining(now),
                 "dropped": counted.get(r.address, (None, None))[1]}
                for r in self.ledger.in_force()]

    # -- block and unblock -----------------------------------------------------
    def block(self, address: str, seconds) -> dict:
        """An admin's ban. An address blocked already only gets its ban time
        set: no command runs twice (two iptables rules that one unblock could
        not both lift)."""
        try:
            ip = canonical(address)
        except ValueError:
            return {"ok": False, "error": f"{address!r} is not an IP address"}
        length = None if seconds is None else float(seconds)
        now = time.time()
        record = self.ledger.find(str(ip))
        recorded = None if record is None or not _in_force(record, now) else (record.since,
                                                                              record.until)
        order = self.ctx.inbox.call(self.ctx.engine.block, ip, now, length, recorded)
        if order.verdict is Verdict.REFUSED:
            return {"ok": False, "error": order.error}
        if order.verdict is Verdict.ALREADY_BLOCKED:
            return self._set_time(order)

        def apply() -> bool:
            done = self.ledger.apply(order, "cli", "manual")
            if done:
                self.ctx.log(f"adminalert: Host {ip} blocked by command for "
                             f"{_duration(order.ban_seconds)}", logs.NOTICE)
            return done

        if not self._on_worker(apply, f"blocking {ip} is taking long; see the log"):
            return {"ok": False, "error": f"could not block {ip}: no block action worked"}
        return {"ok": True, "address": str(ip), "until": order.until}

    def _set_time(self, order: Order) -> dict:
        error = self._on_worker(lambda: self.ledger.set_time(order))
        if error:
            return {"ok": False, "error": error}
        lasts = (f"{_duration(order.ban_seconds)} from now" if order.ban_seconds
                 else _duration(0))
        self.ctx.log(f"adminalert: Host {order.address} was blocked already; its ban now lasts "
                     f"{lasts}", logs.NOTICE)
        return {"ok": True, "address": str(order.address), "until": order.until,
                "already": True}

    def unblock(self, target: str) -> dict:
        try:
            network = canonical_network(target)
        except ValueError:
            return {"ok": False, "error": f"{target!r} is not an IP address or CIDR network"}
        records = [r for r in self.ledger.in_force() if from_stored(r.address) in network]
        known = {r.address for r in records}
        # the engine first (and bans it holds without a record, e.g. mid-report);
        # an admin says these were mistakes, so the next ban starts afresh
        records += self.ctx.inbox.call(self._forget, network, known)
        return self._on_worker(lambda: self._lift_all(target, network, records))

    def _forget(self, network, known: set[str]) -> list:
        """Owner thread: lift and pardon in the engine; the bans it alone held."""
        engine, extra = self.ctx.engine, []
        for ban in [b for b in engine.bans() if b.address in network]:
            if ban.address.compressed not in known:
                extra.append(BanRecord(str(ban.address), ban.since, ban.until))
            engine.lift(ban.address, pardon=True)
        for address in known:
            engine.lift(from_stored(address), pardon=True)
        return extra

    def _lift_all(self, target: str, network, records) -> dict:
        """Worker: every ban within `network`, everywhere."""
        unrecorded = self.firewall.unrecorded(network, {r.address for r in records})
        if not records and not unrecorded:
            return {"ok": False, "error": f"{target} is not blocked"}
        # a ban that was mid-report is recorded by now (the worker's queue is in
        # order): its record says what to undo (a KILL_ROUTE rule, a hosts.deny line)
        records = [self.ledger.find(r.address) or r for r in records]
        problems = {r.address: self.ledger.lift(r, "unblock") for r in records}
        for record in records:
            try:
                self.ctx.store.pardon(record.address)
            except sqlite3.Error:
                pass
        for address in unrecorded:
            self.ledger.lift_unrecorded(address)
        return {"ok": True, "unblocked": [r.address for r in records] + unrecorded,
                "firewall_only": unrecorded,
                "problems": {a: p for a, p in problems.items() if p}}

    # -- fleet (fleet thread) ---------------------------------------------------
    def fleet_ban(self, message: dict) -> None:
        member = message["origin"]
        try:
            ip = canonical(str(message["address"]))
        except ValueError:
            return
        until = message.get("until")
        grade = message.get("evidence")
        if grade not in (HANDSHAKE, MANUAL) and self._is_peer(ip):
            # decoy grading holds fleet-wide: a peer here is not banned on spoofable probes
            self.ctx.log(f"adminalert: fleet: not applying the ban of {ip} from {member}: it "
                         "completed a TCP handshake with this host lately and the ban rests "
                         f"on stateless probes (grade {grade or 'unknown'}; possible decoy)",
                         logs.INFO)
            return
        order = self.ctx.inbox.call(self.ctx.engine.fleet_ban, ip, time.time(), until,
                                    grade or FLEET)
        if order.verdict is Verdict.IGNORED and order.error:
            self.ctx.log(f"adminalert: fleet: not applying the ban of {ip} from {member}: "
                         f"{order.error}", logs.INFO)
        elif order.verdict is Verdict.REFUSED:
            self.ctx.log.error(f"adminalert: ERROR: fleet ban of {ip} from {member}: "
                               f"{order.error}")
        elif order.verdict is Verdict.BLOCK:
            reason = str(message.get("reason") or "fleet")[:200]
            if not self.ctx.worker.put(lambda: self._apply_fleet_ban(order, member, reason,
                                                                     message)):
                # not applied: nor recorded in the engine (a resync offers it again)
                self.ctx.inbox.post(self.ctx.engine.lift, ip, False, order.since)

    def fleet_correlated(self, address: str, entries: list[str]) -> bool:
        """Fleet thread: this member's evidence made a source's trap hits
        reach FLEET_SCAN_TRIGGER members: judged like a scan here (BLOCK_TCP,
        the ban rate limit, never a peer), banned here as a ban of our own
        (grade `fleet`, in the history), and shared. False when not banned
        here (the next member's evidence may: its judgment may differ)."""
        try:
            ip = canonical(address)
        except ValueError:
            return True
        entries = [e for e in entries  # Redis's word: checked
                   if (m := EVIDENCE_ENTRY.match(e)) and int(m[1]) <= 65535]
        members = sorted({e.split(" ", 1)[0] for e in entries})
        if len(members) < max(2, self.ctx.config.fleet_scan_trigger):
            return False
        ours = next((e for e in entries if e.split(" ", 1)[0] == self.ctx.config.fleet_name),
                    None)
        port, protocol = (int(ours.split(" ")[1].split("/")[0]), ours.split("/")[1]) if ours \
            else (None, None)
        now = time.time()
        order = self.ctx.inbox.call(self.ctx.engine.fleet_correlation, ip, now,
                                    self._is_peer(ip))
        seen = ", ".join(entries[:10]) + (f" and {len(entries) - 10} more"
                                          if len(entries) > 10 else "")
        what = (f"first contacts with unused ports on {len(members)} members ({seen}) within "
                f"{self.ctx.config.fleet_scan_window:g} s")
        if order.verdict is Verdict.BLOCK:
            def apply() -> None:
                if self.ledger.apply(order, "correlation", f"Fleet-wide scan ({len(members)} "
                                     "members)", port, protocol):
                    self.ctx.log(f"attackalert: Host {ip} has been blocked via fleet "
                                 f"correlation: {what}")
            if not self.ctx.worker.put(apply):
                self.ctx.inbox.post(self.ctx.engine.lift, ip, False, order.since)
                return False
            return True
        if order.verdict is Verdict.ALREADY_BLOCKED:
            return True
        if not self._correlation_lines.take(time.monotonic()):  # a forged flood's
            return False
        held = self._correlation_lines.held
        more = f" ({held} more not logged)" if held else ""
        self._correlation_lines.held = 0
        if order.verdict is Verdict.ALERT:
            self.ctx.log(f"attackalert: fleet correlation: host {ip} scanned the fleet "
                         f"({what}); not blocked: {order.error}{more}")
        else:
            self.ctx.log(f"adminalert: fleet correlation: not banning {ip} ({what}): "
                         f"{order.error}{more}", logs.INFO)
        return False

    def _is_peer(self, ip) -> bool:
        """Did `ip` complete a TCP handshake with this host lately (the kernel's peer sets)?"""
        if self.ctx.bans is None or not self.ctx.config.decoy_grace:
            return False
        try:
            return self.ctx.bans.is_peer(ip)
        except OSError:
            return False

    def _apply_fleet_ban(self, order: Order, member: str, reason: str, message: dict) -> None:
        """Worker: a fleet member's ban, everywhere, then said."""
        if not self.ledger.apply(order, member, reason):
            self.ctx.log.error(f"adminalert: ERROR: fleet ban of {order.address} from "
                               f"{member}: no block action worked")
            return
        self.ctx.metrics.fleet_received.inc()
        delay = "" if message.get("resync") or "sent" not in message else \
            f", {1000 * max(0.0, time.time() - message['sent']):.1f} ms after it was sent"
        self.ctx.log(f"attackalert: Host {order.address} has been blocked via fleet member "
                     f"{member} ({reason}){delay}")

    def fleet_unban(self, message: dict) -> None:
        try:
            ip = canonical(str(message.get("address")))
        except ValueError:
            return
        record = self.ledger.find(str(ip))
        if record is not None:  # the ledger's lift takes it from the engine too
            self.ctx.worker.put(lambda: self.ledger.lift(record, "fleet"))

    def own_bans(self) -> list[dict]:
        try:
            records = self.ctx.store.bans()
        except sqlite3.Error as err:  # the fleet's resync tries again later
            self.ctx.report_error(f"fleet resync: cannot read the state: {err}")
            return []
        return [announcement(r) for r in records if r.origin in LOCAL_ORIGINS]



def _in_force(record: BanRecord, now: float) -> bool:
    return record.until is None or record.until > now


def _duration(seconds: float) -> str:
    return "forever" if not seconds else f"{int(seconds)}s"
