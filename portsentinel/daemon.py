"""The daemon: sensors feed the engine; decisions go to the responders.

Threads:
- main: select on the sensors, engine, inline nftables ban (netlink, no fork);
  housekeeping once a second (listeners, ignore files, expiry); reload.
- reporter: slow work in order, fed by a bounded queue of jobs: name lookups,
  log lines, hosts.deny / KILL_ROUTE / KILL_RUN_CMD, history files, the store.
- control: the unix socket for status/list/block/unblock/reload.
The engine is shared under `self.lock`; nothing on the packet path forks,
sleeps or resolves names.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import queue
import selectors
import sqlite3
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache, partial
from pathlib import Path

from . import __version__, config as configuration, logs
from .addrset import AddressSet, canonical, canonical_network
from .conntrack import Conntrack
from .config import Config, ConfigError
from .control import ControlServer
from .fleet import Fleet
from .engine import (HOSTS_DENY, KILL_ROUTE, NFTABLES, RUN_CMD, TCP, UDP, Decision, Engine,
                     Kind, Policy, Verdict)
from .ignore import (IgnoreFilesStamp, gateway_addresses, local_addresses, never_block_set,
                     resolver_addresses)
from .listeners import ListeningPorts, PeerMemory
from .metrics import Metrics
from .nflog import KernelBanLog
from .nftwatch import RulesetWatch
from .nft import LOG_PREFIX, KernelTrap, Nft, NftBans, NftError, SetFull, port_ranges
from .responders import COMMAND_TIMEOUT, ActionFailed, CompatActions, Records
from .routewatch import RouteWatch
from .sensors import ChallengeSensor, ListenSensor, PacketSensor, TrapPorts
from .store import BanRecord, open_store
from .trw import SequentialDetector, TrwParameters

HOUSEKEEPING_EVERY = 1.0
ADDRESSES_EVERY = 30.0
LISTENERS_EVERY = 0.02  # as fresh as the packet path requires, so it need not ask itself
REPORT_QUEUE = 10000
STATE_SAVE_EVERY = 300.0
RESOLVE_WAIT = 0.5  # RESOLVE_HOST: longest wait for a name, from the detection
# DHCP (68) and DHCPv6 (546) clients: answers to this host's own broadcast and
# multicast queries, which connection tracking cannot pair with the query
ANSWERS_TO_BROADCASTS = frozenset({68, 546})
TRIAL_DELAY = 0.05  # a failed first contact is judged this much later (NAT known by then)
DEFERRED_TRIALS = 65536  # bounded under floods: the oldest are dropped
REPEAT_LINES_PER_SECOND = 20  # "already blocked" lines, all hosts together
FIREWALL_CHECK_DELAY = 0.05  # after a deletion in our table: let a burst of events pass
RECONCILE_EVERY = 30.0  # kernel sets against the state; longer with many bans:
RECONCILE_PER_BAN = 0.001  # a dump costs ~10 us a ban, so at most ~1 % of a core
SET_WARN, SET_EVICT, SET_EVICT_TO = 0.80, 0.95, 0.90  # of BAN_SET_SIZE


def _sequential_for(config: Config) -> SequentialDetector | None:
    if not config.slow_scan_detection:
        return None
    return SequentialDetector(TrwParameters(
        p_detect=config.slow_scan_detection_probability,
        p_false=config.slow_scan_false_positive, memory=config.slow_scan_memory))


def policy_for(config: Config, never_block: AddressSet) -> Policy:
    return Policy(
        scan_trigger=config.scan_trigger, scan_window=config.scan_window,
        block_tcp=config.block_tcp, block_udp=config.block_udp,
        nftables=config.nftables, hosts_deny=config.kill_hosts_deny is not None,
        kill_route=config.kill_route is not None, run_cmd=config.kill_run_cmd is not None,
        run_cmd_first=config.kill_run_cmd_first, ban_time=config.ban_time,
        ban_time_increment=config.ban_time_increment, ban_time_max=config.ban_time_max,
        host_capacity=config.host_capacity, never_block=never_block,
        decoy_grace=config.decoy_grace, ban_rate=config.ban_rate_limit[0],
        ban_burst=max(1, config.ban_rate_limit[1]))


@lru_cache(maxsize=1024)
def _resolve(address: str) -> str | None:
    try:
        return socket.gethostbyaddr(address)[0]
    except (OSError, UnicodeError):
        return None


def _reason(decision: Decision) -> str:
    probe = decision.probe
    if decision.slow_scan:
        return f"Slow scan ({decision.slow_scan} failed first contacts)"
    if probe.kind is Kind.CONNECT:
        return f"Connect to {probe.protocol.upper()} port {probe.port}"
    return logs.scan_name(probe).strip()


class Daemon:
    def __init__(self, config: Config, tcp_mode: str | None, udp_mode: str | None,
                 log: logs.Log, config_path: Path | None = None,
                 cli_modes: tuple[str | None, str | None] = (None, None)):
        self.config, self.log = config, log
        self.config_path, self.cli_modes = config_path, cli_modes
        self.modes = {TCP: tcp_mode, UDP: udp_mode}
        self.sensors: list = []
        self.selector: selectors.BaseSelector | None = None
        self.bans: NftBans | None = None
        self.control: ControlServer | None = None
        self.fleet: Fleet | None = None
        self.listening = ListeningPorts(time.monotonic, memory=config.service_memory)
        self._served_pushed: dict[str, dict[int, float]] = {TCP: {}, UDP: {}}
        self._deferred_trials: deque = deque(maxlen=DEFERRED_TRIALS)  # (due, probe)
        self.reports: queue.Queue = queue.Queue(REPORT_QUEUE)
        self.lock = threading.RLock()
        self.metrics = Metrics()
        self.started = time.time()
        self.stopping = threading.Event()
        self.reload_requested = False
        self._reload_waiters: list[queue.SimpleQueue] = []
        self._expiring: set[str] = set()  # lifts queued, not done yet
        self._wake_w: socket.socket | None = None
        self.host_addresses = local_addresses()
        self.automatic = self._automatic_never_block()
        self.peers = PeerMemory(time.monotonic, config.peer_memory)
        self.route_watch: RouteWatch | None = None
        self._errors_reported = float("-inf")
        self.conntrack: Conntrack | None = None
        self.kernel_trap: KernelTrap | None = None  # as last installed (reinstall after a flush)
        self._next_reconcile = time.monotonic() + RECONCILE_EVERY
        self._set_warned = False
        self._set_full = False  # the kernel refused a ban: evict now, whatever the count
        self._unsaved: dict[str, BanRecord] = {}  # bans whose state write failed: retried
        self._unremoved: dict[str, str] = {}  # lifted bans whose removal failed -> cause
        self.ruleset_watch: RulesetWatch | None = None
        self.repeat_lines = logs.LineBudget(REPEAT_LINES_PER_SECOND, REPEAT_LINES_PER_SECOND)
        self._names: ThreadPoolExecutor | None = None  # RESOLVE_HOST lookups
        self._firewall_check_due = 0.0
        self.ignore_stamp = IgnoreFilesStamp.of(config.ignore_file)
        never = never_block_set(config.ignore_file, self.automatic,
                                configuration.where(config, "IGNORE_FILE"))
        self.engine = Engine(policy_for(config, never), _sequential_for(config))
        self.store = open_store(config.state_file, log.error)
        self._next_state_save = time.monotonic() + STATE_SAVE_EVERY
        self._set_responders(config)

    def _automatic_never_block(self) -> list:
        """This host's addresses, its default gateways and its DNS resolvers."""
        return [*self.host_addresses, *gateway_addresses(), *resolver_addresses()]

    def _set_responders(self, config: Config) -> None:
        self.compat = CompatActions(config, self.log)
        self.records = Records(config.history_file, config.blocked_file, self.log)

    # -- start-up ---------------------------------------------------------
    def start(self) -> None:
        self.log(f"adminalert: portsentinel {__version__} (PortSentry 1.2 compatible) is starting.",
                 logs.INFO)
        # the table and the control socket first: a second daemon gives up
        # here, before it touches the running one's sensors or firewall
        if self.config.nftables:
            self._table_lock = claim_table(self.config.nft_table)
        self.control = ControlServer(self.config.control_socket, self.handle_control,
                                     self.log.error)
        try:
            self._arm()
        except BaseException:
            self.control.close()
            self.control = None
            raise
        if self.config.fleet_redis_url:
            self.fleet = Fleet(self.config.fleet_redis_url, self.config.fleet_name,
                               self.config.fleet_prefix, self._fleet_ban, self._fleet_unban,
                               self._own_bans, self.log, self.log.error,
                               max_seconds=self.config.ban_time_max,
                               rejected=lambda reason: self.metrics.fleet_rejected.labels(
                                   reason).inc()).start()
        if self.config.metrics_address:
            self.metrics.serve(self.config.metrics_address)
            host, port = self.config.metrics_address
            self.log(f"adminalert: metrics on http://{host}:{port}/metrics", logs.INFO)
        self.log("adminalert: PortSentry is now active and listening.", logs.INFO)

    def _arm(self) -> None:
        """Sensors, the nftables table and the kernel trap, bans restored."""
        stealth = self._start_sensors()
        try:
            self.conntrack = Conntrack()
        except OSError as err:
            self.log.error(f"adminalert: ERROR: no conntrack lookups ({err}): a late reply to "
                           "this host's own traffic may be taken for a probe")
        if self.config.nftables:
            self.bans = NftBans(Nft(), self.config.nft_table, self.config.ban_set_size)
            self._install_nftables(stealth)
        self._restore()

    def _start_sensors(self) -> dict[str, TrapPorts]:
        stealth: dict[str, TrapPorts] = {}
        for protocol, mode in self.modes.items():
            if mode is None:
                continue
            if mode in ("tcp", "udp"):
                self._bind_traps(protocol)
            else:
                stealth[protocol] = self._stealth_traps(protocol, mode)
        if stealth:
            self.sensors.append(PacketSensor(stealth, AddressSet(self.host_addresses),
                                             tcp_contacts=self.engine.sequential is not None))
        return stealth

    def _install_nftables(self, stealth: dict[str, TrapPorts]) -> None:
        ports = {p: port_ranges(t.all_ports()) for p, t in stealth.items()}
        trapped = [p for p in stealth if self.config.kernel_trap_for(p, self.modes[p])]
        challenge = 0
        if self.config.decoy_grace and TCP in stealth:
            sensor = ChallengeSensor()
            self.sensors.append(sensor)
            if self.selector is not None:  # a reload: the loop is running
                self.selector.register(sensor, selectors.EVENT_READ)
            challenge = sensor.port
        log_group = self._listen_kernel_bans() if trapped else 0
        self.kernel_trap = KernelTrap(ports.get(TCP, ()), ports.get(UDP, ()),
                                      self.config.peer_memory if self.config.decoy_grace else 0,
                                      self.config.ban_rate_limit,
                                      ban_tcp=TCP in trapped, ban_udp=UDP in trapped,
                                      challenge_port=challenge,
                                      first_contact_delay=self.config.first_contact_delay,
                                      log_group=log_group)
        self.bans.install(self.kernel_trap, self.config.ban_time)
        self.bans.set_never_block(self.engine.policy.never_block)
        self._served_pushed = {TCP: {}, UDP: {}}
        self._push_served()
        for protocol in trapped:
            self.log(f"adminalert: kernel trap armed for {protocol.upper()}: the first probe "
                     "to a trap port is banned inside the kernel", logs.INFO)

    def _listen_kernel_bans(self) -> int:
        """Subscribe to the kernel trap's NFLOG group; the group, or 0 if not."""
        group = self.config.nflog_group
        if not group:
            return 0
        try:
            sensor = KernelBanLog(group, LOG_PREFIX)
        except OSError as err:
            self.log.error(f"adminalert: ERROR: cannot receive the kernel's bans ({err}); they "
                           f"are found by reconciliation every {RECONCILE_EVERY:.0f} s instead")
            return 0
        self.sensors.append(sensor)
        if self.selector is not None:  # a reload: the loop is running
            self.selector.register(sensor, selectors.EVENT_READ)
        return group

    def _bind_traps(self, protocol: str) -> None:
        ports = self.config.tcp_ports if protocol == TCP else self.config.udp_ports
        for port in ports:
            try:
                self.sensors.append(ListenSensor(protocol, port, self.config.port_banner))
                self.log(f"adminalert: Going into listen mode on {protocol.upper()} port: {port}",
                         logs.INFO)
            except OSError:
                self.log.error(f"adminalert: ERROR: could not bind {protocol.upper()} socket: "
                               f"{port}. Attempting to continue")

    def _stealth_traps(self, protocol: str, mode: str) -> TrapPorts:
        name = protocol.upper()
        if mode.startswith("s"):
            ports = self.config.tcp_ports if protocol == TCP else self.config.udp_ports
            for port in ports:
                self.log(f"adminalert: Going into stealth listen mode on {name} port: {port}",
                         logs.INFO)
            return TrapPorts(mode, frozenset(ports))
        limit = self.config.advanced_ports_tcp if protocol == TCP else self.config.advanced_ports_udp
        exclude = (self.config.advanced_exclude_tcp if protocol == TCP
                   else self.config.advanced_exclude_udp | ANSWERS_TO_BROADCASTS)
        self.log(f"adminalert: Advanced mode will monitor first {limit} ports", logs.INFO)
        for port in sorted(exclude):
            self.log(f"adminalert: Advanced mode will manually exclude port: {port}", logs.INFO)
        for port in sorted(p for p in self.listening.refresh(protocol) if p < limit):
            self.log(f"adminalert: Advanced Stealth scan detection mode activated. "
                     f"Ignored {name} port: {port}", logs.INFO)
        return TrapPorts(mode, advanced_limit=limit, exclude=exclude)

    def _restore(self) -> None:
        """Bring engine and firewall in line with the store (after a restart or
        a crash): expired bans lifted, every stored ban re-asserted in the
        nftables set with the time it has left (one batch; bans already there
        are left as they are). Bans found only in our sets are adopted later,
        off the start-up path. Compatibility commands are not re-run (that
        would duplicate their rules, 1.2's bug)."""
        started = time.perf_counter()
        now = time.time()
        expired = self.store.expired(now)
        for record in expired:
            self._lift(record, "expire")
        self._load_sequential()
        records = self.store.bans()
        with self.lock:
            for r in records:
                self.engine.restore(ipaddress.ip_address(r.address), r.since, r.until)
            self.engine.restore_offences(
                {ipaddress.ip_address(a): n for a, n in self.store.offences().items()})
        if self.bans is not None:
            self.bans.elements.add_each((r.address, r.remaining(now) or 0) for r in records)
            self._queue(partial(self._adopt, {r.address for r in records}))
        self.metrics.active_bans.set(len(records))
        if records or expired:
            self.log(f"adminalert: restored {len(records)} bans (re-asserted in the firewall), "
                     f"lifted {len(expired)} expired, in {time.perf_counter() - started:.2f} s",
                     logs.INFO)

    def _load_sequential(self) -> None:
        blob = self.store.blob("sequential")
        if blob is None or self.engine.sequential is None:
            return
        try:
            self.engine.sequential.load(_decode_sequential(blob))
        except (ValueError, KeyError, TypeError) as err:
            self.log.error(f"adminalert: ERROR: slow-scan state not restored: {err}")

    def _save_sequential(self) -> None:
        if self.engine.sequential is None:
            return
        with self.lock:
            state = self.engine.sequential.dump()
        self.store.save_blob("sequential", _encode_sequential(state))

    def _adopt(self, known: set[str]) -> None:
        """Bans in our nftables sets that the store does not know (e.g. made by
        the kernel trap while the daemon was down) are recorded, not dropped."""
        found = {a: left for a, left in self.bans.banned().items() if a not in known}
        if not found:
            return
        self._record_found(found, time.time())
        self.metrics.active_bans.set(self.store.count())
        self.log(f"adminalert: adopted {len(found)} bans found only in the firewall", logs.INFO)

    # -- the packet path --------------------------------------------------
    def handle(self, probe, check_listener: bool = False) -> Decision | None:
        self.metrics.probes.labels(probe.protocol, probe.kind.value).inc()
        with self.lock:
            decision = self.engine.check(probe)
        if decision is None:
            # only now, for a source that still counts: is the port really served?
            served = check_listener and self.listening.in_use(probe.protocol, probe.port)
            decision = self._judge(probe, served)
            if decision is None:
                return None
        return self._act(decision)

    def _act(self, decision: Decision) -> Decision:
        """A decision's inline part (the nftables ban), then its report queued."""
        probe = decision.probe
        if decision.verdict in (Verdict.IGNORED, Verdict.PENDING) or not decision.report:
            return decision
        if decision.verdict is Verdict.ALREADY_BLOCKED \
                and not self.repeat_lines.take(time.monotonic()):
            return decision
        nft_result: str | Exception | None = None
        if decision.verdict is Verdict.BLOCK:
            self.metrics.alerts.labels(probe.protocol).inc()
            if NFTABLES in decision.actions:
                try:
                    # an escalated ban replaces the kernel trap's base timeout
                    nft_result = self.bans.ban(probe.source, decision.ban_seconds,
                                               replace=decision.ban_seconds != self.config.ban_time)
                    self.metrics.ban_latency.observe(max(0.0, time.time() - probe.time))
                except NftError as err:
                    nft_result = err
                    self._set_full = self._set_full or isinstance(err, SetFull)
        elif decision.verdict is Verdict.ALERT:
            self.metrics.alerts.labels(probe.protocol).inc()
        elif decision.verdict is Verdict.DECOY:
            self.metrics.decoys.inc()
        elif decision.verdict is Verdict.RATE_LIMITED:
            self.metrics.rate_limited.inc()
        self._queue(partial(self._report, decision, nft_result, "local",
                            self._start_name_lookup(probe)))
        return decision

    def _judge(self, probe, served: bool) -> Decision | None:
        """Trap probes are counted (SCAN_TRIGGER); every TCP probe the packet
        sensor sees is also a first-contact trial for the sequential test."""
        decision = None
        stateless = probe.kind is not Kind.CONNECT
        if probe.trap and not served:
            probe = self._with_peer(probe)
            if stateless and not probe.peer and self._kernel_decides(probe.protocol):
                pass  # the kernel trap judges it (after NAT, replies spared); NFLOG reports it
            elif stateless and self._is_reply(probe):
                self.metrics.replies.inc()
                return None
            elif stateless and self._forwarded(probe):
                return None  # a port forward (DNAT): no local socket is expected
            else:
                with self.lock:
                    decision = self.engine.count(probe)
                if decision.verdict is not Verdict.PENDING:
                    return decision
        if not stateless or probe.protocol != TCP or self.engine.sequential is None:
            return decision
        if served:
            return self._trial(probe, True) or decision
        # a failed first contact is judged a moment later, when connection
        # tracking surely knows whether destination NAT forwarded it
        self._deferred_trials.append((time.monotonic() + TRIAL_DELAY, probe))
        return decision

    def _trial(self, probe, served: bool) -> Decision | None:
        with self.lock:
            failures = self.engine.trial(probe, served)
        if failures is None:
            return None
        probe = self._with_peer(probe)
        with self.lock:
            return self.engine.decide(probe, failures)

    def _run_deferred_trials(self) -> None:
        now = time.monotonic()
        while self._deferred_trials and self._deferred_trials[0][0] <= now:
            _, probe = self._deferred_trials.popleft()
            with self.lock:
                if self.engine.check(probe) is not None:
                    continue  # banned or ignored meanwhile
            served = self.listening.in_use(TCP, probe.port) or self._forwarded(probe)
            decision = self._trial(probe, served)
            if decision is not None:
                self._act(decision)

    def _kernel_decides(self, protocol: str) -> bool:
        """Is the kernel trap armed for `protocol`, with its bans reported to us?"""
        trap = self.kernel_trap
        return bool(trap and trap.log_group and (trap.ban_tcp if protocol == TCP
                                                  else trap.ban_udp))

    def _forwarded(self, probe) -> bool:
        if self.conntrack is None or probe.destination is None:
            return False
        try:
            challenge = self.kernel_trap.challenge_port if self.kernel_trap else 0
            return self.conntrack.is_forwarded(probe.protocol, probe.source, probe.source_port,
                                               probe.destination, probe.port, challenge)
        except OSError as err:
            self._report_error(f"conntrack lookup failed: {err}")
            return False

    def _is_reply(self, probe) -> bool:
        """An answer to this host's own traffic (conntrack knows the flow)?
        Asked for trap probes only, the engine having let them through."""
        if not probe.trap or self.conntrack is None or probe.destination is None:
            return False
        try:
            return self.conntrack.is_reply(probe.protocol, probe.source, probe.source_port,
                                           probe.destination, probe.port)
        except OSError as err:
            self._report_error(f"conntrack lookup failed: {err}")
            return False

    def kernel_banned(self, probe) -> None:
        """The kernel trap banned a source by itself (NFLOG): record and report it
        like our own ban, so that no ban is ever silent."""
        trap = self.kernel_trap
        if trap and trap.challenge_port and probe.protocol == TCP \
                and probe.port == trap.challenge_port:
            # a completed challenge: its accepted connection knows the trap port
            # it was sent to, so it is reported first; this is the fallback
            for sensor in [s for s in self.sensors if isinstance(s, ChallengeSensor)]:
                self._read(sensor)
            probe = dataclasses.replace(probe, kind=Kind.CONNECT)
        with self.lock:
            decision = self.engine.kernel_ban(probe)
        if decision.verdict is Verdict.IGNORED:  # never-block, e.g. the set changed meanwhile
            self.bans.unban(probe.source)
            self.log.error(f"adminalert: ERROR: the kernel trap banned {probe.source}, which is "
                           "never to be blocked; lifted at once")
            return
        if decision.verdict is not Verdict.BLOCK:
            return
        self.metrics.kernel_bans.inc()
        self.metrics.alerts.labels(probe.protocol).inc()
        nft_result: str | Exception = self.bans.command(probe.source, decision.ban_seconds)
        if decision.ban_seconds != self.config.ban_time:  # escalated: replace the base timeout
            try:
                nft_result = self.bans.ban(probe.source, decision.ban_seconds, replace=True)
            except NftError as err:
                nft_result = err
        self._queue(partial(self._report, decision, nft_result, "kernel",
                            self._start_name_lookup(probe)))

    def _with_peer(self, probe):
        """Mark a stateless probe whose source completed a handshake with us lately."""
        if (self.config.decoy_grace and probe.kind is not Kind.CONNECT and not probe.peer
                and self._is_peer(probe.source)):
            return dataclasses.replace(probe, peer=True)
        return probe

    def _is_peer(self, address) -> bool:
        """Did this source complete a TCP handshake with us lately (PEER_MEMORY)?"""
        try:
            if self.bans is not None:
                return self.bans.is_peer(address)
            return self.peers.is_peer(address)
        except OSError as err:
            self._report_error(f"peer check failed: {err}")
            return False

    def _report_error(self, message: str) -> None:
        """Errors on the packet path, logged at most once a second."""
        now = time.monotonic()
        if now - self._errors_reported >= 1.0:
            self._errors_reported = now
            self.log.error(f"adminalert: ERROR: {message}")

    def _queue(self, job) -> bool:
        try:
            self.reports.put_nowait(job)
            return True
        except queue.Full:
            self.metrics.dropped.labels("report queue full").inc()
            return False

    def run(self) -> None:
        self.selector = selectors.DefaultSelector()
        for sensor in self.sensors:
            self.selector.register(sensor, selectors.EVENT_READ)
        # a signal writes a byte here, so SIGTERM/SIGHUP act at once, not at the next timeout
        wake_r, self._wake_w = socket.socketpair()
        wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ)
        try:
            self.route_watch = RouteWatch()
            self.selector.register(self.route_watch, selectors.EVENT_READ)
        except OSError as err:
            self.log.error(f"adminalert: ERROR: cannot watch routes ({err}); polling every "
                           f"{ADDRESSES_EVERY:.0f} s")
        self._watch_ruleset()
        reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)
        reporter.start()
        next_housekeeping = next_addresses = next_listeners = 0.0
        watching = any(getattr(s, "needs_listener_check", False) for s in self.sensors)
        try:
            while not self.stopping.is_set():
                deadlines = [next_housekeeping, next_listeners if watching else next_housekeeping]
                if self._firewall_check_due:
                    deadlines.append(self._firewall_check_due)
                if self._deferred_trials:
                    deadlines.append(self._deferred_trials[0][0])
                wait = max(0.0, min(deadlines) - time.monotonic())
                for key, _ in self.selector.select(timeout=wait):
                    if key.fileobj is wake_r:
                        _drain(wake_r)
                        continue
                    if key.fileobj is self.route_watch:
                        if self.route_watch.changed():
                            self._refresh_never_block(force=False, addresses=True)
                        continue
                    if key.fileobj is self.ruleset_watch:
                        if self.ruleset_watch.touched() and not self._firewall_check_due:
                            self._firewall_check_due = time.monotonic() + FIREWALL_CHECK_DELAY
                        continue
                    self._read(key.fileobj)
                now = time.monotonic()
                if self._deferred_trials:
                    self._survive("first-contact trials", self._run_deferred_trials)
                if self._firewall_check_due and now >= self._firewall_check_due:
                    self._firewall_check_due = 0.0
                    self._queue(self.verify_firewall)
                if watching and now >= next_listeners:
                    next_listeners = now + LISTENERS_EVERY
                    self._refresh_listeners()
                if self.reload_requested:
                    self.reload_requested = False
                    with self.lock:
                        waiters, self._reload_waiters = self._reload_waiters, []
                    result = self._survive("reload", self.reload) or {
                        "ok": False, "error": "reload failed; see the log"}
                    for waiter in waiters:
                        waiter.put(result)
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_EVERY
                    self._survive("housekeeping", self._housekeeping, now >= next_addresses)
                    if now >= next_addresses:
                        next_addresses = now + ADDRESSES_EVERY
        finally:
            self._shutdown(previous_wakeup, wake_r, reporter)

    def _survive(self, what: str, job, *args):
        """Run periodic work; a failure (say, the state database locked by
        another program for longer than its timeout) is logged and counted,
        and the loop, the sensors and the kernel trap go on."""
        try:
            return job(*args)
        except Exception as err:
            self.metrics.dropped.labels(f"{what} error").inc()
            self._report_error(f"{what} failed, will retry: {err!r}")
            return None

    def _read(self, sensor) -> None:
        # a trap hit is handled as soon as it is parsed: a ban must not wait for
        # the rest of the batch, nor behind first-contact trials for the
        # sequential test (deferred to the end; their order does not matter)
        deferred = []
        try:
            for probe in sensor.read():
                if probe.trap:
                    self._handle_safely(probe, sensor)
                else:
                    deferred.append(probe)
        except OSError as err:  # e.g. ENOBUFS: the kernel dropped packets for us
            self.metrics.dropped.labels("sensor error").inc()
            self._report_error(f"sensor: {err}")
        for probe in deferred:
            self._handle_safely(probe, sensor)

    def _handle_safely(self, probe, sensor) -> None:
        try:
            if getattr(sensor, "kernel_bans", False):
                self.kernel_banned(probe)
                return
            self.handle(probe, sensor.needs_listener_check)
        except Exception as err:  # one bad probe must not stop the sensor
            self.metrics.dropped.labels("handling error").inc()
            self._report_error(f"handling a probe from {probe.source} failed: {err!r}")

    def _shutdown(self, previous_wakeup, wake_r, reporter) -> None:
        signal.set_wakeup_fd(previous_wakeup)
        self.selector.close()
        wake_r.close()
        self._wake_w.close()
        if self.control is not None:
            self.control.close()
        if self.route_watch is not None:
            self.route_watch.close()
        if self.ruleset_watch is not None:
            self.ruleset_watch.close()
        if self.fleet is not None:
            self.fleet.stop()
        self.reports.put(None)
        reporter.join(timeout=10)
        self._close_sensors()
        if self.bans is not None:
            self.bans.disarm_trap()  # no trap without the daemon; bans stay
        self.store.save_counters(self._counters())
        self._save_sequential()
        self.store.close()
        self.log("securityalert: PortSentry is shutting down", logs.NOTICE)
        self.log("adminalert: PortSentry is shutting down", logs.INFO)

    def _close_sensors(self) -> None:
        for sensor in self.sensors:
            if self.selector is not None:
                try:
                    self.selector.unregister(sensor)
                except (KeyError, ValueError):
                    pass
            sensor.close()
        self.sensors = []

    def wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def _refresh_listeners(self) -> None:
        try:
            for protocol in (TCP, UDP):
                self.listening.refresh(protocol)
        except OSError as err:
            self._report_error(f"listener check: {err}")

    def _housekeeping(self, addresses_too: bool) -> None:
        now = time.time()
        with self.lock:
            self.engine.expired(now)
        for record in self.store.expired(now):
            if record.address not in self._expiring:
                self._expiring.add(record.address)
                if not self._queue(partial(self._lift, record, "expire")):
                    self._expiring.discard(record.address)  # queue full: the next second
        if self._unsaved or self._unremoved:
            self._queue(self._save_unsaved)
        held = self.repeat_lines.summary()
        if held:
            self.log(held)
        active = self.store.count()
        self.metrics.active_bans.set(active)
        self._watch_set_fill(active)
        self._push_served()
        if self.bans is not None and time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + max(RECONCILE_EVERY,
                                                          active * RECONCILE_PER_BAN)
            self._queue(self.reconcile)
        if addresses_too:
            self._refresh_never_block(force=False, addresses=True)
            self.store.prune_events()
        if time.monotonic() >= self._next_state_save:
            self._next_state_save = time.monotonic() + STATE_SAVE_EVERY
            self._queue(self._save_sequential)
        elif IgnoreFilesStamp.of(self.config.ignore_file) != self.ignore_stamp:
            self._refresh_never_block(force=True)

    def _push_served(self) -> None:
        """Ports served lately go to the kernel's served_* sets, so that the
        trap spares a service's port while it restarts (SERVICE_MEMORY)."""
        memory = self.config.service_memory
        if self.bans is None or not memory:
            return
        now = time.monotonic()
        for protocol in (TCP, UDP):
            if self.listening.age(protocol) > 1.0:
                self.listening.refresh(protocol)
            pushed = self._served_pushed[protocol]
            due = [p for p, at in self.listening.last_served[protocol].items()
                   if now - at <= memory and now - pushed.get(p, float("-inf")) > memory / 4]
            if due:
                self.bans.elements.refresh_ports(f"served_{protocol}", due, memory)
                pushed.update((p, now) for p in due)

    def _watch_set_fill(self, active: int) -> None:
        """The ban sets must never fill silently: a full set bans no one more.
        Warn at 80 %; past 95 %, lift the automatic bans that end soonest,
        down to 90 %, so that a new scanner always finds room."""
        size = self.config.ban_set_size
        self.metrics.ban_set_fill.set(active / size)
        if active >= SET_WARN * size and not self._set_warned:
            self._set_warned = True
            self.log.error(f"adminalert: WARNING: {active} bans in force, {active / size:.0%} of "
                           f"BAN_SET_SIZE ({size}); past {SET_EVICT:.0%} the bans that end "
                           "soonest are lifted to make room (a spoofed flood?)")
        elif active < SET_WARN * size:
            self._set_warned = False
        if (active >= SET_EVICT * size or self._set_full) and not self._expiring:
            excess = active - int(SET_EVICT_TO * size)
            if self._set_full:  # the kernel's count is ahead of the state's
                excess = max(excess, size // 20)
            self._set_full = False
            if excess <= 0:
                return
            victims = self.store.soonest_expiring(excess)
            self._expiring.update(r.address for r in victims)
            if not self._queue(partial(self._evict, victims)):
                self._expiring.difference_update(r.address for r in victims)

    def _evict(self, victims: list[BanRecord]) -> None:
        for record in victims:
            self._lift(record, "evict")
        self.log.error(f"adminalert: WARNING: ban sets nearly full: lifted the {len(victims)} "
                       "bans that end soonest to make room for new ones")

    def _watch_ruleset(self) -> None:
        if self.bans is None:
            return
        try:
            self.ruleset_watch = RulesetWatch(self.config.nft_table)
            self.selector.register(self.ruleset_watch, selectors.EVENT_READ)
        except OSError as err:
            self.log.error(f"adminalert: ERROR: cannot watch the ruleset ({err}); a flushed "
                           f"firewall is found by reconciliation instead")

    def verify_firewall(self) -> None:
        """Another program deleted something of our table (reporter thread):
        if anything is missing, install the table again and put back every ban."""
        if self.bans is None or self.bans.intact():
            return
        started = time.perf_counter()
        self.metrics.drift.labels("table").inc()
        self.log.error("adminalert: WARNING: our nftables table was changed by another program "
                       "(a ruleset flush?); restoring it, the kernel trap and every ban")
        self.bans.install(self.kernel_trap, self.config.ban_time)
        self.bans.set_never_block(self.engine.policy.never_block)
        self._served_pushed = {TCP: {}, UDP: {}}
        self._push_served()
        now = time.time()
        records = [r for r in self._with_unsaved(self.store.bans())
                   if (r.until is None or r.until > now) and r.address not in self._unremoved]
        self.bans.elements.add_each((r.address, r.remaining(now) or 0) for r in records)
        self.log(f"adminalert: firewall restored: table, kernel trap and {len(records)} bans, "
                 f"in {1000 * (time.perf_counter() - started):.0f} ms", logs.NOTICE)

    def reconcile(self) -> dict:
        """Kernel sets against the state: each difference is logged, counted and
        fixed (a ban only in the kernel is recorded; one only in the state is put
        back). A missing or changed table is installed anew first (verify_firewall)."""
        self.verify_firewall()  # the table, its rules and static sets (a lost event?)
        now = time.time()
        try:
            kernel = self.bans.banned()
        except NftError as err:
            self._report_error(f"reconciliation: cannot list the ban sets: {err}")
            return {"kernel_only": [], "state_only": []}
        stored = {r.address: r for r in self._with_unsaved(self.store.bans())
                  if (r.until is None or r.until > now + 1) and r.address not in self._unremoved}
        with self.lock:  # decided, but maybe not stored yet: not drift
            kernel_only = {a: left for a, left in kernel.items()
                           if a not in stored and a not in self._expiring
                           and not self.engine.is_blocked(ipaddress.ip_address(a))}
        state_only = [r for a, r in stored.items() if a not in kernel
                      and not self.bans.holds(a)]  # a dump during a resize can miss some
        if kernel_only:
            self._record_found(kernel_only, now)
            self.metrics.drift.labels("kernel_only").inc(len(kernel_only))
            self.log.error(f"adminalert: WARNING: {len(kernel_only)} bans were in the firewall "
                           f"but not in the state; now recorded: {_some(kernel_only)}")
        if state_only:
            self.bans.elements.add_each((r.address, r.remaining(now) or 0) for r in state_only)
            self.metrics.drift.labels("state_only").inc(len(state_only))
            self.log.error(f"adminalert: WARNING: {len(state_only)} bans were missing from the "
                           f"firewall and are back: {_some(r.address for r in state_only)}")
        return {"kernel_only": sorted(kernel_only), "state_only": [r.address for r in state_only]}

    def _record_found(self, found: dict[str, float | None], now: float) -> None:
        """Record bans found only in our sets (address -> seconds left), never
        over a record made meanwhile."""
        records = [BanRecord(a, now, None if left is None else now + left,
                             reason="found in the firewall", origin="kernel")
                   for a, left in found.items()]
        self.store.add_bans(records, replace=False)
        with self.lock:
            for r in records:
                self.engine.restore(ipaddress.ip_address(r.address), r.since, r.until)

    def _refresh_never_block(self, force: bool, addresses: bool = False) -> str | None:
        changed = force
        if addresses:
            current = local_addresses()
            if set(current) != set(self.host_addresses):
                self.host_addresses = current
                for sensor in self.sensors:
                    if isinstance(sensor, PacketSensor):
                        sensor.local = AddressSet(current)
            automatic = self._automatic_never_block()
            if set(automatic) != set(self.automatic):
                self.automatic, changed = automatic, True
        stamp = IgnoreFilesStamp.of(self.config.ignore_file)
        changed = changed or stamp != self.ignore_stamp
        if not changed:
            return None
        if stamp != self.ignore_stamp:  # e.g. resolv.conf changed
            self.automatic = self._automatic_never_block()
        try:
            never_block = never_block_set(self.config.ignore_file, self.automatic,
                                          configuration.where(self.config, "IGNORE_FILE"))
        except ConfigError as err:  # keep the last good set; say why
            self.log.error(f"adminalert: ERROR: ignore list not reloaded: {err}")
            return str(err)
        self.ignore_stamp = stamp
        with self.lock:
            self.engine.policy = dataclasses.replace(self.engine.policy, never_block=never_block)
        if self.bans is not None:
            try:
                self.bans.set_never_block(never_block)
            except NftError as err:
                self.log.error(f"adminalert: ERROR: kernel never-block set not updated: {err}")
        self.log(f"adminalert: ignore list loaded: {len(never_block)} entries", logs.INFO)
        return None

    # -- reload (main thread) -------------------------------------------------
    def reload(self) -> dict:
        """Re-read the config and the ignore files; bans and counts are kept.
        A config with an error changes nothing."""
        try:
            config = configuration.load(self.config_path)
            tcp, udp = configuration.resolve_modes(*self.cli_modes, config,
                                                   self.config_path is not None)
            never = never_block_set(config.ignore_file, self.automatic,
                                    configuration.where(config, "IGNORE_FILE"))
        except ConfigError as err:
            self.log.error(f"adminalert: ERROR: reload refused, configuration unchanged: {err}")
            return {"ok": False, "error": str(err)}
        restart_needed = [k for k, a in (("STATE_FILE", "state_file"),
                                         ("CONTROL_SOCKET", "control_socket"),
                                         ("METRICS_ADDRESS", "metrics_address"),
                                         ("NFT_TABLE", "nft_table"))
                          if getattr(config, a) != getattr(self.config, a)]
        for key in restart_needed:
            setattr(config, KEY_ATTRIBUTES[key], getattr(self.config, KEY_ATTRIBUTES[key]))
        self._close_sensors()
        self.config, self.modes = config, {TCP: tcp, UDP: udp}
        self.ignore_stamp = IgnoreFilesStamp.of(config.ignore_file)
        self.peers.memory = config.peer_memory
        self.listening.memory = config.service_memory
        self._set_responders(config)
        with self.lock:
            self.engine.policy = policy_for(config, never)
            if _sequential_for(config) is None:
                self.engine.sequential = None
            elif (self.engine.sequential is None
                  or self.engine.sequential.p != _sequential_for(config).p):
                self.engine.sequential = _sequential_for(config)
        stealth = self._start_sensors()
        for sensor in self.sensors:
            self.selector.register(sensor, selectors.EVENT_READ)
        if config.nftables:
            self.bans = self.bans or NftBans(Nft(), config.nft_table)
            self._install_nftables(stealth)
        elif self.bans is not None:
            self.bans.disarm_trap()
        note = f" ({', '.join(restart_needed)} need a restart)" if restart_needed else ""
        self.log(f"adminalert: configuration reloaded: tcp={tcp or 'off'} udp={udp or 'off'}{note}",
                 logs.INFO)
        return {"ok": True, "restart_needed": restart_needed}

    # -- the reporter thread ----------------------------------------------
    def _report_loop(self) -> None:
        while True:
            job = self.reports.get()
            if job is None:
                return
            try:
                job()
            except Exception as err:  # a report must never kill the reporter
                self.log.error(f"adminalert: ERROR: reporting failed: {err!r}")

    def _start_name_lookup(self, probe) -> Future | None:
        """RESOLVE_HOST: start the reverse lookup as soon as a scan is seen, on a
        small pool, so that slow lookups overlap instead of queueing up."""
        if not self.config.resolve_host:
            return None
        if self._names is None:
            self._names = ThreadPoolExecutor(8, thread_name_prefix="resolve")
        return self._names.submit(_resolve, str(probe.source))

    def _name(self, lookup: Future | None, probe) -> str | None:
        """The name, if it came within RESOLVE_WAIT of the detection: a scanner
        that controls its reverse zone cannot stall the bans behind it."""
        if lookup is None:
            return None
        try:
            return lookup.result(timeout=max(0.0, probe.time + RESOLVE_WAIT - time.time()))
        except FutureTimeout:
            self.metrics.dropped.labels("name lookup too slow").inc()
            return None

    def _report(self, decision: Decision, nft_result, origin: str = "local",
                lookup: Future | None = None) -> None:
        probe = decision.probe
        target = str(probe.source)
        name = self._name(lookup, probe)
        if decision.slow_scan:
            self.log(f"attackalert: Slow scan from host: {logs.host_label(target, name)} to "
                     f"{probe.protocol.upper()} port: {probe.port} ({decision.slow_scan} failed "
                     "first contacts, sequential test)")
        else:
            self.log(logs.alert_line(probe, name))
        if probe.ip_options:
            self.log(logs.ip_options_line(probe, name))
        if decision.verdict is Verdict.ALREADY_BLOCKED:
            self.log(logs.already_blocked_line(target))
            return
        if decision.verdict is Verdict.DECOY:
            self.log(f"attackalert: Host {target} completed a TCP handshake with this host "
                     "lately: not blocked on stateless probes, which can carry a spoofed "
                     "source (possible decoy)")
            self._json_event("decoy", target, port=probe.port, protocol=probe.protocol,
                             kind=probe.kind.value)
            return
        if decision.verdict is Verdict.RATE_LIMITED:
            rate, _ = self.config.ban_rate_limit
            self.log.error(f"attackalert: WARNING: ban rate limit ({rate:g}/s) reached: host "
                           f"{target} not blocked; detection continues (a spoofed flood?)")
            self._json_event("rate_limited", target, port=probe.port, protocol=probe.protocol)
            return
        if decision.verdict is Verdict.ALERT:
            self.log(logs.ignoring_response_line(probe.protocol))
            self._json_event("alert", target, port=probe.port, protocol=probe.protocol,
                             kind=probe.kind.value)
            return
        mode = self.modes[probe.protocol]
        record = BanRecord(target, probe.time,
                           probe.time + decision.ban_seconds if decision.ban_seconds else None,
                           probe.port, probe.protocol, mode, _reason(decision), origin)
        if not self._apply(decision.actions, record, nft_result):
            self.log.error(logs.could_not_block_line(target))
            with self.lock:
                self.engine.forget(probe.source)  # the next probe tries again
            return
        self.records.blocked(time.time(), target, name, probe.port, probe.protocol, mode)

    def _apply(self, actions, record: BanRecord, nft_result) -> bool:
        """Run the block actions in order, store the ban; False if none worked."""
        target, port, mode = record.address, record.port or 0, record.mode or ""
        done = 0
        for action in actions:
            try:
                if action == NFTABLES:
                    if isinstance(nft_result, Exception):
                        raise ActionFailed(f"nftables: {nft_result}")
                    self.log(logs.route_line(target, nft_result))
                elif action == HOSTS_DENY:
                    record.hosts_deny_line = self.compat.hosts_deny(target, port, mode)
                    record.hosts_deny_file = str(self.config.hosts_deny_file)
                elif action == KILL_ROUTE:
                    record.kill_route_command = self.compat.kill_route(target, port, mode)
                    if record.kill_route_command:
                        record.kill_route_undo = self.compat.undo_for(
                            target, record.kill_route_command, port, mode)
                elif action == RUN_CMD:
                    self.compat.run_cmd(target, port, mode)
                done += 1
            except (ActionFailed, OSError) as err:
                self.log.error(f"adminalert: ERROR: {action} for host {target} failed: {err}")
        if done == 0:
            return False
        self._save(record)
        self.metrics.active_bans.inc()  # exact again at the next housekeeping
        self.metrics.bans.labels("fleet" if record.origin not in LOCAL_ORIGINS
                                 else record.origin).inc()
        if self.fleet is not None and record.origin in LOCAL_ORIGINS:
            self.fleet.announce_ban(_announcement(record))
        self._json_event("block", target, port=record.port, protocol=record.protocol,
                         mode=record.mode, reason=record.reason, origin=record.origin,
                         until=record.until, actions=list(actions))
        return True

    def _save(self, record: BanRecord, count_offence: bool = True) -> None:
        """Store a ban whose actions ran. If the state cannot be written now
        (locked by another program, a full disk), the record is kept in memory,
        listed and liftable, and written by the next housekeeping that can."""
        try:
            self.store.add_ban(record, count_offence)
            self._unsaved.pop(record.address, None)
        except sqlite3.Error as err:
            first = record.address not in self._unsaved
            self._unsaved[record.address] = record
            if first:
                self.metrics.dropped.labels("state write failed").inc()
                self._report_error(f"cannot write the state ({err}): the ban of "
                                   f"{record.address} is kept in memory and written later")

    def _remove(self, address: str, cause: str) -> None:
        """Drop a lifted ban's record; if the state cannot be written now, the
        removal is retried (and reconciliation must not put the ban back)."""
        try:
            if self.store.remove_ban(address, cause) is not None:
                self.metrics.active_bans.dec()
            self._unremoved.pop(address, None)
        except sqlite3.Error as err:
            if address not in self._unremoved:
                self.metrics.dropped.labels("state write failed").inc()
                self._report_error(f"cannot write the state ({err}): the lifted ban of "
                                   f"{address} is removed from it later")
            self._unremoved[address] = cause

    def _save_unsaved(self) -> None:
        """Retry what the state could not take (housekeeping, reporter thread)."""
        for record in list(self._unsaved.values()):
            self._save(record)
        for address, cause in list(self._unremoved.items()):
            self._remove(address, cause)
        if not self._unsaved and not self._unremoved:
            self.log("adminalert: the state is writable again; every ban is recorded", logs.INFO)

    def _lift(self, record: BanRecord, cause: str) -> list[str]:
        problems = self._lift_here(record, cause)
        if cause == "unblock" and self.fleet is not None:  # an admin's word counts fleet-wide
            self.fleet.announce_unban(record.address)
        return problems

    def _lift_here(self, record: BanRecord, cause: str) -> list[str]:
        """Undo one ban everywhere: engine, nftables, compat actions, store."""
        address = ipaddress.ip_address(record.address)
        with self.lock:
            self.engine.forget(address)
        if self.bans is not None:
            self.bans.unban(address)
        problems = self.compat.undo(record.address, record.hosts_deny_line,
                                    record.kill_route_command, record.port or 0,
                                    record.mode or "", record.hosts_deny_file,
                                    record.kill_route_undo)
        self._unsaved.pop(record.address, None)
        self._remove(record.address, cause)
        self._expiring.discard(record.address)
        self.metrics.unbans.labels(cause).inc()
        what = {"expire": "expired", "fleet": "lifted by a fleet member",
                "evict": "lifted to make room (ban sets nearly full)"}.get(cause,
                                                                           "lifted by command")
        self.log(f"adminalert: Host {record.address} ban {what}; unblocked", logs.NOTICE)
        for problem in problems:
            self.log.error(f"adminalert: ERROR: unblock {record.address}: {problem}")
        self._json_event("expire" if cause == "expire" else "unblock", record.address,
                         problems=problems)
        return problems

    def _json_event(self, event: str, address: str, **fields) -> None:
        if self.config.json_log is None:
            return
        line = json.dumps({"time": round(time.time(), 6), "event": event, "address": address,
                           **fields})
        try:
            with open(self.config.json_log, "a") as f:
                f.write(line + "\n")
        except OSError as err:
            self.metrics.dropped.labels("json log unwritable").inc()
            self.log.error(f"adminalert: ERROR: cannot write {self.config.json_log}: {err.strerror}")

    # -- control requests (control thread) --------------------------------
    def handle_control(self, request: dict) -> dict:
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
            if self.bans is None:
                return {"ok": False, "error": "no nftables table to reconcile (BLOCK_NFTABLES=0)"}
            return {"ok": True, **self.reconcile()}
        if command == "reload":
            waiter: queue.SimpleQueue = queue.SimpleQueue()
            with self.lock:
                self._reload_waiters.append(waiter)
            self.reload_requested = True
            self.wake()
            return waiter.get(timeout=60)
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _counters(self) -> dict[str, int]:
        return {name: int(value) for name, value in self.metrics.snapshot().items()}

    def status(self) -> dict:
        with self.lock:
            pending = self.engine.pending_hosts
        return {"ok": True, "version": __version__, "pid": os.getpid(), "since": self.started,
                "modes": {"tcp": self.modes[TCP], "udp": self.modes[UDP]},
                "config": self.config.source,
                "firewall": f"nftables inet {self.config.nft_table}" if self.bans else "none",
                "kernel_trap": [p for p in (TCP, UDP)
                                if self.config.kernel_trap_for(p, self.modes[p])],
                "active_bans": self.store.count(), "pending_hosts": pending,
                "fleet": None if self.fleet is None else {
                    "member": self.fleet.member, "connected": self.fleet.connected.is_set(),
                    "unpublished": len(self.fleet.backlog)},
                "report_queue": self.reports.qsize(), "counters": self._counters()}

    def list_bans(self) -> list[dict]:
        now = time.time()
        return [{**dataclasses.asdict(r), "remaining": r.remaining(now)}
                for r in self._with_unsaved(self.store.bans())]

    def _with_unsaved(self, records: list[BanRecord]) -> list[BanRecord]:
        stored = {r.address for r in records}
        return records + [r for r in list(self._unsaved.values()) if r.address not in stored]

    def unblock(self, target: str) -> dict:
        try:
            network = canonical_network(target)
        except ValueError:
            return {"ok": False, "error": f"{target!r} is not an IP address or CIDR network"}
        records = [r for r in self._with_unsaved(self.store.bans())
                   if ipaddress.ip_address(r.address) in network]
        with self.lock:  # bans the engine holds without a stored record (e.g. mid-report)
            engine_only = [b for b in self.engine.bans() if b.address in network
                           and b.address.compressed not in {r.address for r in records}]
        for ban in engine_only:
            records.append(BanRecord(str(ban.address), ban.since, ban.until))
        firewall_only = self._firewall_only(network, {r.address for r in records})
        if not records and not firewall_only:
            return {"ok": False, "error": f"{target} is not blocked"}
        problems = {r.address: self._lift(r, "unblock") for r in records}
        for record in records:  # a mistake, says the admin: the next ban starts afresh
            with self.lock:
                self.engine.pardon(ipaddress.ip_address(record.address))
            try:
                self.store.pardon(record.address)
            except sqlite3.Error:
                pass
        for address in firewall_only:
            self.bans.unban(address)
            self.metrics.unbans.labels("unblock").inc()
            self.log(f"adminalert: Host {address} was in the firewall's ban set without a "
                     "record (made behind our back?); lifted by command", logs.NOTICE)
        return {"ok": True, "unblocked": [r.address for r in records] + firewall_only,
                "firewall_only": firewall_only,
                "problems": {a: p for a, p in problems.items() if p}}

    def _firewall_only(self, network, known: set[str]) -> list[str]:
        """Addresses in our kernel ban sets, within `network`, that nothing recorded."""
        if self.bans is None:
            return []
        try:
            banned = self.bans.banned()
        except NftError:
            return []
        return [a for a in banned if a not in known and ipaddress.ip_address(a) in network]

    def block(self, address: str, seconds, origin: str = "cli", reason: str = "manual",
              wait: bool = True) -> dict:
        """Ban by hand or for a fleet member. The nftables ban is made here; the
        compatibility commands run on the reporter thread (never on the control
        or fleet thread); `wait` for their outcome (the CLI does, the fleet not).
        An address already blocked only gets its ban time set: no command runs
        twice (two iptables rules that one unblock could not both lift)."""
        try:
            ip = canonical(address)
        except ValueError:
            return {"ok": False, "error": f"{address!r} is not an IP address"}
        if ip in self.engine.policy.never_block:
            return {"ok": False, "error": f"{ip} is never blocked (this host, its gateways and "
                                          "resolvers, loopback or the ignore files)"}
        if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
            return {"ok": False, "error": f"{ip} is not a host that can send a probe "
                                          "(multicast, broadcast or unspecified)"}
        now = time.time()
        existing = self.store.get_ban(str(ip)) or self._unsaved.get(str(ip))
        if existing is not None:
            return self._set_ban_time(existing, ip, seconds, now)
        with self.lock:
            length = self.engine.ban(ip, now, None if seconds is None else float(seconds))
        record = BanRecord(str(ip), now, now + length if length else None, reason=reason,
                           origin=origin)
        # the firewall actions as configured; KILL_RUN_CMD is for scans, not manual blocks
        actions = tuple(a for a, on in ((NFTABLES, self.bans is not None),
                                        (HOSTS_DENY, self.config.kill_hosts_deny is not None),
                                        (KILL_ROUTE, self.config.kill_route is not None)) if on)
        if not actions:
            with self.lock:
                self.engine.forget(ip)
            return {"ok": False, "error": f"could not block {ip}: no block action is configured"}
        nft_result: str | Exception | None = None
        if NFTABLES in actions:
            try:
                nft_result = self.bans.ban(ip, length, replace=True)
            except NftError as err:
                nft_result = err
        outcome: queue.SimpleQueue = queue.SimpleQueue()

        def apply() -> None:
            ok = self._apply(actions, record, nft_result)
            if not ok:
                with self.lock:
                    self.engine.forget(ip)
            elif origin == "cli":
                self.log(f"adminalert: Host {ip} blocked by command for {_duration(length)}",
                         logs.NOTICE)
            outcome.put(ok)

        if not self._queue(apply):
            apply()  # the reporter is swamped: an admin's command still gets done
        if not wait:
            return {"ok": True, "address": str(ip), "until": record.until}
        try:
            ok = outcome.get(timeout=3 * COMMAND_TIMEOUT)
        except queue.Empty:
            return {"ok": False, "error": f"blocking {ip} is taking long; see the log"}
        if not ok:
            return {"ok": False, "error": f"could not block {ip}: no block action worked"}
        return {"ok": True, "address": str(ip), "until": record.until}

    def _set_ban_time(self, record: BanRecord, ip, seconds, now: float) -> dict:
        length = self.config.ban_time if seconds is None else float(seconds)
        record.until = now + length if length else None
        with self.lock:
            self.engine.restore(ip, record.since, record.until)
        if self.bans is not None:
            try:
                self.bans.ban(ip, length, replace=True)
            except NftError as err:
                return {"ok": False, "error": f"could not set the ban time of {ip}: {err}"}
        self._save(record, count_offence=False)
        self.log(f"adminalert: Host {ip} was blocked already; its ban now lasts "
                 f"{_duration(length)} from now", logs.NOTICE)
        return {"ok": True, "address": str(ip), "until": record.until, "already": True}

    # -- fleet (fleet thread) ---------------------------------------------
    def _fleet_ban(self, message: dict) -> None:
        address, member = message["address"], message["origin"]
        now = time.time()
        until = message.get("until")
        if until is not None and until <= now:
            return
        try:
            ip = canonical(str(address))
        except ValueError:
            return
        address = str(ip)
        with self.lock:
            if self.engine.is_blocked(ip):
                return
        if ip in self.engine.policy.never_block:
            self.log(f"adminalert: fleet: not applying the ban of {ip} from {member}: "
                     "never blocked here", logs.INFO)
            return
        reason = str(message.get("reason") or "fleet")[:200]
        result = self.block(address, 0 if until is None else until - now, origin=member,
                            reason=reason, wait=False)
        if not result["ok"]:
            self.log.error(f"adminalert: ERROR: fleet ban of {ip} from {member}: {result['error']}")
            return
        self.metrics.fleet_received.inc()
        delay = "" if message.get("resync") or "sent" not in message else \
            f", {1000 * max(0.0, time.time() - message['sent']):.1f} ms after it was sent"
        self.log(f"attackalert: Host {ip} has been blocked via fleet member {member} "
                 f"({reason}){delay}")

    def _fleet_unban(self, message: dict) -> None:
        try:
            address = str(canonical(str(message.get("address"))))
        except ValueError:
            return
        record = self.store.get_ban(address)
        if record is not None:
            self._lift_here(record, "fleet")

    def _own_bans(self) -> list[dict]:
        return [_announcement(r) for r in self.store.bans() if r.origin in LOCAL_ORIGINS]

    def install_signal_handlers(self) -> None:
        """Handlers only set flags; the wake-up fd makes the loop see them at once."""
        def stop(*_):
            self.stopping.set()

        def reload(*_):
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


KEY_ATTRIBUTES = {k: configuration.KEYS[k][0] for k in configuration.KEYS}
LOCAL_ORIGINS = ("local", "cli", "kernel")


def _announcement(record: BanRecord) -> dict:
    return {"address": record.address, "since": record.since, "until": record.until,
            "reason": record.reason, "port": record.port, "protocol": record.protocol}


def _encode_sequential(state: dict) -> bytes:
    import base64
    def encode(value):
        if isinstance(value, (bytes, bytearray)):
            return {"b64": base64.b64encode(value).decode()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value
    return json.dumps({k: encode(v) for k, v in state.items()}).encode()


def _decode_sequential(blob: bytes) -> dict:
    import base64
    def decode(value):
        if isinstance(value, dict) and "b64" in value:
            return base64.b64decode(value["b64"])
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value
    return {k: decode(v) for k, v in json.loads(blob).items()}


def claim_table(table: str) -> socket.socket:
    """One daemon per nftables table and network namespace: an abstract unix
    socket named after the table is the lock (per network namespace, released
    by the kernel when the process ends, whatever the way)."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0portsentinel-nft-{table}")
    except OSError:
        lock.close()
        raise OSError(f"another portsentinel uses the nftables table inet {table} in this "
                      "network namespace (one daemon per table; stop it, or set NFT_TABLE)") \
            from None
    return lock


def _some(addresses, most: int = 10) -> str:
    listed = sorted(addresses)
    more = f" and {len(listed) - most} more" if len(listed) > most else ""
    return ", ".join(listed[:most]) + more


def _duration(seconds: float) -> str:
    return "ever" if not seconds else f"{int(seconds)}s"


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
