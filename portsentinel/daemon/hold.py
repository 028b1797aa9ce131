"""The first-contact hold (FIRST_CONTACT_HOLD): a stranger's first SYN to a
served port waits in our netfilter queue for a few milliseconds, long enough
for a scan to show itself at a trap port, then goes back to the kernel with a
"repeat" verdict: our hold chain looks again, drops it if the source was
banned meanwhile, and lets it through if not (its source is cleared first, in
the kernel's clear set, for PEER_MEMORY: its later SYNs are not held).

Its own thread, so that nothing the run loop or the worker does delays a
held client; it sleeps until a packet comes or one is due (no timer when
nothing is held). It fails open, and the kernel sees to that itself
(ruleset.py): a source whose SYN is not released within HOLD_GRACE of its
hold passes (its client's retransmission, about a second later, gets
through), so a stalled daemon costs each new client one retransmission,
noted in the `lapsed` sets and reported here once the daemon runs again; a
daemon that is gone has no reader on the queue, which the kernel then
bypasses; a full queue lets packets pass (counted from the skipped packet
ids); stopping switches the hold off (`alive`) and releases every held
packet first. A killed daemon is the one case the kernel drops what it held
at that instant (at most a hold's worth of first SYNs, which their clients
send again about a second later, and which then pass)."""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
from collections import deque

from .. import logs
from ..nfnetlink import SetElements, dump_set
from ..nfqueue import NF_ACCEPT, NF_REPEAT, Queue
from ..ruleset import HOLD_GRACE, HOLD_ON_KEY

LATE = 0.05  # a release this much past its time is late (counted)
REPORT_EVERY = 60.0  # at most one line a minute about packets that passed unheld
LAPSE_CHECK_EVERY = 10.0  # the `lapsed` sets looked at when woken, at most this often


class Hold:
    def __init__(self, table: str, queue: int, seconds: float, clear_seconds: float,
                 metrics, log: logs.Log):
        self.seconds, self.clear_seconds = seconds, clear_seconds
        self.metrics, self.log = metrics, log
        self.queue = Queue(queue)  # OSError: no netfilter queue here
        self.elements = SetElements(table)
        self.pending: deque[tuple[float, int, bytes | None]] = deque()  # (due, id, source)
        self.last_id = 0
        self.unheld = 0  # passed unheld since the last report
        self.table = table
        self._clear_failed = False
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="hold", daemon=True)

    def start(self) -> "Hold":
        self._thread.start()  # the table switched the hold on (`alive`) when installed
        return self

    def stop(self) -> None:
        """No more holding (switched off), everything held released."""
        self._stopping.set()
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the thread has ended already (and closed it)
        self._thread.join(timeout=self.seconds + 2)

    # -- the hold thread -----------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as err:  # noqa: BLE001 - whatever it is, the clients must pass
            self.log.error(f"adminalert: ERROR: first-contact hold stopped ({err}); new "
                           "clients pass unheld")
        finally:
            self._end()

    def _loop(self) -> None:
        last_report = time.monotonic()
        last_check, check_due = float("-inf"), None
        while not self._stopping.is_set():
            dues = [d for d in (self.pending[0][0] if self.pending else None, check_due,
                                last_report + REPORT_EVERY if self.unheld else None)
                    if d is not None]
            wait = max(0.0, min(dues) - time.monotonic()) if dues else None
            ready, _, _ = select.select([self.queue, self._wake_r], [], [], wait)
            now = time.monotonic()
            if self.queue in ready:
                self._take(now)
                if check_due is None:  # a second on, what passed meanwhile is noted
                    check_due = max(now + 1.0, last_check + LAPSE_CHECK_EVERY)
            if check_due is not None and now >= check_due:
                last_check, check_due = now, None
                self._lapsed()
            self._release(time.monotonic())
            if self.unheld and now - last_report >= REPORT_EVERY:
                last_report = now
                self._report()

    def _lapsed(self) -> None:
        """Sources that passed because their SYN was not released in time
        (the daemon stalled): counted, said once, forgotten."""
        found = {}
        try:
            for name in ("lapsed4", "lapsed6"):
                found[name] = [ipaddress.ip_address(a).packed for a in dump_set(self.table, name)]
            for name, keys in found.items():
                if keys:
                    self.elements.delete_keys(name, keys)
        except OSError:
            return  # our table is being put back; the next wake looks again
        count = sum(map(len, found.values()))
        if count:
            self.metrics.hold_lapsed.inc(count)
            sources = "1 new source" if count == 1 else f"{count} new sources"
            self.log(f"adminalert: first-contact hold: {sources} passed unheld: the daemon "
                     f"did not release the first SYN within {HOLD_GRACE:g} s of its hold "
                     "(it stalled); each client got through on its retransmission",
                     logs.WARNING)

    def _take(self, now: float) -> None:
        found = self.queue.receive()
        for packet_id, source in found:
            if self.last_id and packet_id > self.last_id + 1:  # the kernel let those pass
                self._passed_unheld(packet_id - self.last_id - 1)
            self.last_id = packet_id
            self.pending.append((now + self.seconds, packet_id, source))
        if found:
            self.metrics.held.inc(len(found))

    def _release(self, now: float, everything: bool = False) -> None:
        """Hand back every packet whose time has come, with one verdict."""
        pending, last, clear, late = self.pending, None, {}, 0
        while pending and (everything or pending[0][0] <= now):
            due, last, source = pending.popleft()
            late += now - due > LATE
            if source is not None:
                clear.setdefault("clear4" if len(source) == 4 else "clear6", set()).add(source)
        if last is None:
            return
        verdict = NF_REPEAT if self._cleared(clear) else NF_ACCEPT
        self.queue.verdict(verdict, last)
        if late:
            self.metrics.held_late.inc(late)

    def _cleared(self, clear: dict[str, set[bytes]]) -> bool:
        """Sources into the clear sets; False (hand back with "accept": a
        repeat would only queue them again) if the kernel refused."""
        try:
            self.elements.add_keys({name: sorted(sources) for name, sources in clear.items()},
                                   self.clear_seconds)
        except OSError as err:
            if not self._clear_failed:
                self._clear_failed = True
                self.log.error(f"adminalert: ERROR: first-contact hold: sources not cleared "
                               f"({err}); held SYNs are let through as they are")
            return False
        self._clear_failed = False
        return True

    def _passed_unheld(self, count: int) -> None:
        self.unheld += count
        self.metrics.hold_passed.inc(count)

    def _report(self) -> None:
        if self.unheld:
            self.log(f"adminalert: first-contact hold: {self.unheld} SYNs passed unheld (the "
                     "queue was full or the daemon fell behind)", logs.WARNING)
            self.unheld = 0

    def _end(self) -> None:
        try:
            self.elements.delete_keys("alive", [bytes([HOLD_ON_KEY])])
        except OSError:
            pass  # whatever is queued now is released below or lapses
        try:
            self._take(time.monotonic())
            self._release(time.monotonic(), everything=True)
        except OSError as err:
            self.log.error(f"adminalert: ERROR: first-contact hold: held SYNs not released "
                           f"({err}); their clients send them again")
        self._lapsed()
        self._report()
        self.queue.close()
        self.elements.close()
        self._wake_r.close()
        self._wake_w.close()
