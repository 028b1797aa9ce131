"""The daemon: sensors feed the engine; decisions go to the ban ledger.

Threads (docs/design.md has the picture):
- main, the run loop (loop.py): owns the engine; selects on the sensors,
  hands each probe to the engine once (probes.py) and bans inline over
  netlink (no fork); runs what other threads post to the inbox; timers:
  first-contact trials, firewall checks, housekeeping, reload. Housekeeping
  runs a second after anything happened and while work is left, else every
  10 s (the served ports' poll with it): idle, the daemon wakes every 10 s.
- worker (worker.py): slow work in order: alert lines and names
  (alerts.py), the ledger's compatibility actions, files and state
  (ledger.py), firewall upkeep (firewall.py).
- control and fleet: commands.py; the engine through the inbox, the
  firewall's part through the worker.
Nothing on the packet path forks, sleeps or resolves names.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from .. import __version__, config as configuration, logs
from ..addrset import AddressSet
from ..config import Config, ConfigError, duration_text
from ..conntrack import Conntrack
from ..control import ControlServer
from ..engine import TCP, UDP, Engine
from ..listeners import ListeningPorts, PeerMemory
from ..metrics import Metrics
from ..nft import Nft, NftBans
from ..routewatch import RouteWatch
from ..sensors import PacketSensor
from ..store import open_store
from .alerts import Alerts
from .assembly import Armed, open_sensors, policy_for, trw_for
from .commands import Commands
from .context import Context
from .firewall import Firewall
from .hold import Hold
from .inbox import Inbox
from .ledger import BanLedger
from .loop import RunLoop
from .neverblock import NeverBlock
from .probes import ProbePath
from .restore import SLOW_SCANS, restore, slow_scans
from .worker import Worker

HOUSEKEEPING_EVERY = 1.0  # after an event, and while work is left
HOUSEKEEPING_IDLE = 10.0  # else (a ban's expiry still on time)
SERVED_EVERY = 10.0  # the served ports' poll, on housekeeping's turns (the kernel
                     # learns a port from its first client's packet at once)
ADDRESSES_EVERY = 30.0  # this host's addresses asked again, without route events
ADDRESSES_WATCHED = 300.0  # with them (a lost event is reported too): a safety net
PRUNE_EVERY = 30.0  # the events table cut to its size, if anything was written
STATE_SAVE_EVERY = 300.0
KEY_ATTRIBUTES = {k: configuration.KEYS[k][0] for k in configuration.KEYS}
RESTART_KEYS = ("STATE_FILE", "CONTROL_SOCKET", "METRICS_ADDRESS", "NFT_TABLE")


class Daemon:
    def __init__(self, config: Config, tcp_mode: str | None, udp_mode: str | None,
                 log: logs.Log, config_path: Path | None = None,
                 cli_modes: tuple[str | None, str | None] = (None, None)):
        self.config_path, self.cli_modes = config_path, cli_modes
        metrics, inbox = Metrics(), Inbox()
        self.never_block = NeverBlock(config)
        engine = Engine(policy_for(config, self.never_block.current), trw_for(config))
        self.ctx = ctx = Context(config, {TCP: tcp_mode, UDP: udp_mode}, log, metrics, engine,
                                 open_store(config.state_file, log.error), inbox,
                                 Worker(metrics.dropped, log.error))
        self.listening = ListeningPorts(time.monotonic, memory=config.service_memory)
        self.peers = PeerMemory(time.monotonic, config.peer_memory)
        self.ledger = BanLedger(ctx)
        ctx.worker.idle = self.ledger.flush  # a burst's bans, one transaction
        self.firewall = Firewall(ctx, self.ledger, self.listening)
        self.alerts = Alerts(ctx, self.ledger)
        self.probes = ProbePath(ctx, self.ledger, self.alerts, self.firewall, self.listening,
                                self.peers)
        self.commands = Commands(ctx, self.ledger, self.firewall, self.reload_safely)
        self.loop = RunLoop(inbox)
        self.sensors: list = []
        self.control: ControlServer | None = None
        self.route_watch: RouteWatch | None = None
        self.hold: Hold | None = None
        self.reload_requested = False
        self._table_lock: socket.socket | None = None
        self._next_addresses = 0.0
        self._pruned_at = -1  # the store's write count when events were last pruned
        self._next_prune = 0.0
        self._housekeeping_at = 0.0
        self._housekept = float("-inf")  # monotonic time of the last housekeeping
        self._next_served = 0.0
        self._next_state_save = time.monotonic() + STATE_SAVE_EVERY

    # -- start-up ---------------------------------------------------------
    def start(self) -> None:
        ctx = self.ctx
        ctx.log(f"adminalert: portsentinel {__version__} (PortSentry 1.2 compatible) is "
                "starting.", logs.INFO)
        # the table and the control socket first: a second daemon gives up
        # here, before it touches the running one's sensors or firewall
        if ctx.config.nftables:
            self._table_lock = claim_table(ctx.config.nft_table)
        self.control = ControlServer(ctx.config.control_socket, self.commands.handle,
                                     ctx.log.error)
        try:
            self._arm()
        except BaseException:
            self.control.close()
            self.control = None
            raise
        self._start_fleet()
        if ctx.config.metrics_address:
            ctx.metrics.serve(ctx.config.metrics_address)
            host, port = ctx.config.metrics_address
            ctx.log(f"adminalert: metrics on http://{host}:{port}/metrics", logs.INFO)
        ctx.log("adminalert: PortSentry is now active and listening.", logs.INFO)

    def _arm(self) -> None:
        """Sensors, the nftables table and the kernel trap, bans restored."""
        ctx = self.ctx
        armed = self._open_sensors()
        try:
            self.probes.conntrack = Conntrack()
        except OSError as err:
            ctx.log.error(f"adminalert: ERROR: no conntrack lookups ({err}): a late reply to "
                          "this host's own traffic may be taken for a probe")
        if ctx.config.nftables:
            ctx.bans = NftBans(Nft(), ctx.config.nft_table, ctx.config.ban_set_size)
            self.firewall.install(armed.kernel_trap, armed.trapped)
            self._sync_hold(armed.kernel_trap)
        restore(ctx, self.ledger, self.firewall)

    def _sync_hold(self, trap) -> None:
        """Run the first-contact hold where the installed rules have one."""
        ctx, hold = self.ctx, self.hold
        queue = trap.hold_queue if trap is not None else 0
        if hold is not None and (hold.queue.number != queue or ctx.bans.queue_error):
            hold.stop()
            hold = self.hold = ctx.hold = None
        if not queue:
            return
        seconds, memory = ctx.config.first_contact_hold, ctx.config.peer_memory
        if hold is not None:  # a reload: new times, the same queue
            hold.seconds, hold.clear_seconds = seconds, memory
        else:
            try:
                if ctx.bans.queue_error:
                    raise OSError(ctx.bans.queue_error)
                self.hold = Hold(ctx.config.nft_table, queue, seconds, memory, ctx.metrics,
                                 ctx.log).start()
            except OSError as err:
                ctx.log.error(f"adminalert: ERROR: no first-contact hold ({err}); a scan may "
                              "learn a real port it probes before any trap port "
                              "(FIRST_CONTACT_DELAY=\"1\" is the other way)")
                return
            ctx.log(f"adminalert: first-contact hold armed: a stranger's first SYN to a "
                    f"served port waits {duration_text(seconds)} for the scan to show itself "
                    f"(queue {queue})", logs.INFO)
        ctx.hold = f"{duration_text(seconds)} (queue {queue})"

    def _open_sensors(self) -> Armed:
        ctx = self.ctx
        armed = open_sensors(ctx.config, ctx.modes, self.listening.refresh,
                             self.never_block.host_addresses, ctx.engine.sequential is not None,
                             ctx.log)
        self.sensors = self.probes.sensors = armed.sensors
        return armed

    def _start_fleet(self) -> None:
        config, metrics = self.ctx.config, self.ctx.metrics
        if not config.fleet_redis_url:
            return
        from ..fleet import Fleet  # redis, only when a fleet is configured

        self.ctx.fleet = Fleet(
            config.fleet_redis_url, config.fleet_name, config.fleet_prefix,
            self.commands.fleet_ban, self.commands.fleet_unban, self.commands.own_bans,
            self.ctx.log, self.ctx.log.error, max_seconds=config.ban_time_max,
            rejected=lambda reason: metrics.fleet_rejected.labels(reason).inc(),
            scan_trigger=config.fleet_scan_trigger, scan_window=config.fleet_scan_window,
            correlated=self.commands.fleet_correlated).start()

    # -- the run loop -----------------------------------------------------
    def run(self) -> None:
        ctx, loop = self.ctx, self.loop
        ctx.worker.start()
        for sensor in self.sensors:
            loop.add_reader(sensor, self.probes.read)
        try:
            self.route_watch = RouteWatch()
            loop.add_reader(self.route_watch, self._routes_changed)
        except OSError as err:
            ctx.log.error(f"adminalert: ERROR: cannot watch routes ({err}); polling every "
                          f"{ADDRESSES_EVERY:.0f} s")
        if self.firewall.open_watch() is not None:
            loop.add_reader(self.firewall.watch, lambda _: self.firewall.ruleset_event())
        survive = self.ctx.survive
        loop.add_timer(self.probes.next_deferred,
                       lambda: survive("first-contact trials", self.probes.run_deferred))
        loop.add_timer(lambda: self.firewall.check_due or None, self.firewall.check_now)
        loop.add_timer(ctx.worker.wake_due, ctx.worker.wake)  # quiet reports (worker.py)
        loop.add_timer(lambda: 0.0 if self.reload_requested else None, self._signalled_reload)
        loop.add_timer(lambda: self._housekeeping_at,
                       lambda: survive("housekeeping", self._housekeeping))
        try:
            loop.run()
        finally:
            self._shutdown()

    def _routes_changed(self, watch: RouteWatch) -> None:
        if watch.changed():
            self.refresh_never_block(addresses=True)

    def _housekeeping(self) -> None:
        ctx, ledger, firewall = self.ctx, self.ledger, self.firewall
        now, monotonic = time.time(), time.monotonic()
        self._housekeeping_at = monotonic + HOUSEKEEPING_EVERY  # if this fails
        if monotonic >= self._next_served:
            self._next_served = monotonic + SERVED_EVERY
            ctx.survive("served ports", firewall.push_served)
        ctx.engine.expired(now)
        ledger.lift_later(ctx.store.expired(now), "expire")
        if ledger.unsaved or ledger.unremoved:
            ctx.worker.put(ledger.retry)
        held = self.probes.repeat_lines.summary()
        if held:
            ctx.log(held)
        active = ctx.store.count()
        ctx.metrics.active_bans.set(active)
        firewall.watch_fill(active)
        if firewall.reconcile_due(active):
            ctx.worker.put(firewall.reconcile)
        if monotonic >= self._next_addresses:
            self._next_addresses = monotonic + (ADDRESSES_EVERY if self.route_watch is None
                                                else ADDRESSES_WATCHED)
            self.refresh_never_block(addresses=True)
        if monotonic >= self._next_prune and ctx.store.writes != self._pruned_at:
            self._next_prune = monotonic + PRUNE_EVERY
            ctx.store.prune_events()
            self._pruned_at = ctx.store.writes
        if monotonic >= self._next_state_save:
            self._next_state_save = monotonic + STATE_SAVE_EVERY
            self._save_slow_scans()
        elif self.never_block.files_changed(ctx.config):
            self.refresh_never_block(force=True)
        self._housekeeping_at = monotonic + self._housekeeping_step(now, monotonic)
        self._housekept = monotonic

    def _housekeeping_step(self, now: float, monotonic: float) -> float:
        """A second after anything happened since the last turn, and while
        anything is left to do; else every HOUSEKEEPING_IDLE seconds, or at
        the next ban's expiry if sooner: a scan banned at its first probe costs
        a turn or two, an idle daemon barely wakes."""
        ledger = self.ledger
        if (self.loop.last_event >= self._housekept or ledger.unsaved or ledger.unremoved
                or ledger.pending or self.probes.repeat_lines.held
                or self.ctx.engine.pending_hosts):
            return HOUSEKEEPING_EVERY
        until = self.ctx.store.next_expiry()
        step = HOUSEKEEPING_IDLE if until is None else until - now
        return max(HOUSEKEEPING_EVERY, min(HOUSEKEEPING_IDLE, step))

    def _save_slow_scans(self) -> None:
        blob = slow_scans(self.ctx)  # taken here, on the engine's thread; written there
        if blob is not None:
            self.ctx.worker.put(lambda: self.ctx.store.save_blob(SLOW_SCANS, blob))

    def refresh_never_block(self, force: bool = False, addresses: bool = False) -> None:
        ctx = self.ctx
        new = self.never_block.refresh(ctx.config, ctx.log, force, addresses)
        if self.never_block.moved:
            self.never_block.moved = False
            for sensor in self.sensors:
                if isinstance(sensor, PacketSensor):
                    sensor.local = AddressSet(self.never_block.host_addresses)
        if new is not None:
            ctx.engine.reconfigure(policy_for(ctx.config, new), trw_for(ctx.config))
            self.firewall.set_never_block(new)

    # -- reload (owner thread) ----------------------------------------------
    def _signalled_reload(self) -> None:
        self.reload_requested = False
        self.reload_safely()

    def reload_safely(self) -> dict:
        if self.loop.stopping.is_set():
            return {"ok": False, "error": "portsentinel is stopping"}
        return self.ctx.survive("reload", self.reload) or {
            "ok": False, "error": "reload failed; see the log"}

    def reload(self) -> dict:
        """Re-read the config and the ignore files; bans and counts are kept.
        A config with an error changes nothing."""
        ctx = self.ctx
        try:
            config = configuration.load(self.config_path)
            tcp, udp = configuration.resolve_modes(*self.cli_modes, config,
                                                   self.config_path is not None)
            never = self.never_block.read(config)
        except ConfigError as err:
            ctx.log.error(f"adminalert: ERROR: reload refused, configuration unchanged: {err}")
            return {"ok": False, "error": str(err)}
        restart_needed = [k for k in RESTART_KEYS if getattr(config, KEY_ATTRIBUTES[k])
                          != getattr(ctx.config, KEY_ATTRIBUTES[k])]
        for key in restart_needed:
            setattr(config, KEY_ATTRIBUTES[key], getattr(ctx.config, KEY_ATTRIBUTES[key]))
        self._close_sensors()
        ctx.config, ctx.modes = config, {TCP: tcp, UDP: udp}
        self.never_block.reloaded(config, never)
        self.peers.memory = config.peer_memory
        self.listening.memory = config.service_memory
        self.ledger.configure()
        ctx.engine.reconfigure(policy_for(config, never), trw_for(config))
        if ctx.fleet is not None:  # read per piece of evidence: in force at once
            ctx.fleet.scan_trigger = config.fleet_scan_trigger
            ctx.fleet.scan_window = config.fleet_scan_window
        self.firewall.never_block = never
        armed = self._open_sensors()
        for sensor in self.sensors:
            self.loop.add_reader(sensor, self.probes.read)
        if config.nftables:
            ctx.bans = ctx.bans or NftBans(Nft(), config.nft_table, config.ban_set_size)
            self.firewall.install(armed.kernel_trap, armed.trapped)
            self._sync_hold(armed.kernel_trap)
        elif ctx.bans is not None:
            self._sync_hold(None)
            ctx.bans.disarm_trap()
            self.firewall.kernel_trap = None  # nor does the engine leave hits to it
        note = f" ({', '.join(restart_needed)} need a restart)" if restart_needed else ""
        ctx.log(f"adminalert: configuration reloaded: tcp={tcp or 'off'} udp={udp or 'off'}"
                f"{note}", logs.INFO)
        return {"ok": True, "restart_needed": restart_needed}

    # -- shutdown -----------------------------------------------------------
    def _close_sensors(self) -> None:
        for sensor in self.sensors:
            self.loop.remove_reader(sensor)
            sensor.close()
        self.sensors = self.probes.sensors = []

    def _shutdown(self) -> None:
        ctx = self.ctx
        ctx.inbox.release()  # from now on callers run their calls, one at a time
        self.loop.close()
        for closing in (self.control, self.route_watch, self.firewall.watch):
            if closing is not None:
                closing.close()
        if ctx.fleet is not None:
            ctx.fleet.stop()
        ctx.worker.stop(meanwhile=ctx.inbox.run_pending)
        self.ledger.flush()  # what a worker that did not finish in time left pending
        self.alerts.close()
        self._close_sensors()
        if self.hold is not None:
            self.hold.stop()  # every held SYN handed back before the trap goes
        if ctx.bans is not None:
            ctx.bans.disarm_trap()  # no trap without the daemon; bans stay
        blob = ctx.inbox.call(slow_scans, ctx)
        if blob is not None:
            ctx.store.save_blob(SLOW_SCANS, blob)
        ctx.store.close()
        ctx.log("securityalert: PortSentry is shutting down", logs.NOTICE)
        ctx.log("adminalert: PortSentry is shutting down", logs.INFO)

    def install_signal_handlers(self) -> None:
        """Handlers only set flags; the wake-up fd makes the loop see them at once."""
        def stop(*_):
            self.loop.stopping.set()

        def reload(*_):
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


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
