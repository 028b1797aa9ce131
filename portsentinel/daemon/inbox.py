"""Calls for the engine's owner thread (the run loop), from the control,
fleet and worker threads, so that the engine needs no lock."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

CALL_TIMEOUT = 10.0  # a caller's longest wait for the run loop


class Inbox:
    def __init__(self):
        self._calls: deque = deque()
        self._owner = threading.get_ident()  # the starting thread, then the run loop's
        self._released = False  # the loop is over: callers run their calls, one at a time
        self._lock = threading.RLock()
        self.wake = lambda: None  # set by the run loop: makes its select return

    def own(self) -> None:
        """The calling thread owns the engine from now on."""
        self._owner = threading.get_ident()

    def post(self, fn, *args) -> Future:
        """Run `fn(*args)` on the owner thread (at once when called there)."""
        future: Future = Future()
        if threading.get_ident() == self._owner and not self._released:
            _run(future, fn, args)
            return future
        with self._lock:
            if self._released:
                _run(future, fn, args)
                return future
            self._calls.append((future, fn, args))
        self.wake()
        return future

    def call(self, fn, *args, timeout: float = CALL_TIMEOUT):
        """`post`, then wait for the result (or the exception it raised). A
        call that times out is cancelled: it never runs later (a ban the
        caller was told failed must not appear in the engine alone)."""
        future = self.post(fn, *args)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise
            return future.result()  # it had started: its outcome, not a ghost

    def release(self) -> None:
        """The run loop is over (shutdown): what is posted from now on runs in
        the caller's thread, under a lock, so still one call at a time."""
        with self._lock:
            self._released = True
            self.run_pending()

    def run_pending(self) -> None:
        """The owner thread runs what was posted (the run loop, each turn)."""
        while self._calls:
            future, fn, args = self._calls.popleft()
            _run(future, fn, args)


def _run(future: Future, fn, args) -> None:
    if not future.set_running_or_notify_cancel():
        return  # its caller gave up waiting
    try:
        future.set_result(fn(*args))
    except BaseException as err:  # the caller sees it
        future.set_exception(err)
