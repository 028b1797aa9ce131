"""What a decision says in the log: PortSentry's alert lines, with the host's
name when RESOLVE_HOST asks for it; a ban's decision goes on to the ledger."""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache

from .. import logs
from ..addrset import text as address_text
from ..engine import Decision, Kind, Verdict
from ..store import BanRecord
from .context import Context
from .ledger import BanLedger

RESOLVE_WAIT = 0.5  # RESOLVE_HOST: longest wait for a name, from the detection
LOOKUP_THREADS = 8


@lru_cache(maxsize=1024)
def _resolve(address: str) -> str | None:
    try:
        return socket.gethostbyaddr(address)[0]
    except (OSError, UnicodeError):
        return None


def reason(decision: Decision) -> str:
    probe = decision.probe
    if decision.slow_scan:
        return f"Slow scan ({decision.slow_scan} failed first contacts)"
    if probe.kind is Kind.CONNECT:
        return f"Connect to {probe.protocol.upper()} port {probe.port}"
    return logs.scan_name(probe).strip()


class Alerts:
    def __init__(self, ctx: Context, ledger: BanLedger):
        self.ctx, self.ledger = ctx, ledger
        self._names: ThreadPoolExecutor | None = None

    def look_up(self, probe) -> Future | None:
        """RESOLVE_HOST: start the reverse lookup as soon as a scan is seen, on a
        small pool, so that slow lookups overlap instead of queueing up."""
        if not self.ctx.config.resolve_host:
            return None
        if self._names is None:
            self._names = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="resolve")
        return self._names.submit(_resolve, address_text(probe.source))

    def _name(self, lookup: Future | None, probe) -> str | None:
        """The name, if it came within RESOLVE_WAIT of the detection: a scanner
        that controls its reverse zone cannot stall the bans behind it."""
        if lookup is None:
            return None
        try:
            return lookup.result(timeout=max(0.0, probe.time + RESOLVE_WAIT - time.time()))
        except FutureTimeout:
            self.ctx.metrics.dropped.labels("name lookup too slow").inc()
            return None

    def report(self, decision: Decision, nft_result, origin: str,
               lookup: Future | None) -> None:
        """Worker: the lines of a decision; a ban is settled by the ledger."""
        probe, log = decision.probe, self.ctx.log
        target = address_text(probe.source)
        name = self._name(lookup, probe)
        if decision.slow_scan:
            log(f"attackalert: Slow scan from host: {logs.host_label(target, name)} to "
                f"{probe.protocol.upper()} port: {probe.port} ({decision.slow_scan} failed "
                "first contacts, sequential test)")
        else:
            log(logs.alert_line(probe, name, target))
        if probe.ip_options:
            log(logs.ip_options_line(probe, name))
        if decision.verdict is Verdict.BLOCK:
            self._settle(decision, nft_result, origin, name, target)
        else:
            self._not_blocked(decision)

    def _not_blocked(self, decision: Decision) -> None:
        probe, log = decision.probe, self.ctx.log
        target = address_text(probe.source)
        if decision.verdict is Verdict.ALREADY_BLOCKED:
            log(logs.already_blocked_line(target))
        elif decision.verdict is Verdict.DECOY:
            log(f"attackalert: Host {target} completed a TCP handshake with this host "
                "lately: not blocked on stateless probes, which can carry a spoofed "
                "source (possible decoy)")
            self.ledger.json_event("decoy", target, port=probe.port, protocol=probe.protocol,
                                   kind=probe.kind.value)
        elif decision.verdict is Verdict.RATE_LIMITED:
            rate, _ = self.ctx.config.ban_rate_limit
            log.error(f"attackalert: WARNING: ban rate limit ({rate:g}/s) reached: host "
                      f"{target} not blocked; detection continues (a spoofed flood?)")
            self.ledger.json_event("rate_limited", target, port=probe.port,
                                   protocol=probe.protocol)
        elif decision.verdict is Verdict.ALERT:
            log(logs.ignoring_response_line(probe.protocol))
            self.ledger.json_event("alert", target, port=probe.port, protocol=probe.protocol,
                                   kind=probe.kind.value)

    def _settle(self, decision: Decision, nft_result, origin: str, name: str | None,
                target: str) -> None:
        probe = decision.probe
        until = probe.time + decision.ban_seconds if decision.ban_seconds else None
        record = BanRecord(target, probe.time, until, probe.port, probe.protocol,
                           self.ctx.mode(probe.protocol), reason(decision), origin,
                           evidence=decision.evidence or None)
        if not self.ledger.settle(record, decision.actions, nft_result, name):
            self.ctx.log.error(logs.could_not_block_line(record.address))

    def close(self) -> None:
        if self._names is not None:
            self._names.shutdown(wait=False, cancel_futures=True)
