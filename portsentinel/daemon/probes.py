"""The packet path: each probe goes into the engine once, with the facts it
asks for looked up on demand, and comes out as one decision; its inline part
(the nftables ban) is done at once, its report is queued for the worker."""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from .. import logs
from ..addrset import text as address_text
from ..engine import NFTABLES, TCP, Decision, Facts, Kind, Verdict
from ..ruleset import ACK_RATE_PER_SECOND
from ..sensors import ChallengeSensor
from .alerts import Alerts
from .context import Context
from .firewall import Firewall
from .ledger import BanLedger

DEFERRED_TRIALS = 65536  # first contacts judged later; bounded under floods (oldest dropped)
REPEAT_LINES_PER_SECOND = 20  # "already blocked" lines, all hosts together
UNREPORTED_EVERY = 60.0  # s between warnings that the kernel kept evidence from us
BAN_GROUP = 16  # a kernel log batch's bans go to the firewall this many a transaction
# Under a flood each wake of the run loop cost more than a source's whole
# handling (100 us and more on these machines): after a batch of COALESCE_FROM
# reports or more, the next batch gathers for COALESCE first. A lone scan's
# trap hit is a batch of one: read, decided and banned at once.
COALESCE_FROM, COALESCE = 2, 0.001
KERNEL_BANNED = Facts(banned_by_kernel=True)


_UNKNOWN = object()


class LiveFacts:
    """The engine's questions about one probe, each looked up once, on first
    use (slots and plain properties: one of these is made per probe)."""

    __slots__ = ("_path", "_probe", "_listener_check", "young", "_served", "_peer", "_reply",
                 "_forwarded")
    banned_by_kernel = False

    def __init__(self, path: "ProbePath", probe, listener_check: bool, young: bool):
        self._path, self._probe, self._listener_check = path, probe, listener_check
        self.young = young
        self._served = self._peer = self._reply = self._forwarded = _UNKNOWN

    @property
    def served(self) -> bool:
        if self._served is _UNKNOWN:
            probe = self._probe
            self._served = self._listener_check and self._path.listening.in_use(probe.protocol,
                                                                               probe.port)
        return self._served

    @property
    def peer(self) -> bool:
        if self._peer is _UNKNOWN:
            self._peer = self._path.is_peer(self._probe.source)
        return self._peer

    @property
    def reply(self) -> bool:
        if self._reply is _UNKNOWN:
            self._reply = self._path.is_reply(self._probe)
        return self._reply

    @property
    def forwarded(self) -> bool:
        if self._forwarded is _UNKNOWN:
            self._forwarded = self._path.is_forwarded(self._probe)
        return self._forwarded

    @property
    def kernel_decides(self) -> bool:
        return self._path.firewall.kernel_decides(self._probe.protocol)


class KernelFacts(LiveFacts):
    """A probe the kernel sensor logged: it judged the port (served?), the
    reply direction and NAT already, and for a trap hit whether the source is
    a mature peer (its log prefix); a first contact's `peer` is asked.
    `served` None: asked now (a port the kernel's sets may not know yet)."""

    __slots__ = ()
    kernel_decides = False

    def __init__(self, path: "ProbePath", probe, served: bool | None,
                 peer: bool | None = None):
        super().__init__(path, probe, served is None, young=False)
        self._reply, self._forwarded = False, False
        if served is not None:
            self._served = served
        if peer is not None:
            self._peer = peer


