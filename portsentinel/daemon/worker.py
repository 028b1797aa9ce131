"""The one thread for slow work, in order: waits for names (RESOLVE_HOST),
log lines, hosts.deny / KILL_ROUTE / KILL_RUN_CMD, history files, the state,
firewall checks. Fed by a bounded queue: the packet path never waits; what
does not fit is counted. Strictly in order, admin commands included: an
unblock must find the record of a ban whose report was queued before it.
`idle` runs when the queue is empty, GROUP_WAIT after the first job since it
last ran, and at stop: the ledger writes the bans of a burst then, in one
transaction, and a steady stream of sources costs one every GROUP_WAIT, not
one a source."""

from __future__ import annotations

import queue
import threading
import time

QUEUE_SIZE = 10000
WAKE_WAIT = 0.02  # a job queued quietly waits this long at most for the worker to look
WAKE_COUNT = 64  # ... or until this many are queued
GROUP_WAIT = 0.05  # idle waits this long after the first job it follows (one write for many)
_STOP = None


class Worker:
    def __init__(self, dropped, log_error, size: int = QUEUE_SIZE):
        self.jobs: queue.Queue = queue.Queue(size)
        self._dropped, self._log_error = dropped, log_error  # dropped: metrics counter
        self._thread: threading.Thread | None = None
        self.idle = lambda: None
        self.unwoken_since: float | None = None  # the first job queued quietly since a wake

    def put(self, job) -> bool:
        """Queue a job; False (counted) when the queue is full."""
        try:
            self.jobs.put_nowait(job)
            self.unwoken_since = None  # put() wakes the worker: it finds them all
            return True
        except queue.Full:
            self._dropped.labels("report queue full").inc()
            return False

    def put_quietly(self, job) -> bool:
        """Queue a job, in order, without waking a sleeping worker: it finds
        the job when it next looks, at the latest when the owner's loop calls
        `wake` (`wake_due`). Waking a sleeping thread cost more than a probe's
        whole report (tens of microseconds), once per kernel log batch."""
        jobs = self.jobs
        with jobs.mutex:  # queue.Queue's own lock and store: put_nowait minus the notify
            if 0 < jobs.maxsize <= jobs._qsize():
                self._dropped.labels("report queue full").inc()
                return False
            jobs._put(job)
            jobs.unfinished_tasks += 1
            many = jobs._qsize() >= WAKE_COUNT
        if many:
            self.wake()
        elif self.unwoken_since is None:
            self.unwoken_since = time.monotonic()
        return True

    def wake_due(self) -> float | None:
        return None if self.unwoken_since is None else self.unwoken_since + WAKE_WAIT

    def wake(self) -> None:
        self.unwoken_since = None
        with self.jobs.mutex:
            self.jobs.not_empty.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()

    def stop(self, meanwhile, timeout: float = 10.0) -> None:
        """Finish what is queued; `meanwhile` runs while waiting (the owner
        thread keeps answering the worker's calls, or both would wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.jobs.put(_STOP, timeout=0.01)
                break
            except queue.Full:
                meanwhile()
        while self._thread is not None and self._thread.is_alive() \
                and time.monotonic() < deadline:
            meanwhile()
            self._thread.join(timeout=0.01)

    def _loop(self) -> None:
        first = None  # when the first job since idle last ran was taken
        while True:
            if first is None:  # nothing done since idle ran: sleep
                job = self.jobs.get()
            else:  # idle once the queue is empty and GROUP_WAIT has passed
                try:
                    job = self.jobs.get(timeout=max(0.0, first + GROUP_WAIT - time.monotonic()))
                except queue.Empty:
                    self._run(self.idle)
                    first = None
                    continue
            if job is _STOP:
                self._run(self.idle)
                return
            first = first or time.monotonic()
            self._run(job)

    def _run(self, job) -> None:
        try:
            job()
        except Exception as err:  # a job must never kill the worker
            self._log_error(f"adminalert: ERROR: reporting failed: {err!r}")
