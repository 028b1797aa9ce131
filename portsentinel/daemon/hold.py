"""The first-contact hold (FIRST_CONTACT_HOLD): a stranger's first SYN to a
served port waits in our netfilter queue for a few milliseconds, long enough
for a scan to show itself at a trap port, then goes back to the kernel with a
"repeat" verdict: our hold chain looks again, drops it if the source was
banned meanwhile, and lets it through if not (its source is cleared first, in
the kernel's clear set, for PEER_MEMORY: its later SYNs are not held).

Its own thread, so that nothing the run loop or the worker does delays a
held client. It fails open: it keeps a heartbeat element in the kernel
(`alive`, a 1 s timeout) without which the kernel queues nothing, so a
stalled daemon stops holding within a second; a daemon that is gone has no
reader on the queue, which the kernel then bypasses; a full queue lets
packets pass (counted from the skipped packet ids); stopping releases every
held packet first. A killed daemon is the one case the kernel drops what
it held at that instant (at most a hold's worth of first SYNs, which their
clients send again about a second later, and which then pass)."""

from __future__ import annotations

import select
import threading
import time
from collections import deque

from .. import logs
from ..nfnetlink import SetElements
from ..nfqueue import NF_ACCEPT, NF_REPEAT, Queue
from ..ruleset import HEARTBEAT_KEY

HEARTBEAT_EVERY, HEARTBEAT_TIMEOUT = 0.5, 1.0  # a stall lapses it within 0.5-1 s
LATE = 0.05  # a release this much past its time is late (counted)
REPORT_EVERY = 60.0  # at most one line a minute about packets that passed unheld


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
        self._clear_failed = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hold", daemon=True)

    def start(self) -> "Hold":
        self._thread.start()  # the kernel queues nothing before its first heartbeat
        return self

    def stop(self) -> None:
        """No more holding (heartbeat gone), everything held released."""
        self._stopping.set()
        self._thread.join(timeout=2 * HEARTBEAT_EVERY + 1)

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
        next_beat = last_report = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                if now - next_beat > HEARTBEAT_TIMEOUT - HEARTBEAT_EVERY:
                    self._stalled(now - next_beat + HEARTBEAT_EVERY)
                self._beat()
                next_beat = now + HEARTBEAT_EVERY
            if now - last_report >= REPORT_EVERY:
                last_report = now
                self._report()
            due = self.pending[0][0] if self.pending else next_beat
            ready, _, _ = select.select([self.queue], [], [], max(0.0, min(due, next_beat)
                                                                  - time.monotonic()))
            if ready:
                self._take(time.monotonic())
            self._release(time.monotonic())

    def _beat(self) -> None:
        """The heartbeat; a failure (our table is being put back after a
        flush) only means nothing is held until the next one."""
        try:
            self.elements.refresh_keys("alive", [bytes([HEARTBEAT_KEY])], HEARTBEAT_TIMEOUT)
        except OSError:
            pass

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

    def _stalled(self, seconds: float) -> None:
        self.metrics.hold_stalls.inc()
        self.log(f"adminalert: first-contact hold: the daemon stalled for {seconds:.1f} s; "
                 "new clients passed unheld meanwhile", logs.WARNING)

    def _report(self) -> None:
        if self.unheld:
            self.log(f"adminalert: first-contact hold: {self.unheld} SYNs passed unheld (the "
                     "queue was full or the daemon fell behind)", logs.WARNING)
            self.unheld = 0

    def _end(self) -> None:
        try:
            self.elements.delete_keys("alive", [bytes([HEARTBEAT_KEY])])
        except OSError:
            pass  # lapses within a second anyway
        try:
            self._take(time.monotonic())
            self._release(time.monotonic(), everything=True)
        except OSError as err:
            self.log.error(f"adminalert: ERROR: first-contact hold: held SYNs not released "
                           f"({err}); their clients send them again")
        self._report()
        self.queue.close()
        self.elements.close()
