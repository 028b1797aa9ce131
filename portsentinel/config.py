"""PortSentry 1.2 configuration: `portsentry.conf` and `/etc/default/portsentry`.

Lines are `KEY="value"` (spaces around `=` allowed), `#` starts a comment.
Unlike 1.2, every problem is an error naming file:line instead of a silently
skipped option, port lists have no 64-entry cap and accept ranges (`1-1023`).
1.2 takes the first occurrence of a key; so do we, with a warning.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

TCP_MODES = ("tcp", "stcp", "atcp")
UDP_MODES = ("udp", "sudp", "audp")
DEFAULT_MODES_FILE = Path("/etc/default/portsentry")
DEFAULT_CONFIG = Path("/etc/portsentry/portsentry.conf")  # where PortSentry users keep it
EMBEDDED = "<embedded default>"
MAX_SECONDS = 100 * 365 * 86400  # any duration longer is a mistake (or infinity)

_LINE = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$')
_SHELL_SYNTAX = re.compile(r"[|;&<>`]|\$\(")


class ConfigError(Exception):
    """A configuration problem, located at file:line when it has one."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        self.message, self.source, self.line = message, source, line
        where = f"{source}:{line}: " if source and line else f"{source}: " if source else ""
        super().__init__(where + message)


@dataclass
class Config:
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    advanced_ports_tcp: int = 1024
    advanced_ports_udp: int = 1024
    advanced_exclude_tcp: frozenset[int] = frozenset({113, 139})
    advanced_exclude_udp: frozenset[int] = frozenset({520, 138, 137, 67})
    ignore_file: Path | None = None
    history_file: Path = Path("/var/lib/portsentinel/portsentry.history")
    blocked_file: Path = Path("/var/lib/portsentinel/portsentry.blocked")
    resolve_host: bool = False
    block_tcp: int = 1
    block_udp: int = 1
    kill_route: str | None = None
    kill_hosts_deny: str | None = None
    kill_run_cmd: str | None = None
    kill_run_cmd_first: bool = False
    scan_trigger: int = 0
    port_banner: str | None = None
    # portsentinel extensions
    tcp_mode: str | None = None
    udp_mode: str | None = None
    scan_window: float = 300.0
    ack_scan_trigger: int = 5  # ACK-family probes: distinct ports that make a scan; 0 = off
    ack_scan_window: float = 60.0
    proto_scan_trigger: int = 4  # IP protocol scans: distinct protocols that make one; 0 = off
    proto_scan_window: float = 60.0
    ban_time: float = 86400.0
    ban_time_by_evidence: tuple = ()  # (grade, seconds) pairs; () = BAN_TIME for every ban
    block_nftables: str = "auto"  # auto and 1: on (KILL_ROUTE runs in addition); 0: off
    kernel_trap: str = "auto"  # auto: in-kernel ban on the first probe where it applies
    kernel_sensor: str = "auto"  # auto: nftables logs what userspace must see (else AF_PACKET)
    ban_time_increment: float = 2.0
    ban_time_max: float = 30 * 86400.0
    kill_route_undo: str | None = None
    state_file: Path = Path("/var/lib/portsentinel/state.db")
    control_socket: Path = Path("/run/portsentinel.sock")
    metrics_address: tuple[str, int] | None = None
    json_log: Path | None = None
    decoy_grace: bool = True
    peer_memory: float = 600.0
    ban_rate_limit: tuple[float, int] = (20.0, 20)  # new bans per second, burst
    slow_scan_detection: bool = True
    slow_scan_false_positive: float = 0.01
    slow_scan_detection_probability: float = 0.99
    slow_scan_memory: float = 86400.0
    first_contact_delay: bool = False
    first_contact_hold: float = 0.02  # a stranger's first SYN to a served port waits; 0 = off
    hold_queue: int = 7417  # the netfilter queue of the hold
    hold_rate: int = 5000  # SYNs held per second at most; past it they pass unheld
    fleet_redis_url: str | None = None
    fleet_name: str = field(default_factory=lambda: socket.gethostname())
    fleet_prefix: str = "portsentinel"
    fleet_scan_trigger: int = 3  # distinct members a source's unused-port contacts must reach
    fleet_scan_window: float = 600.0
    nft_table: str = "portsentinel"
    hosts_deny_file: Path = Path("/etc/hosts.deny")
    syslog_ident: str = "portsentry"
    syslog_facility: str = "daemon"
    host_capacity: int = 65536
    ban_set_size: int = 262144  # per family; fuller than 95 %: the soonest-expiring lifted
    nflog_group: int = 7417  # the kernel trap reports its bans here; 0 = off
    service_memory: float = 3600.0  # a port served this lately is no trap (restarts)
    source: str = EMBEDDED
    warnings: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # KEY -> line it was read from

    @property
    def nftables(self) -> bool:
        """The nftables set (and the kernel trap) ban first, whether KILL_ROUTE
        is set or not: a 1.2 config kept unchanged gets the same protection
        as the defaults, its KILL_ROUTE runs in addition, off the packet path.
        BLOCK_NFTABLES="0" is the explicit way back to 1.2's KILL_ROUTE only."""
        return self.block_nftables != "0"