class ProbePath:
    def __init__(self, ctx: Context, ledger: BanLedger, alerts: Alerts, firewall: Firewall,
                 listening, peers):
        self.ctx, self.ledger, self.alerts, self.firewall = ctx, ledger, alerts, firewall
        self.listening, self.peers = listening, peers
        self.conntrack = None  # conntrack.Conntrack, when the kernel lets us ask
        self.sensors: list = []  # as armed (a challenge ban reads the challenge sensor first)
        self.deferred: deque = deque(maxlen=DEFERRED_TRIALS)  # (due, probe)
        self.repeat_lines = logs.LineBudget(REPEAT_LINES_PER_SECOND, REPEAT_LINES_PER_SECOND)
        self._reports: list | None = None  # reports of the kernel log batch being read
        self._bans: list = []  # its bans not sent yet: (decision, index of its report)
        self._unreported_said = float("-inf")

    # -- sensors ----------------------------------------------------------
    def read(self, sensor) -> None:
        """A trap hit is handled as soon as it is parsed: a ban must not wait for
        the rest of the batch, nor behind first-contact trials (their order
        does not matter, so they come last)."""
        if getattr(sensor, "kernel_log", False):
            self._read_kernel_log(sensor)
            return
        later = []
        try:
            for probe in sensor.read():
                if probe.trap:
                    self._handle_safely(probe, sensor)
                else:
                    later.append(probe)
        except OSError as err:  # e.g. ENOBUFS: the kernel dropped packets for us
            self.ctx.metrics.dropped.labels("sensor error").inc()
            self.ctx.report_error(f"sensor: {err}")
        for probe in later:
            self._handle_safely(probe, sensor)

    def _read_kernel_log(self, sensor) -> None:
        """The kernel's bans, and with the kernel as the sensor what it left
        to us: each probe once, judged as far as the kernel could. Their
        reports go to the worker as one job (in order): a queue hand-over per
        probe cost more than the probe's own decision."""
        self._reports = []
        try:
            for what, probe in sensor.read():
                self._safely(probe, self._kernel_logged, what, probe)
        except OSError as err:  # ENOBUFS: the kernel dropped messages for us
            self.ctx.metrics.dropped.labels("sensor error").inc()
            self.ctx.report_error(f"kernel log: {err}")
        finally:
            self._ban_group()
            reports, self._reports = self._reports, None
            if reports:  # the worker looks within WAKE_WAIT: a flood's batches, one wake
                self.ctx.worker.put_quietly(lambda: self._run_reports(reports))
            if len(reports) >= COALESCE_FROM:  # busy: let the next ones gather first
                time.sleep(COALESCE)

    def _run_reports(self, reports: list) -> None:
        """Worker: each report on its own, so that one failure loses no other;
        their lines written together at the end."""
        with self.ledger.records.grouped(), self.ctx.log.grouped():
            for report in reports:
                try:
                    report()
                except Exception as err:  # noqa: BLE001 - as the worker does for a job
                    self.ctx.log.error(f"adminalert: ERROR: reporting failed: {err!r}")

    def _kernel_logged(self, what: str, probe) -> None:
        if what == "ban":
            self.kernel_banned(probe)
            return
        if what == "unreported":
            self._unreported()
            return
        peer = {"hit": False, "peer hit": True}.get(what)
        # a transport's port: served now? (the kernel's sets follow a poll). Only the
        # ports found unserved here count: a new service's client drained the
        # kernel's bucket with ports the kernel did not know were served
        served = None if what in ("transport", "port scan") else what == "served"
        self.handle(probe, facts=KernelFacts(self, probe, served, peer))

    def _unreported(self) -> None:
        """The kernel kept evidence from us this second (past its log limit):
        counted, and said at most once a minute."""
        self.ctx.metrics.dropped.labels("kernel log limit").inc()
        now = time.monotonic()
        if now - self._unreported_said < UNREPORTED_EVERY:
            return
        self._unreported_said = now
        self.ctx.log.error(
            "adminalert: WARNING: more ACK-family, IP protocol or transport probes than "
            f"{ACK_RATE_PER_SECOND} a second (a spoofed flood?): the kernel does not report "
            "those past it, so a scan slower than the kernel's bucket can go unseen meanwhile "
            "(faster ones are still banned in the kernel)")

    def _handle_safely(self, probe, sensor) -> None:
        self._safely(probe, self.handle, probe, sensor.needs_listener_check)

    def _safely(self, probe, job, *args) -> None:
        try:
            job(*args)
        except Exception as err:  # one bad probe must not stop the sensor
            self.ctx.metrics.dropped.labels("handling error").inc()
            self.ctx.report_error(f"handling a probe from {probe.source} failed: {err!r}")

    # -- one probe, one decision --------------------------------------------
    def handle(self, probe, listener_check: bool = False, young: bool = True,
               facts=None) -> Decision:
        """`facts`: what a sensor knows already (the kernel's); else asked live."""
        self.ctx.metrics.probes.labels(probe.protocol, probe.kind.value).inc()
        facts = facts or LiveFacts(self, probe, listener_check, young)
        decision = self.ctx.engine.handle(probe, facts)
        self.act(decision)
        return decision

    def kernel_banned(self, probe) -> None:
        """The kernel trap banned a source by itself (NFLOG): recorded and
        reported like our own bans, so that no ban is ever silent."""
        trap = self.firewall.kernel_trap
        if trap and trap.challenge_port and probe.protocol == TCP \
                and probe.port == trap.challenge_port:
            # a completed challenge: its accepted connection knows the trap port
            # it was sent to, so it is reported first; this is the fallback
            for sensor in [s for s in self.sensors if isinstance(s, ChallengeSensor)]:
                self.read(sensor)
            probe = dataclasses.replace(probe, kind=Kind.CONNECT)
        decision = self.ctx.engine.handle(probe, KERNEL_BANNED)
        if decision.verdict is Verdict.IGNORED:  # never-block, e.g. the set changed meanwhile
            self.ctx.bans.unban(probe.source)
            self.ctx.log.error(f"adminalert: ERROR: the kernel trap banned {probe.source}, "
                               "which is never to be blocked; lifted at once")
            return
        if decision.verdict is not Verdict.BLOCK:
            return
        self.ctx.metrics.kernel_bans.inc()
        self.ctx.metrics.alerts.labels(probe.protocol).inc()
        nft_result = self.ledger.kernel_made(probe.source, decision.ban_seconds,
                                             decision.escalated)
        self._report(decision, nft_result, "kernel")

    def act(self, decision: Decision) -> None:
        """A decision's inline part (the nftables ban), then its report queued."""
        probe, metrics = decision.probe, self.ctx.metrics
        if decision.fleet_evidence and self.ctx.fleet is not None:
            self.ctx.fleet.report_evidence(address_text(probe.source), probe.port,
                                           probe.protocol, probe.time)
        if decision.recheck_after:
            self.deferred.append((time.monotonic() + decision.recheck_after, probe))
        if decision.verdict is Verdict.REPLY:
            metrics.replies.inc()
        if not decision.report or decision.verdict in (Verdict.IGNORED, Verdict.PENDING):
            return
        if decision.verdict is Verdict.ALREADY_BLOCKED \
                and not self.repeat_lines.take(time.monotonic()):
            return
        nft_result = None
        if decision.verdict in (Verdict.BLOCK, Verdict.ALERT):
            metrics.alerts.labels(probe.protocol).inc()
        elif decision.verdict is Verdict.DECOY:
            metrics.decoys.inc()
        elif decision.verdict is Verdict.RATE_LIMITED:
            metrics.rate_limited.inc()
        if decision.verdict is Verdict.BLOCK and NFTABLES in decision.actions:
            if self._reports is not None and not decision.escalated:
                self._bans.append((decision, len(self._reports)))  # its report comes
                self._reports.append(None)                          # with its group's ban
                if len(self._bans) >= BAN_GROUP:
                    self._ban_group()
                return
            nft_result = self.ledger.ban_now(probe.source, decision.ban_seconds,
                                             decision.escalated)
            if not isinstance(nft_result, Exception):
                metrics.ban_latency.observe(max(0.0, time.time() - probe.time))
        self._report(decision, nft_result, "local")

    def _ban_group(self) -> None:
        """The bans of a kernel log batch, one transaction for BAN_GROUP: a
        flood's sources are banned a few at a time, a lone scan's at once
        (the batch ends with it). Then their reports take their places."""
        group, self._bans = self._bans, []
        if not group:
            return
        try:
            results = self.ledger.ban_group([(d.probe.source, d.ban_seconds) for d, _ in group])
        except Exception as err:  # noqa: BLE001 - each report says so; none is lost
            self.ctx.report_error(f"banning {len(group)} sources failed: {err!r}")
            results = [err] * len(group)
        now = time.time()
        for (decision, at), result in zip(group, results):
            if not isinstance(result, Exception):
                self.ctx.metrics.ban_latency.observe(max(0.0, now - decision.probe.time))
            self._reports[at] = self._report_job(decision, result, "local")

    def _report(self, decision: Decision, nft_result, origin: str) -> None:
        report = self._report_job(decision, nft_result, origin)
        if self._reports is not None:  # a kernel log batch: queued with it, in order
            self._reports.append(report)
        else:
            self.ctx.worker.put(report)

    def _report_job(self, decision: Decision, nft_result, origin: str):
        lookup = self.alerts.look_up(decision.probe)
        return lambda: self.alerts.report(decision, nft_result, origin, lookup)

    def run_deferred(self) -> None:
        """First contacts whose time has come: judged again, NAT known by now."""
        now = time.monotonic()
        while self.deferred and self.deferred[0][0] <= now:
            _, probe = self.deferred.popleft()
            facts = LiveFacts(self, probe, True, young=False)
            decision = self.ctx.engine.handle(dataclasses.replace(probe, trap=False), facts)
            if decision.verdict is not Verdict.ALREADY_BLOCKED:  # banned meanwhile: said
                self.act(decision)

    def next_deferred(self) -> float | None:
        return self.deferred[0][0] if self.deferred else None

    # -- the facts, from the kernel -----------------------------------------
    def is_peer(self, address) -> bool:
        """Did this source complete a TCP handshake with us lately (PEER_MEMORY)?"""
        if not self.ctx.config.decoy_grace:
            return False
        try:
            if self.ctx.bans is not None:
                return self.ctx.bans.is_peer(address)
            return self.peers.is_peer(address)
        except OSError as err:
            self.ctx.report_error(f"peer check failed: {err}")
            return False

    def is_reply(self, probe) -> bool:
        """An answer to this host's own traffic (conntrack knows the flow)?"""
        if not probe.trap or self.conntrack is None or probe.destination is None:
            return False
        try:
            return self.conntrack.is_reply(probe.protocol, probe.source, probe.source_port,
                                           probe.destination, probe.port)
        except OSError as err:
            self.ctx.report_error(f"conntrack lookup failed: {err}")
            return False

    def is_forwarded(self, probe) -> bool:
        """Did destination NAT (a port forward) send it on? Our challenge's own
        redirect is not one."""
        if self.conntrack is None or probe.destination is None:
            return False
        trap = self.firewall.kernel_trap
        try:
            return self.conntrack.is_forwarded(probe.protocol, probe.source, probe.source_port,
                                               probe.destination, probe.port,
                                               trap.challenge_port if trap else 0)
        except OSError as err:
            self.ctx.report_error(f"conntrack lookup failed: {err}")
            return False
