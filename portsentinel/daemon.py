"""The daemon: sensors feed the engine; decisions go to the responders.

One thread runs the packet path (select on the sensors, engine, inline
nftables ban). A reporter thread does the slow work in order: name lookups,
log lines, the compatibility commands, history files. Nothing on the packet
path forks, sleeps or resolves names.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import selectors
import signal
import socket
import threading
import time
from functools import lru_cache

from . import __version__, logs
from .addrset import AddressSet
from .config import Config
from .engine import (HOSTS_DENY, KILL_ROUTE, NFTABLES, RUN_CMD, TCP, UDP, Decision,
                     Engine, Policy, Verdict)
from .ignore import IgnoreFilesStamp, local_addresses, never_block_set
from .listeners import ListeningPorts
from .nft import KernelTrap, Nft, NftBans, NftError, port_ranges
from .responders import ActionFailed, CompatActions, Records
from .sensors import ListenSensor, PacketSensor, TrapPorts

HOUSEKEEPING_EVERY = 1.0
ADDRESSES_EVERY = 30.0
REPORT_QUEUE = 10000


def policy_for(config: Config, never_block: AddressSet) -> Policy:
    return Policy(
        scan_trigger=config.scan_trigger, scan_window=config.scan_window,
        block_tcp=config.block_tcp, block_udp=config.block_udp,
        nftables=config.nftables, hosts_deny=config.kill_hosts_deny is not None,
        kill_route=config.kill_route is not None, run_cmd=config.kill_run_cmd is not None,
        run_cmd_first=config.kill_run_cmd_first, ban_time=config.ban_time,
        host_capacity=config.host_capacity, never_block=never_block)


@lru_cache(maxsize=1024)
def _resolve(address: str) -> str | None:
    try:
        return socket.gethostbyaddr(address)[0]
    except (OSError, UnicodeError):
        return None


class Daemon:
    def __init__(self, config: Config, tcp_mode: str | None, udp_mode: str | None,
                 log: logs.Log):
        self.config, self.log = config, log
        self.modes = {TCP: tcp_mode, UDP: udp_mode}
        self.sensors: list = []
        self.bans: NftBans | None = None
        self.listening = ListeningPorts(time.monotonic)
        self.reports: queue.Queue = queue.Queue(REPORT_QUEUE)
        self.failed: queue.SimpleQueue = queue.SimpleQueue()  # addresses whose block failed
        self.dropped_reports = 0
        self.stopping = threading.Event()
        self.reload_requested = False
        self.compat = CompatActions(config, log)
        self.records = Records(config.history_file, config.blocked_file, log)
        self.host_addresses = local_addresses()
        self.ignore_stamp = IgnoreFilesStamp.of(config.ignore_file)
        self.engine = Engine(policy_for(config, never_block_set(config.ignore_file, self.host_addresses)))

    # -- start-up ---------------------------------------------------------
    def start(self) -> None:
        self.log(f"adminalert: portsentinel {__version__} (PortSentry 1.2 compatible) is starting.",
                 logs.INFO)
        stealth: dict[str, TrapPorts] = {}
        for protocol, mode in self.modes.items():
            if mode is None:
                continue
            if mode in ("tcp", "udp"):
                self._bind_traps(protocol)
            else:
                stealth[protocol] = self._stealth_traps(protocol, mode)
        if stealth:
            self.sensors.append(PacketSensor(stealth, AddressSet(self.host_addresses)))
        if self.config.nftables:
            self._install_nftables(stealth)
        self.log("adminalert: PortSentry is now active and listening.", logs.INFO)

    def _install_nftables(self, stealth: dict[str, TrapPorts]) -> None:
        trapped = {p: port_ranges(t.all_ports()) for p, t in stealth.items()
                   if self.config.kernel_trap_for(p, self.modes[p])}
        self.bans = NftBans(Nft(), self.config.nft_table)
        self.bans.install(KernelTrap(trapped.get(TCP, ()), trapped.get(UDP, ())),
                          self.config.ban_time)
        self.bans.set_never_block(self.engine.policy.never_block)
        for protocol in trapped:
            self.log(f"adminalert: kernel trap armed for {protocol.upper()}: the first probe "
                     "to a trap port is banned inside the kernel", logs.INFO)

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
                   else self.config.advanced_exclude_udp)
        self.log(f"adminalert: Advanced mode will monitor first {limit} ports", logs.INFO)
        for port in sorted(exclude):
            self.log(f"adminalert: Advanced mode will manually exclude port: {port}", logs.INFO)
        for port in sorted(p for p in self.listening.refresh(protocol) if p < limit):
            self.log(f"adminalert: Advanced Stealth scan detection mode activated. "
                     f"Ignored {name} port: {port}", logs.INFO)
        return TrapPorts(mode, advanced_limit=limit, exclude=exclude)

    # -- the packet path --------------------------------------------------
    def handle(self, probe, check_listener: bool = False) -> Decision | None:
        decision = self.engine.check(probe)
        if decision is None:
            # only now, for a source that still counts: is the port really served?
            if check_listener and self.listening.in_use(probe.protocol, probe.port):
                return None
            decision = self.engine.count(probe)
        if decision.verdict in (Verdict.IGNORED, Verdict.PENDING) or not decision.report:
            return decision
        nft_result: str | Exception | None = None
        if decision.verdict is Verdict.BLOCK and NFTABLES in decision.actions:
            try:
                nft_result = self.bans.ban(probe.source, self.config.ban_time)
            except NftError as err:
                nft_result = err
        try:
            self.reports.put_nowait((decision, nft_result))
        except queue.Full:
            self.dropped_reports += 1
        return decision

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        for sensor in self.sensors:
            selector.register(sensor, selectors.EVENT_READ)
        # a signal writes a byte here, so SIGTERM/SIGHUP act at once, not at the next timeout
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        selector.register(wake_r, selectors.EVENT_READ)
        reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)
        reporter.start()
        next_housekeeping = next_addresses = 0.0
        try:
            while not self.stopping.is_set():
                for key, _ in selector.select(timeout=HOUSEKEEPING_EVERY):
                    if key.fileobj is wake_r:
                        _drain(wake_r)
                        continue
                    sensor = key.fileobj
                    for probe in sensor.read():
                        self.handle(probe, sensor.needs_listener_check)
                while not self.failed.empty():
                    self.engine.forget(self.failed.get())
                now = time.monotonic()
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_EVERY
                    self._housekeeping(now >= next_addresses)
                    if now >= next_addresses:
                        next_addresses = now + ADDRESSES_EVERY
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            selector.close()
            wake_r.close()
            wake_w.close()
            self.reports.put(None)
            reporter.join(timeout=10)
            for sensor in self.sensors:
                sensor.close()
            if self.bans is not None:
                self.bans.disarm_trap()  # no trap without the daemon; bans stay
            self.log("securityalert: PortSentry is shutting down", logs.NOTICE)
            self.log("adminalert: PortSentry is shutting down", logs.INFO)

    def _housekeeping(self, addresses_too: bool) -> None:
        for protocol in (TCP, UDP):
            self.listening.refresh(protocol)
        self.engine.expired(time.time())
        if addresses_too:
            self._refresh_never_block(force=False, addresses=True)
        elif IgnoreFilesStamp.of(self.config.ignore_file) != self.ignore_stamp:
            self._refresh_never_block(force=True)

    def reload(self) -> None:
        self.log("adminalert: reloading ignore files and host addresses", logs.INFO)
        self._refresh_never_block(force=True, addresses=True)

    def _refresh_never_block(self, force: bool, addresses: bool = False) -> None:
        changed = force
        if addresses:
            current = local_addresses()
            if set(current) != set(self.host_addresses):
                self.host_addresses, changed = current, True
                for sensor in self.sensors:
                    if isinstance(sensor, PacketSensor):
                        sensor.local = AddressSet(current)
        stamp = IgnoreFilesStamp.of(self.config.ignore_file)
        changed = changed or stamp != self.ignore_stamp
        if not changed:
            return
        try:
            never_block = never_block_set(self.config.ignore_file, self.host_addresses)
        except Exception as err:  # keep the last good set; say why
            self.log.error(f"adminalert: ERROR: ignore list not reloaded: {err}")
            return
        self.ignore_stamp = stamp
        self.engine.policy = dataclasses.replace(self.engine.policy, never_block=never_block)
        if self.bans is not None:
            try:
                self.bans.set_never_block(never_block)
            except NftError as err:
                self.log.error(f"adminalert: ERROR: kernel never-block set not updated: {err}")
        self.log(f"adminalert: ignore list loaded: {len(never_block)} entries", logs.INFO)

    # -- the reporter thread ----------------------------------------------
    def _report_loop(self) -> None:
        while True:
            job = self.reports.get()
            if job is None:
                return
            try:
                self._report(*job)
            except Exception as err:  # a report must never kill the reporter
                self.log.error(f"adminalert: ERROR: reporting failed: {err!r}")

    def _report(self, decision: Decision, nft_result) -> None:
        probe = decision.probe
        target = str(probe.source)
        name = _resolve(target) if self.config.resolve_host else None
        self.log(logs.alert_line(probe, name))
        if probe.ip_options:
            self.log(logs.ip_options_line(probe, name))
        if decision.verdict is Verdict.ALREADY_BLOCKED:
            self.log(logs.already_blocked_line(target))
            return
        if decision.verdict is Verdict.ALERT:
            self.log(logs.ignoring_response_line(probe.protocol))
            return
        mode = self.modes[probe.protocol]
        done = 0
        for action in decision.actions:
            try:
                if action == NFTABLES:
                    if isinstance(nft_result, Exception):
                        raise ActionFailed(f"nftables: {nft_result}")
                    self.log(logs.route_line(target, nft_result))
                elif action == HOSTS_DENY:
                    self.compat.hosts_deny(target, probe.port, mode)
                elif action == KILL_ROUTE:
                    self.compat.kill_route(target, probe.port, mode)
                elif action == RUN_CMD:
                    self.compat.run_cmd(target, probe.port, mode)
                done += 1
            except (ActionFailed, OSError) as err:
                self.log.error(f"adminalert: ERROR: {action} for host {target} failed: {err}")
        if done == 0:
            self.log.error(logs.could_not_block_line(target))
            self.failed.put(probe.source)
            return
        self.records.blocked(time.time(), target, name, probe.port, probe.protocol, mode)

    def install_signal_handlers(self) -> None:
        """Handlers only set flags; the wake-up fd makes the loop see them at once."""
        def stop(*_):
            self.stopping.set()

        def reload(*_):
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