# -- value parsers: each takes the raw string, returns a value or raises ValueError
def parse_port(text: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return port


def parse_port_list(text: str) -> tuple[int, ...]:
    """`1,11,15` and ranges `1-1023`; order kept, duplicates dropped."""
    ports: dict[int, None] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        low, sep, high = item.partition("-")
        if not sep:
            ports[parse_port(low)] = None
            continue
        first, last = parse_port(low), parse_port(high)
        if first > last:
            raise ValueError(f"range {item!r} runs backwards")
        ports.update(dict.fromkeys(range(first, last + 1)))
    return tuple(ports)


def _boolean(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"{text!r} must be 0 or 1")
    return text == "1"


def _block_level(text: str) -> int:
    if text not in ("0", "1", "2"):
        raise ValueError(f"{text!r} must be 0 (log only), 1 (block) or 2 (run KILL_RUN_CMD only)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def _ack_trigger(text: str) -> int:
    count = _count(text)
    if count == 1:
        raise ValueError("one late ACK is normal and never bans: 0 (off) or at least 2")
    return count


def _proto_trigger(text: str) -> int:
    count = _count(text)
    if count == 1:
        raise ValueError("one tunnel's protocol (GRE, ESP) is normal and never bans: "
                         "0 (off) or at least 2")
    return count


def _fleet_trigger(text: str) -> int:
    count = _count(text)
    if count == 1:
        raise ValueError("one member's evidence is that member's to judge (SCAN_TRIGGER): "
                         "0 (off) or at least 2 members")
    if count > 64:  # fleet.EVIDENCE_CAP entries a source: more members could never be seen
        raise ValueError("at most 64 members (the evidence kept for a source)")
    return count


def _fleet_window(text: str) -> float:
    seconds = _seconds(text)
    if seconds < 10:  # every member's window trims the source's evidence for all
        raise ValueError(f"{text!r} is shorter than 10 s (use the same window on every member)")
    return seconds


def _seconds(text: str) -> float:
    """`3600`, or with a unit: `20ms`, `90s`, `30m`, `12h`, `7d`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|[smhd]?)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 3600, 30m, 12h, 7d)")
    seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400,
                                 "ms": 0.001}[match[2]]
    if not seconds <= MAX_SECONDS:  # also infinity from 400 nines
        raise ValueError(f"{text!r} is longer than {MAX_SECONDS // 86400} days")
    return seconds


def _by_evidence(text: str) -> tuple:
    """BAN_TIME_BY_EVIDENCE: `single=1h, repeated=1d, handshake=7d` (grades
    not named keep BAN_TIME); empty = off."""
    from .engine import GRADES
    pairs = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        grade, _, duration = item.partition("=")
        if grade not in GRADES or not duration:
            raise ValueError(f"{item!r} is not grade=duration (grades: {', '.join(GRADES)})")
        if grade in dict(pairs):
            raise ValueError(f"{grade} is given twice")
        pairs.append((grade, _seconds(duration)))
    return tuple(pairs)


def _hold_time(text: str) -> float:
    """FIRST_CONTACT_HOLD: `20ms`, `0.05`; 0 = off; at most 1 s (a client
    sends its SYN again after about one second)."""
    seconds = _seconds(text)
    if seconds > 1:
        raise ValueError(f"{text!r} is longer than 1 s (a client would send its SYN again)")
    return seconds


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 1 <= value <= 100:
        raise ValueError(f"{value} must be within 1-100 (1 = no escalation)")
    return value


def _rate(text: str) -> tuple[float, int]:
    """`20/s`, `300/m`, `1000/h` -> (per second, burst); `0` = unlimited."""
    if text.strip() == "0":
        return 0.0, 0
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(s|second|m|minute|h|hour)\s*", text)
    if not match or int(match[1]) == 0:
        raise ValueError(f"{text!r} must be COUNT/s, COUNT/m or COUNT/h (e.g. 20/s), or 0")
    per = {"s": 1, "m": 60, "h": 3600}[match[2][0]]
    return int(match[1]) / per, int(match[1])


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise ValueError(f"{value} must be between 0 and 1 (exclusive)")
    return value


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{text!r} must start with redis:// , rediss:// (TLS) or unix://")
    return text


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} must be ADDRESS:PORT, e.g. 127.0.0.1:9310")
    return host.strip("[]") or "127.0.0.1", int(port)


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        value = _count(text)
        if not low <= value <= high:
            raise ValueError(f"{value} must be within {low}-{high}")
        return value
    return parse


def _advanced_limit(text: str) -> int:
    value = _count(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} must be within 1-65535")
    return value


def _path(text: str) -> Path:
    if not text:
        raise ValueError("path is empty")
    return Path(text)


def _command(text: str) -> str:
    """A command template run as argv, never through a shell."""
    if _SHELL_SYNTAX.search(text):
        raise ValueError(
            "uses shell syntax (| ; & < > ` $( ); commands run without a shell - "
            "put the pipeline in a script and call that")
    try:
        argv = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"cannot be split into arguments: {err}") from None
    if not argv:
        raise ValueError("command is empty")
    return text


def _target_template(text: str) -> str:
    if "$TARGET$" not in text:
        raise ValueError("must contain $TARGET$")
    return text


def _choice(*allowed: str):
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"{text!r} must be one of: {', '.join(allowed)}")
        return text
    return parse


def _optional(parse):
    def wrapped(text: str):
        return None if text == "" else parse(text)
    return wrapped


def _identifier(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}", text):
        raise ValueError(f"{text!r} must be a short name of letters, digits, _ or -")
    return text


def _kill_route(text: str) -> str:
    return _command(_target_template(text))


# KEY -> (attribute, parser)
KEYS = {
    "TCP_PORTS": ("tcp_ports", parse_port_list),
    "UDP_PORTS": ("udp_ports", parse_port_list),
    "ADVANCED_PORTS_TCP": ("advanced_ports_tcp", _advanced_limit),
    "ADVANCED_PORTS_UDP": ("advanced_ports_udp", _advanced_limit),
    "ADVANCED_EXCLUDE_TCP": ("advanced_exclude_tcp", lambda t: frozenset(parse_port_list(t))),
    "ADVANCED_EXCLUDE_UDP": ("advanced_exclude_udp", lambda t: frozenset(parse_port_list(t))),
    "IGNORE_FILE": ("ignore_file", _path),
    "HISTORY_FILE": ("history_file", _path),
    "BLOCKED_FILE": ("blocked_file", _path),
    "RESOLVE_HOST": ("resolve_host", _boolean),
    "BLOCK_TCP": ("block_tcp", _block_level),
    "BLOCK_UDP": ("block_udp", _block_level),
    "KILL_ROUTE": ("kill_route", _optional(_kill_route)),
    "KILL_HOSTS_DENY": ("kill_hosts_deny", _optional(_target_template)),
    "KILL_RUN_CMD": ("kill_run_cmd", _optional(_command)),
    "KILL_RUN_CMD_FIRST": ("kill_run_cmd_first", _boolean),
    "SCAN_TRIGGER": ("scan_trigger", _count),
    "PORT_BANNER": ("port_banner", lambda t: t or None),
    # portsentinel extensions
    "TCP_MODE": ("tcp_mode", _optional(_choice(*TCP_MODES))),
    "UDP_MODE": ("udp_mode", _optional(_choice(*UDP_MODES))),
    "SCAN_WINDOW": ("scan_window", _seconds),
    "ACK_SCAN_TRIGGER": ("ack_scan_trigger", _ack_trigger),
    "ACK_SCAN_WINDOW": ("ack_scan_window", _seconds),
    "PROTO_SCAN_TRIGGER": ("proto_scan_trigger", _proto_trigger),
    "PROTO_SCAN_WINDOW": ("proto_scan_window", _seconds),
    "BAN_TIME": ("ban_time", _seconds),
    "BAN_TIME_BY_EVIDENCE": ("ban_time_by_evidence", _by_evidence),
    "BLOCK_NFTABLES": ("block_nftables", _choice("auto", "0", "1")),
    "KERNEL_TRAP": ("kernel_trap", _choice("auto", "0")),
    "KERNEL_SENSOR": ("kernel_sensor", _choice("auto", "0")),
    "BAN_TIME_INCREMENT": ("ban_time_increment", lambda t: _factor(t)),
    "BAN_TIME_MAX": ("ban_time_max", _seconds),
    "KILL_ROUTE_UNDO": ("kill_route_undo", _optional(_kill_route)),
    "STATE_FILE": ("state_file", _path),
    "CONTROL_SOCKET": ("control_socket", _path),
    "METRICS_ADDRESS": ("metrics_address", _optional(lambda t: _host_port(t))),
    "JSON_LOG": ("json_log", _optional(_path)),
    "DECOY_GRACE": ("decoy_grace", _boolean),
    "PEER_MEMORY": ("peer_memory", _seconds),
    "BAN_RATE_LIMIT": ("ban_rate_limit", lambda t: _rate(t)),
    "SLOW_SCAN_DETECTION": ("slow_scan_detection", _boolean),
    "SLOW_SCAN_FALSE_POSITIVE": ("slow_scan_false_positive", lambda t: _probability(t)),
    "SLOW_SCAN_DETECTION_PROBABILITY": ("slow_scan_detection_probability",
                                        lambda t: _probability(t)),
    "SLOW_SCAN_MEMORY": ("slow_scan_memory", _seconds),
    "FIRST_CONTACT_DELAY": ("first_contact_delay", _boolean),
    "FIRST_CONTACT_HOLD": ("first_contact_hold", lambda t: _hold_time(t)),
    "HOLD_QUEUE": ("hold_queue", _bounded(0, 65535)),
    "HOLD_RATE": ("hold_rate", _bounded(0, 1_000_000)),
    "FLEET_REDIS_URL": ("fleet_redis_url", _optional(lambda t: _redis_url(t))),
    "FLEET_NAME": ("fleet_name", _identifier),
    "FLEET_PREFIX": ("fleet_prefix", _identifier),
    "FLEET_SCAN_TRIGGER": ("fleet_scan_trigger", _fleet_trigger),
    "FLEET_SCAN_WINDOW": ("fleet_scan_window", _fleet_window),
    "NFT_TABLE": ("nft_table", _identifier),
    "BAN_SET_SIZE": ("ban_set_size", _bounded(16, 1 << 24)),
    "NFLOG_GROUP": ("nflog_group", _bounded(0, 65535)),
    "SERVICE_MEMORY": ("service_memory", _seconds),
    "HOSTS_DENY_FILE": ("hosts_deny_file", _path),
    "SYSLOG_IDENT": ("syslog_ident", _identifier),
    "SYSLOG_FACILITY": ("syslog_facility", _choice(
        "daemon", "auth", "authpriv", "security", "user", "local0", "local1", "local2",
        "local3", "local4", "local5", "local6", "local7")),
    "HOST_CAPACITY": ("host_capacity", _bounded(16, 1 << 24)),
}


def _unquote(raw: str, key: str, source: str, number: int) -> str:
    # the value ends at the next quote, as in 1.2: `KEY="v" # "x"` is "v" and a comment
    if len(raw) >= 2 and raw[0] == '"' and raw.find('"', 1) > 0:
        end = raw.find('"', 1)
        rest = raw[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{key}: unexpected text after the closing quote: {rest!r}",
                              source, number)
        return raw[1:end]
    raise ConfigError(f'{key}: value must be in double quotes, e.g. {key}="{raw}"',
                      source, number)


def read_assignments(text: str, source: str) -> list[tuple[str, str, int]]:
    """(KEY, unquoted value, line number) for every assignment, in order."""
    found = []
    # lines end at "\n" only: splitlines() would also split at a form feed and
    # shift every line number after it
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if any("\udc80" <= c <= "\udcff" for c in stripped):  # undecodable bytes
            raise ConfigError("this line is not UTF-8 text", source, number)
        match = _LINE.match(stripped)
        if not match:
            raise ConfigError(f"cannot read this line (expected KEY=\"value\"): {stripped[:60]!r}",
                              source, number)
        key, raw = match[1], match[2]
        found.append((key, _unquote(raw, key, source, number), number))
    return found


def parse(text: str, source: str = EMBEDDED) -> Config:
    config = Config(source=source)
    seen: dict[str, int] = {}
    for key, value, number in read_assignments(text, source):
        if key not in KEYS:
            raise ConfigError(f"unknown key {key}", source, number)
        if key in seen:
            config.warnings.append(
                f"{source}:{number}: {key} repeats line {seen[key]}; the first one is used")
            continue
        seen[key] = number
        attribute, parse_value = KEYS[key]
        try:
            setattr(config, attribute, parse_value(value))
        except ValueError as err:
            raise ConfigError(f"{key}: {err}", source, number) from None
    config.lines = seen
    _check_whole(config)
    return config


def _check_whole(config: Config) -> None:
    if config.fleet_name in ("local", "cli", "kernel", "correlation"):
        raise ConfigError(f"FLEET_NAME: {config.fleet_name!r} is reserved; name this member",
                          config.source, config.lines.get("FLEET_NAME"))
    if config.slow_scan_false_positive >= config.slow_scan_detection_probability:
        config.warnings.append(f"{config.source}: SLOW_SCAN_FALSE_POSITIVE must be below "
                               "SLOW_SCAN_DETECTION_PROBABILITY; slow-scan detection is off")
        config.slow_scan_detection = False
    if config.block_tcp == 2 or config.block_udp == 2:
        if config.kill_run_cmd is None:
            config.warnings.append(f"{config.source}: BLOCK_*=2 runs only KILL_RUN_CMD, "
                                   "which is not set: nothing will be blocked")
    for key in ("KILL_ROUTE", "KILL_RUN_CMD"):
        template = getattr(config, KEYS[key][0])
        if template is None:
            continue
        program = shlex.split(template)[0]
        if not shutil.which(program):
            config.warnings.append(f"{config.source}:{config.lines.get(key)}: {key}: "
                                   f"{program} is not an executable here; blocks will fail")


def where(config: Config, key: str) -> tuple[str, int | None]:
    """(file, line) a key was read from, for error messages."""
    return config.source, config.lines.get(key)


def embedded_text() -> str:
    return resources.files("portsentinel").joinpath("default.conf").read_text()


def load(path: Path | None) -> Config:
    """The file at `path`; when None, PortSentry's own place,
    /etc/portsentry/portsentry.conf, if it exists (a PortSentry user's
    install keeps working unchanged), else the embedded default."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return parse(embedded_text(), EMBEDDED)
        path = DEFAULT_CONFIG
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror}", str(path)) from None
    # bytes that are not UTF-8 (a Latin-1 comment from an old install) are
    # kept as surrogates: harmless in a comment, an error with its line in a value
    return parse(data.decode("utf-8", errors="surrogateescape"), str(path))


def read_modes_file(path: Path | None = None) -> tuple[str | None, str | None]:
    """TCP_MODE / UDP_MODE from Debian's /etc/default/portsentry (a shell file)."""
    path = DEFAULT_MODES_FILE if path is None else path
    modes: dict[str, str | None] = {"TCP_MODE": None, "UDP_MODE": None}
    allowed = {"TCP_MODE": TCP_MODES, "UDP_MODE": UDP_MODES}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read: {err}", str(path)) from None
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.match(line.strip())
        if not match or match[1] not in modes:
            continue
        value = match[2].strip().strip("\"'")
        if value and value not in allowed[match[1]]:
            raise ConfigError(f"{match[1]}: {value!r} must be one of "
                              f"{', '.join(allowed[match[1]])} or empty", str(path), number)
        modes[match[1]] = value or None
    return modes["TCP_MODE"], modes["UDP_MODE"]


def resolve_modes(cli_tcp: str | None, cli_udp: str | None, config: Config,
                  read_default_file: bool) -> tuple[str | None, str | None]:
    """Command line, else TCP_MODE/UDP_MODE in the config, else Debian's
    /etc/default/portsentry (for a config file, given or found), else atcp + audp."""
    if cli_tcp or cli_udp:
        return cli_tcp, cli_udp
    if config.tcp_mode or config.udp_mode:
        return config.tcp_mode, config.udp_mode
    if read_default_file or config.source != EMBEDDED:
        file_tcp, file_udp = read_modes_file()
        if file_tcp or file_udp:
            return file_tcp, file_udp
    return "atcp", "audp"


def duration_text(seconds: float) -> str:
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
