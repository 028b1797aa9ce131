"""What every room of the daemon shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import logs
from ..config import Config
from ..engine import TCP, UDP, Engine
from ..metrics import Metrics
from ..nft import NftBans
from ..store import Store
from .inbox import Inbox
from .worker import Worker


@dataclass
class Context:
    """`config` and `modes` change on reload (owner thread). The engine is the
    owner thread's (the run loop's): other threads reach it through `inbox`.
    Slow work goes to `worker`, in order."""

    config: Config
    modes: dict[str, str | None]
    log: logs.Log
    metrics: Metrics
    engine: Engine
    store: Store
    inbox: Inbox
    worker: Worker
    bans: NftBans | None = None  # our nftables table (BLOCK_NFTABLES)
    fleet: object | None = None  # fleet.Fleet when FLEET_REDIS_URL is set
    hold: str | None = None  # the first-contact hold as `status` shows it, None: off
    started: float = field(default_factory=time.time)
    _error_reported: float = float("-inf")

    def report_error(self, message: str) -> None:
        """Errors on busy paths (packets, periodic work): at most one line a second."""
        now = time.monotonic()
        if now - self._error_reported >= 1.0:
            self._error_reported = now
            self.log.error(f"adminalert: ERROR: {message}")

    def survive(self, what: str, job, *args):
        """Run periodic work; a failure (say, the state database locked by
        another program for longer than its timeout) is logged and counted,
        and the loop, the sensors and the kernel trap go on."""
        try:
            return job(*args)
        except Exception as err:
            self.metrics.dropped.labels(f"{what} error").inc()
            self.report_error(f"{what} failed, will retry: {err!r}")
            return None

    def mode(self, protocol: str) -> str | None:
        return self.modes[UDP if protocol == UDP else TCP]  # IP protocol scans: TCP's
