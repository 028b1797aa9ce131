"""Command line: `portsentinel run|check-config`, and PortSentry's own
`portsentinel -atcp` style for people used to it."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__, config as configuration, logs
from .config import TCP_MODES, UDP_MODES, ConfigError
from .notify import Notifier

PID_FILE = Path("/run/portsentinel.pid")
START_TIMEOUT = 90.0  # how long a classic start waits for the daemon to be ready

DESCRIPTION = """\
Detects port scans and blocks the scanner in the kernel firewall.
A drop-in successor of PortSentry 1.2: it reads portsentry.conf and the
ignore files, speaks the same log lines and writes the same history file.

modes (one TCP and one UDP mode may run together in one process):
  -tcp / -udp     listen on TCP_PORTS / UDP_PORTS; only completed TCP
                  handshakes count, so the source cannot be spoofed
  -stcp / -sudp   watch TCP_PORTS / UDP_PORTS with a packet sensor:
                  SYN, FIN, NULL, XMAS and UDP scans
  -atcp / -audp   watch every port below ADVANCED_PORTS_* that no local
                  service uses (minus ADVANCED_EXCLUDE_*)
Modes come from the command line, else TCP_MODE/UDP_MODE in the config,
else /etc/default/portsentry, else atcp + audp."""


MODE_HELP = {
    "tcp": "listen on TCP_PORTS (completed handshakes)",
    "stcp": "packet sensor on TCP_PORTS (SYN/FIN/NULL/XMAS)",
    "atcp": "packet sensor on unused ports below ADVANCED_PORTS_TCP",
    "udp": "bind UDP_PORTS",
    "sudp": "packet sensor on UDP_PORTS",
    "audp": "packet sensor on unused ports below ADVANCED_PORTS_UDP",
}


def _modes_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("modes (one TCP and one UDP mode)")
    for mode in TCP_MODES:
        group.add_argument(f"-{mode}", dest="tcp_mode", action="store_const", const=mode,
                           help=MODE_HELP[mode])
    for mode in UDP_MODES:
        group.add_argument(f"-{mode}", dest="udp_mode", action="store_const", const=mode,
                           help=MODE_HELP[mode])


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, metavar="FILE",
                        help="portsentry.conf to read (default: /etc/portsentry/portsentry.conf "
                             "if it exists, else the embedded default)")


def _socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None, metavar="PATH",
                        help="the daemon's control socket (default: CONTROL_SOCKET of the "
                             "config: -c FILE, else /etc/portsentry/portsentry.conf if it "
                             "exists, else /run/portsentinel.sock)")
    _config_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portsentinel", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"portsentinel {__version__} (PortSentry 1.2 compatible)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="detect and block (the daemon)",
                              description="Start the daemon. " + DESCRIPTION.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_argument(run)
    _modes_arguments(run)
    run.add_argument("--foreground", action="store_true",
                     help="stay in the foreground (for systemd and containers); without "
                          "it the daemon detaches once it is ready, and a start-up error "
                          "is printed with exit status 1")
    run.add_argument("--log", default=None, metavar="TARGETS",
                     help="where log lines go, comma-separated: syslog, stdout (only with "
                          "--foreground), file:PATH (appended to) (default: syslog; "
                          "syslog,stdout with --foreground)")
    run.add_argument("--pid-file", type=Path, default=PID_FILE,
                     help=f"written in both modes, removed at exit; a start is refused while "
                          f"it names a running portsentinel (default {PID_FILE})")

    for name, text in (("status", "show what the running daemon is doing"),
                       ("list", "list the bans in force"),
                       ("reload", "re-read the config and ignore files (like SIGHUP); bans are kept"),
                       ("reconcile", "compare the firewall's ban sets with the state now and fix "
                                     "any difference (done every 30 s anyway)")):
        sub = commands.add_parser(name, help=text, description=text)
        _socket_argument(sub)
        if name == "list":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
    unblock = commands.add_parser("unblock", help="lift a ban (an address, or every ban in a CIDR)",
                                  description="Lift bans: from nftables, hosts.deny (and "
                                              "KILL_ROUTE, when it can be undone) and the state.")
    unblock.add_argument("target", metavar="IP|CIDR")
    unblock.add_argument("--offline", action="store_true",
                         help="the daemon is stopped: lift the bans recorded in its state "
                              "file itself (nftables, hosts.deny, KILL_ROUTE undone); "
                              "refused while the daemon runs")
    _socket_argument(unblock)
    block = commands.add_parser("block", help="ban an address by hand",
                                description="Ban an address with the configured firewall actions.")
    block.add_argument("address", metavar="IP")
    block.add_argument("--for", dest="duration", metavar="DURATION",
                       help="how long: 3600, 90m, 12h, 7d (default: BAN_TIME, escalated for "
                            "repeat offenders); 0 = forever")
    _socket_argument(block)

    check = commands.add_parser("check-config", help="validate the configuration and exit",
                                description="Read the config and the ignore files; print "
                                            "what would run, or the first error as file:line.")
    _config_argument(check)
    _modes_arguments(check)
    # run's own options are accepted and ignored: the unit runs check-config and
    # run with the same $PORTSENTINEL_ARGS
    check.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)
    check.add_argument("--log", help=argparse.SUPPRESS)
    check.add_argument("--pid-file", type=Path, help=argparse.SUPPRESS)
    return parser


def _legacy(argv: list[str]) -> list[str]:
    """`portsentinel -atcp -audp` (PortSentry style) means `portsentinel run -atcp -audp`."""
    legacy = {f"-{m}" for m in TCP_MODES + UDP_MODES}
    if argv and argv[0] in legacy:
        return ["run", *argv]
    return argv


def load_checked(args):
    """Config, modes and never-block set, or ConfigError: nothing half-loaded."""
    from .ignore import never_block_set

    config = configuration.load(args.config)
    tcp, udp = configuration.resolve_modes(args.tcp_mode, args.udp_mode, config,
                                           args.config is not None)
    never_block = never_block_set(config.ignore_file, [],
                                  configuration.where(config, "IGNORE_FILE"))
    return config, tcp, udp, never_block


def check_config(args) -> int:
    try:
        config, tcp, udp, never_block = load_checked(args)
    except ConfigError as err:
        print(f"portsentinel: {err}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"portsentinel: warning: {warning}", file=sys.stderr)
    firewall = ("nftables table inet " + config.nft_table) if config.nftables else "none"
    print(f"config: {config.source}: OK")
    print(f"modes: tcp={tcp or 'off'} udp={udp or 'off'}")
    print(f"blocking: BLOCK_TCP={config.block_tcp} BLOCK_UDP={config.block_udp} "
          f"firewall={firewall} KILL_ROUTE={'set' if config.kill_route else 'unset'} "
          f"KILL_HOSTS_DENY={'set' if config.kill_hosts_deny else 'unset'} "
          f"KILL_RUN_CMD={'set' if config.kill_run_cmd else 'unset'}")
    print(f"ignore entries: {len(never_block)} (plus this host's own addresses at run time)")
    if config.source != configuration.EMBEDDED:  # a portsentry.conf: say what changes
        print("compared with PortSentry 1.2:")
        from .daemon.assembly import changes_from_12

        for line in changes_from_12(config, tcp, udp):
            print(f"  {line}")
    return 0


def _log_for(args) -> logs.Log:
    targets = [t for t in (args.log or ("syslog,stdout" if args.foreground else "syslog"))
               .split(",") if t]
    files = [t[len("file:"):] for t in targets if t.startswith("file:")]
    names = {t for t in targets if not t.startswith("file:")}
    unknown = names - {"syslog", "stdout"}
    if unknown:
        raise ConfigError(f"--log: unknown target {', '.join(sorted(unknown))}")
    if "stdout" in names and not args.foreground:
        raise ConfigError("--log stdout needs --foreground (a daemon has no terminal); "
                          "use --log file:PATH")
    if len(files) + ("stdout" in names) > 1:
        raise ConfigError("--log: one of stdout and file:PATH")
    stream = sys.stdout if "stdout" in names else None
    if files:
        if not files[0]:
            raise ConfigError("--log file: needs a path, e.g. file:/var/log/portsentinel.log")
        try:
            stream = open(files[0], "a", buffering=1)
        except OSError as err:
            raise ConfigError(f"--log: cannot open {files[0]}: {err.strerror}") from None
    return logs.Log(ident=args.syslog_ident, facility=args.syslog_facility,
                    to_syslog="syslog" in targets, stream=stream)


class StartError(Exception):
    """The daemon cannot start; the message is for the user."""


class Startup:
    """Where the outcome of a start goes: the terminal (foreground), or the
    parent of a classic start, which waits on a pipe and exits with it."""

    def __init__(self, pipe: int | None = None):
        self.pipe = pipe

    def failed(self, message: str, log: logs.Log) -> int:
        log.error(f"adminalert: ERROR: {message}")
        if self.pipe is None:
            print(f"portsentinel: {message}", file=sys.stderr)
        else:
            self._tell(f"error {message}")
        return 1

    def ready(self) -> None:
        if self.pipe is not None:
            self._tell("ready")

    def _tell(self, text: str) -> None:
        try:
            os.write(self.pipe, text.encode(errors="replace") + b"\n")
        except OSError:
            pass
        finally:
            os.close(self.pipe)
            self.pipe = None


def run(args) -> int:
    if os.geteuid() != 0:
        print("portsentinel: run needs root (raw sockets and the firewall)", file=sys.stderr)
        return 1
    try:
        config, tcp, udp, _ = load_checked(args)
        args.syslog_ident, args.syslog_facility = config.syslog_ident, config.syslog_facility
        log = _log_for(args)
    except ConfigError as err:
        print(f"portsentinel: {err}", file=sys.stderr)
        return 1
    if tcp is None and udp is None:
        print("portsentinel: no mode to run (TCP_MODE and UDP_MODE are both empty)",
              file=sys.stderr)
        return 1
    for warning in config.warnings:
        log(f"adminalert: warning: {warning}", logs.WARNING)
    # a classic daemon works from "/": what it opens later must not be relative
    config_path = args.config.absolute() if args.config else None
    pid_file = args.pid_file.absolute()
    if args.foreground:
        startup = Startup()
    else:
        startup = _daemonize()
        if isinstance(startup, int):
            return startup  # the parent: the daemon's start-up outcome
    return _serve(args, config, tcp, udp, log, config_path, pid_file, startup)


def _serve(args, config, tcp, udp, log, config_path, pid_file, startup: Startup) -> int:
    """The daemon proper, in the process that stays: pid file, Daemon, ready, loop.
    In a classic start this runs in the detached child, so no thread exists
    before here (control socket, metrics, fleet and reporter start below)."""
    from .daemon import Daemon
    from .nft import NftError

    notifier = Notifier.from_environment()
    try:
        claim_pid_file(pid_file)
    except StartError as err:
        return startup.failed(f"cannot start: {err}", log)
    try:
        try:
            daemon = Daemon(config, tcp, udp, log, config_path=config_path,
                            cli_modes=(args.tcp_mode, args.udp_mode))
            daemon.install_signal_handlers()  # a SIGTERM during start stops it cleanly
            _notify_stopping_on_signals(notifier)
            daemon.start()
        except (ConfigError, OSError, NftError) as err:
            return startup.failed(f"cannot start: {err}", log)
        except Exception as err:
            if startup.pipe is None:
                raise
            return startup.failed(f"cannot start: {err!r}", log)
        startup.ready()
        notifier.ready(f"modes: tcp={tcp or 'off'} udp={udp or 'off'}")
        try:
            daemon.run()
        except Exception as err:
            log.error(f"adminalert: ERROR: stopped by an unexpected error: {err!r}")
            raise
    finally:
        release_pid_file(pid_file)
    return 0


def _notify_stopping_on_signals(notifier: Notifier) -> None:
    """Tell systemd at once that a stop has begun (the daemon's own handlers
    still do the work)."""
    if not notifier:
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            notifier.stopping()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def _daemonize() -> Startup | int:
    """The classic start: fork before any thread exists (after fork() only the
    calling thread would be left), detach (setsid, second fork, "/", stdio on
    /dev/null). The child returns a Startup whose pipe tells the waiting
    parent "ready" or the error; the parent returns its exit status: 0 once
    the daemon is ready, 1 with the daemon's error printed."""
    if threading.active_count() > 1:
        print("portsentinel: internal error: threads running before the daemon forks",
              file=sys.stderr)
        return 1
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    first = os.fork()
    if first:
        os.close(write_end)
        os.waitpid(first, 0)
        return _await_daemon(read_end)
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
    except BaseException:  # never fall back into the parent's code path
        os._exit(1)
    return Startup(write_end)


