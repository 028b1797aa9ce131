"""The one thread for slow work, in order: waits for names (RESOLVE_HOST),
log lines, hosts.deny / KILL_ROUTE / KILL_RUN_CMD, history files, the state,
firewall checks. Fed by a bounded queue: the packet path never waits; what
does not fit is counted. Strictly in order, admin commands included: an
unblock must find the record of a ban whose report was queued before it.
`idle` runs whenever the queue is empty and at stop (the ledger writes the
bans of a burst then, in one transaction)."""

from __future__ import annotations

import queue
import threading
import time

QUEUE_SIZE = 10000
_STOP = None


class Worker:
    def __init__(self, dropped, log_error, size: int = QUEUE_SIZE):
        self.jobs: queue.Queue = queue.Queue(size)
        self._dropped, self._log_error = dropped, log_error  # dropped: metrics counter
        self._thread: threading.Thread | None = None
        self.idle = lambda: None

    def put(self, job) -> bool:
        """Queue a job; False (counted) when the queue is full."""
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            self._dropped.labels("report queue full").inc()
            return False

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
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                self._run(self.idle)
                job = self.jobs.get()
            if job is _STOP:
                self._run(self.idle)
                return
            self._run(job)

    def _run(self, job) -> None:
        try:
            job()
        except Exception as err:  # a job must never kill the worker
            self._log_error(f"adminalert: ERROR: reporting failed: {err!r}")
