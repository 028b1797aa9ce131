"""The owner thread's loop: select on the sensors and watches, run what other
threads posted to the inbox, and each timer's job when it is due. A signal
writes a byte to the wake socket, so SIGTERM and SIGHUP act at once."""

from __future__ import annotations

import selectors
import signal
import socket
import threading
import time

from .inbox import Inbox

IDLE_WAIT = 1.0


class RunLoop:
    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self._timers: list[tuple] = []  # (due() -> monotonic time or None, job)
        self.last_event = time.monotonic()  # a sensor, watch, signal or post was read
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, _drain)
        inbox.wake = self.wake

    def add_reader(self, fileobj, handler) -> None:
        """`handler(fileobj)` when it is readable."""
        self.selector.register(fileobj, selectors.EVENT_READ, handler)

    def remove_reader(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def add_timer(self, due, job) -> None:
        self._timers.append((due, job))

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def run(self) -> None:
        """Until `stopping` is set; the calling thread owns the engine."""
        self.inbox.own()
        previous = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while not self.stopping.is_set():
                self._turn()
        finally:
            signal.set_wakeup_fd(previous)

    def _turn(self) -> None:
        dues = [d for d in (due() for due, _ in self._timers) if d is not None]
        wait = max(0.0, min(dues) - time.monotonic()) if dues else IDLE_WAIT
        for key, _ in self.selector.select(timeout=wait):
            self.last_event = time.monotonic()
            key.data(key.fileobj)
        self.inbox.run_pending()
        now = time.monotonic()
        for due, job in self._timers:
            when = due()
            if when is not None and now >= when:
                job()

    def close(self) -> None:
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