def _await_daemon(read_end: int, timeout: float = START_TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    chunks = []
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"portsentinel: the daemon has not reported ready after {timeout:.0f} s "
                      "(see the log)", file=sys.stderr)
                return 1
            if not select.select([pipe], [], [], left)[0]:
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            chunks.append(chunk)
    said = b"".join(chunks).decode(errors="replace").strip()
    if said == "ready":
        return 0
    if said.startswith("error "):
        print(f"portsentinel: {said[len('error '):]}", file=sys.stderr)
    else:
        print("portsentinel: the daemon exited during start-up (see the log)", file=sys.stderr)
    return 1


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_portsentinel(pid: int) -> bool:
    """A live (not zombie) process whose command line names portsentinel."""
    try:
        return b"portsentinel" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def claim_pid_file(path: Path) -> None:
    """Write our pid to `path`; refuse while it names another live portsentinel.
    A stale file (dead process, or a pid now used by something else) is replaced."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StartError(f"cannot write the pid file {path}: {err.strerror}") from None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            other = _pid_in(path)
            if other is not None and other != os.getpid() and _is_portsentinel(other):
                raise StartError(f"another portsentinel is running (pid {other}, "
                                 f"from {path})") from None
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise StartError(f"cannot replace the stale pid file {path}: "
                                 f"{err.strerror}") from None
            continue
        except OSError as err:
            raise StartError(f"cannot write the pid file {path}: {err.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise StartError(f"cannot claim the pid file {path} (another start at the same time?)")


def release_pid_file(path: Path) -> None:
    """Remove the pid file if it is still ours."""
    if _pid_in(path) == os.getpid():
        try:
            path.unlink()
        except OSError:
            pass


def _when(epoch) -> str:
    return "never" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _left(seconds) -> str:
    if seconds is None:
        return "forever"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{int(seconds)}s"


def print_bans(bans: list[dict]) -> None:
    if not bans:
        print("no bans")
        return
    rows = [("ADDRESS", "SINCE", "EXPIRES", "LEFT", "PORT", "EVIDENCE", "DROPPED", "REASON",
             "ORIGIN")]
    for b in bans:
        port = f"{b['port']}/{b['protocol']}" if b.get("port") is not None else "-"
        dropped = "-" if b.get("dropped") is None else str(b["dropped"])
        rows.append((b["address"], _when(b["since"]), _when(b["until"]), _left(b["remaining"]),
                     port, b.get("evidence") or "-", dropped, b["reason"], b["origin"]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _print_bypass(bypass: dict | None, most: int = 20) -> None:
    """Bridges that forward past the IP firewall, and bans that do not hold there."""
    for bridge in (bypass or {}).get("bridges", []):
        print(f"bridge past the firewall: {bridge}")
    through = list((bypass or {}).get("bans_getting_through", {}).items())
    for address, packets in through[:most]:
        print(f"banned but getting through a bridge: {address} ({packets} packets)")
    if len(through) > most:
        print(f"... and {len(through) - most} more banned hosts getting through a bridge")


def print_status(status: dict) -> None:
    modes = status["modes"]
    print(f"portsentinel {status['version']} (pid {status['pid']}) running since "
          f"{_when(status['since'])}")
    print(f"config: {status['config']}")
    print(f"modes: tcp={modes['tcp'] or 'off'} udp={modes['udp'] or 'off'}; "
          f"firewall: {status['firewall']}; kernel trap: {', '.join(status['kernel_trap']) or 'off'}")
    if status.get("firewall_trouble"):
        print(f"firewall NOT IN FORCE: {status['firewall_trouble']}")
    _print_bypass(status.get("bypass"))
    print(f"first-contact hold: {status.get('first_contact_hold') or 'off'}")
    grades = ", ".join(f"{grade} {n}" for grade, n in
                       sorted((status.get("bans_by_evidence") or {}).items()))
    print(f"bans in force: {status['active_bans']}" + (f" ({grades})" if grades else "")
          + f"; hosts being counted: {status['pending_hosts']}; "
          f"report queue: {status['report_queue']}")
    fleet = status.get("fleet")
    if fleet:
        state = "connected" if fleet["connected"] else "NOT connected (working locally)"
        print(f"fleet: member {fleet['member']}, {state}, {fleet['unpublished']} bans to publish; "
              f"scan evidence shared {fleet.get('evidence_sent', 0)}, held back (rate) "
              f"{fleet.get('evidence_dropped', 0)}")
    for name, value in sorted(status["counters"].items()):
        if name.startswith(("portsentinel_probes", "portsentinel_alerts", "portsentinel_bans",
                            "portsentinel_unbans", "portsentinel_dropped",
                            "portsentinel_first_contacts", "portsentinel_hold")) and value:
            print(f"  {name} {int(value)}")


def control(args) -> int:
    from .control import ControlError, request

    if args.socket is not None:
        path = args.socket
    else:
        try:  # -c, or /etc/portsentry/portsentry.conf if it exists, else the embedded default
            path = configuration.load(args.config).control_socket
        except ConfigError as err:
            print(f"portsentinel: {err} (give the daemon's socket with --socket)",
                  file=sys.stderr)
            return 2
    message: dict = {"command": args.command}
    if args.command == "unblock":
        message["target"] = args.target
    if args.command == "block":
        message["address"] = args.address
        if args.duration is not None:
            try:
                message["seconds"] = configuration.KEYS["BAN_TIME"][1](args.duration)
            except ValueError as err:
                print(f"portsentinel: --for: {err}", file=sys.stderr)
                return 2
    try:
        reply = request(path, message)
    except (ControlError, OSError, ValueError) as err:
        print(f"portsentinel: {err}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"portsentinel: {reply.get('error', 'failed')}", file=sys.stderr)
        return 1
    if args.command == "status":
        print_status(reply)
    elif args.command == "list":
        if args.json:
            print(json.dumps(reply["bans"], indent=2))
        else:
            print_bans(reply["bans"])
    elif args.command == "unblock":
        print("unblocked: " + ", ".join(reply["unblocked"]))
        for address in reply.get("firewall_only", []):
            print(f"note: {address} was in the firewall's ban set without a record")
        for address, problems in reply.get("problems", {}).items():
            for problem in problems:
                print(f"warning: {address}: {problem}", file=sys.stderr)
    elif args.command == "block":
        print(f"blocked {reply['address']} until {_when(reply['until'])}")
    elif args.command == "reconcile":
        kernel_only, state_only = reply["kernel_only"], reply["state_only"]
        if reply.get("firewall_trouble"):
            print(f"firewall NOT IN FORCE: {reply['firewall_trouble']}")
        elif reply.get("table_restored"):
            print("our table had been changed by another program: made again, every ban "
                  "put back")
        elif not kernel_only and not state_only:
            print("firewall and state agree")
        for address in kernel_only:
            print(f"{address}: in the firewall only; now recorded")
        for address in state_only:
            print(f"{address}: missing from the firewall; put back")
        _print_bypass(reply.get("bypass"))
    elif args.command == "reload":
        note = reply.get("restart_needed")
        print("reloaded" + (f" ({', '.join(note)} need a restart)" if note else ""))
    return 0


def unblock_offline(args) -> int:
    """Lift bans with the daemon stopped (e.g. the package removed while it
    was not running): each ban in the CIDR recorded in the state is undone
    as the daemon would (hosts.deny line, KILL_ROUTE's undo, the nftables
    element) and removed from the state."""
    from .addrset import canonical_network, from_stored
    from .control import ControlError, request
    from .responders import CompatActions
    from .store import Store

    try:
        config = configuration.load(args.config)
        network = canonical_network(args.target)
    except (ConfigError, ValueError) as err:
        print(f"portsentinel: {err}", file=sys.stderr)
        return 2
    try:
        request(args.socket or config.control_socket, {"command": "status"})
        print("portsentinel: the daemon is running: unblock without --offline",
              file=sys.stderr)
        return 1
    except (ControlError, OSError, ValueError):
        pass  # not running: ours to do
    if not config.state_file.exists():
        print("unblocked: (no state file)")
        return 0
    log = logs.Log(to_syslog=True)
    store, compat = Store(config.state_file), CompatActions(config, log)
    elements = None
    if config.nftables:
        from .nfnetlink import SetElements
        elements = SetElements(config.nft_table)
    lifted, failed = [], 0
    for record in store.bans():
        if from_stored(record.address) not in network:
            continue
        problems = compat.undo(record.address, record.hosts_deny_line,
                               record.kill_route_command, record.port or 0, record.mode or "",
                               record.hosts_deny_file, record.kill_route_undo)
        if elements is not None:
            try:
                elements.delete([from_stored(record.address)])
            except OSError:
                pass  # not in the set (expired, or the table is gone): nothing to lift
        for problem in problems:
            print(f"warning: {record.address}: {problem}", file=sys.stderr)
        failed += bool(problems)
        store.remove_ban(record.address, "unblock", "offline")
        log(f"adminalert: Host {record.address} ban lifted by command (offline); unblocked",
            logs.NOTICE)
        lifted.append(record.address)
    store.close()
    print("unblocked: " + (", ".join(lifted) or "(none)"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `portsentinel status | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_legacy(list(sys.argv[1:] if argv is None else argv)))
    if args.command == "run":
        return run(args)
    if args.command == "check-config":
        return check_config(args)
    if args.command == "unblock" and args.offline:
        return unblock_offline(args)
    if args.command in ("status", "list", "unblock", "block", "reload", "reconcile"):
        return control(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
