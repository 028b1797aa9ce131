"""Configuration into what the daemon runs: the engine's policy, the sensors
and their trap ports, the kernel trap's rules. Start and reload share it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .. import logs
from ..addrset import AddressSet
from ..command_templates import kill_route_for, undo_command
from ..config import Config, duration_text
from ..engine import TCP, UDP, Policy
from ..nflog import KernelBanLog
from ..listeners import local_port_range
from ..ruleset import (ACK_PREFIX, CONTACT_PREFIX, HIT_PREFIX, LOG_PREFIX, PEER_HIT_PREFIX,
                       PORT_SCAN_PREFIX, PROTO_PREFIX, SERVED_PREFIX, TRANSPORT_PREFIX, TRANSPORTS,
                       UNREPORTED_PREFIX,
                       KernelTrap, port_ranges)
from ..sensors import ChallengeSensor, ListenSensor, PacketSensor, TrapPorts
from ..trw import TrwParameters

# DHCP (68) and DHCPv6 (546) clients: answers to this host's own broadcast and
# multicast queries, which connection tracking cannot pair with the query
ANSWERS_TO_BROADCASTS = frozenset({68, 546})
RECONCILE_EVERY = 30.0  # the kernel sets against the state (firewall.py)


def trw_for(config: Config) -> TrwParameters | None:
    if not config.slow_scan_detection:
        return None
    return TrwParameters(p_detect=config.slow_scan_detection_probability,
                         p_false=config.slow_scan_false_positive, memory=config.slow_scan_memory)


def policy_for(config: Config, never_block: AddressSet) -> Policy:
    return Policy(
        scan_trigger=config.scan_trigger, scan_window=config.scan_window,
        block_tcp=config.block_tcp, block_udp=config.block_udp,
        nftables=config.nftables, hosts_deny=config.kill_hosts_deny is not None,
        kill_route=config.kill_route is not None, run_cmd=config.kill_run_cmd is not None,
        run_cmd_first=config.kill_run_cmd_first, ban_time=config.ban_time,
        ban_time_by_evidence=dict(config.ban_time_by_evidence),
        ban_time_increment=config.ban_time_increment, ban_time_max=config.ban_time_max,
        host_capacity=config.host_capacity, never_block=never_block,
        decoy_grace=config.decoy_grace, ban_rate=config.ban_rate_limit[0],
        ban_burst=max(1, config.ban_rate_limit[1]),
        ack_scan_trigger=config.ack_scan_trigger, ack_scan_window=config.ack_scan_window,
        proto_scan_trigger=config.proto_scan_trigger, proto_scan_window=config.proto_scan_window)


def kernel_trap_armed(config: Config, protocol: str, mode: str | None) -> bool:
    """The in-kernel trap does exactly what the engine would: ban on the
    first probe to a stealth/advanced trap port, into the nftables set."""
    level = config.block_tcp if protocol == TCP else config.block_udp
    return (config.kernel_trap == "auto" and config.nftables and config.scan_trigger <= 1
            and level == 1 and mode is not None and mode[0] in "sa")


@dataclass
class Armed:
    """What a configuration runs: its sensors, and the kernel trap to install."""

    sensors: list = field(default_factory=list)
    kernel_trap: KernelTrap | None = None
    trapped: tuple[str, ...] = ()  # protocols the kernel trap bans by itself
    sensed: bool = False  # the kernel logs what userspace must see (no AF_PACKET sensor)


def open_sensors(config: Config, modes: dict, served, host_addresses, slow_scans: bool,
                 log: logs.Log) -> Armed:
    """The sensors for `modes` (PortSentry's lines said as they open) and the
    kernel trap over the same ports. `served(protocol)`: ports in use now."""
    armed, stealth = Armed(), {}
    for protocol, mode in modes.items():
        if mode in ("tcp", "udp"):
            armed.sensors += _bound_traps(config, protocol, log)
        elif mode is not None:
            stealth[protocol] = _stealth_traps(config, protocol, mode, served, log)
    if config.nftables:
        _kernel_trap(config, modes, stealth, armed, log, slow_scans)
    if stealth and not armed.sensed:  # no nftables table, or no NFLOG group for us
        armed.sensors.append(PacketSensor(stealth, AddressSet(host_addresses),
                                          tcp_contacts=slow_scans))
    return armed


def _bound_traps(config: Config, protocol: str, log: logs.Log) -> list:
    sensors = []
    for port in config.tcp_ports if protocol == TCP else config.udp_ports:
        try:
            sensors.append(ListenSensor(protocol, port, config.port_banner))
            log(f"adminalert: Going into listen mode on {protocol.upper()} port: {port}",
                logs.INFO)
        except OSError:
            log.error(f"adminalert: ERROR: could not bind {protocol.upper()} socket: "
                      f"{port}. Attempting to continue")
    return sensors


def _stealth_traps(config: Config, protocol: str, mode: str, served, log) -> TrapPorts:
    name = protocol.upper()
    if mode.startswith("s"):
        ports = config.tcp_ports if protocol == TCP else config.udp_ports
        for port in ports:
            log(f"adminalert: Going into stealth listen mode on {name} port: {port}", logs.INFO)
        return TrapPorts(mode, frozenset(ports))
    limit = config.advanced_ports_tcp if protocol == TCP else config.advanced_ports_udp
    exclude = (config.advanced_exclude_tcp if protocol == TCP
               else config.advanced_exclude_udp | ANSWERS_TO_BROADCASTS)
    log(f"adminalert: Advanced mode will monitor first {limit} ports", logs.INFO)
    for port in sorted(exclude):
        log(f"adminalert: Advanced mode will manually exclude port: {port}", logs.INFO)
    for port in sorted(p for p in served(protocol) if p < limit):
        log(f"adminalert: Advanced Stealth scan detection mode activated. "
            f"Ignored {name} port: {port}", logs.INFO)
    return TrapPorts(mode, advanced_limit=limit, exclude=exclude)


def _kernel_trap(config: Config, modes: dict, stealth: dict, armed: Armed, log,
                 slow_scans: bool) -> None:
    """The kernel trap's rules (installed by the firewall room), with the
    challenge sensor for peers and the NFLOG sensor for what the kernel
    reports: its bans and, as the sensor, what userspace must judge."""
    ports = {p: port_ranges(t.all_ports()) for p, t in stealth.items()}
    armed.trapped = tuple(p for p in stealth if kernel_trap_armed(config, p, modes[p]))
    challenge = 0
    if config.decoy_grace and TCP in stealth:
        sensor = ChallengeSensor()
        armed.sensors.append(sensor)
        challenge = sensor.port
    sensing = bool(stealth) and config.kernel_sensor == "auto"
    log_group = _kernel_log(config, armed, log, sensing) if armed.trapped or sensing else 0
    armed.sensed = sensing and bool(log_group)
    armed.kernel_trap = KernelTrap(
        ports.get(TCP, ()), ports.get(UDP, ()),
        config.peer_memory if config.decoy_grace else 0, config.ban_rate_limit,
        ban_tcp=TCP in armed.trapped, ban_udp=UDP in armed.trapped, challenge_port=challenge,
        first_contact_delay=config.first_contact_delay, log_group=log_group,
        sensor=armed.sensed, contacts=armed.sensed and slow_scans and TCP in stealth,
        hold_queue=config.hold_queue if holds(config, armed.trapped) else 0,
        hold_rate=config.hold_rate, hold_seconds=config.first_contact_hold,
        service_memory=config.service_memory,
        ack_window=config.ack_scan_window if armed.sensed and config.ack_scan_trigger else 0,
        ack_trigger=config.ack_scan_trigger, transports=TRANSPORTS,
        local_ports=local_port_range(),
        proto_window=config.proto_scan_window if armed.sensed and config.proto_scan_trigger else 0,
        proto_trigger=config.proto_scan_trigger)


def holds(config: Config, trapped) -> bool:
    """FIRST_CONTACT_HOLD applies where the kernel trap bans TCP (a scan's
    trap hit must ban within the hold); FIRST_CONTACT_DELAY, if set, instead."""
    return (config.first_contact_hold > 0 and config.hold_queue > 0
            and not config.first_contact_delay and TCP in trapped)


def _kernel_log(config: Config, armed: Armed, log, sensing: bool) -> int:
    """Subscribe to the kernel trap's NFLOG group; the group, or 0 if not."""
    group = config.nflog_group
    if not group:
        return 0
    prefixes = {LOG_PREFIX: "ban"}
    if sensing:
        prefixes |= {HIT_PREFIX: "hit", PEER_HIT_PREFIX: "peer hit", CONTACT_PREFIX: "contact",
                     SERVED_PREFIX: "served", ACK_PREFIX: "ack", PROTO_PREFIX: "proto",
                     TRANSPORT_PREFIX: "transport", PORT_SCAN_PREFIX: "port scan",
                     UNREPORTED_PREFIX: "unreported"}
    try:
        armed.sensors.append(KernelBanLog(group, LOG_PREFIX, prefixes))
    except OSError as err:
        log.error(f"adminalert: ERROR: cannot receive the kernel's bans ({err}); they "
                  f"are found by reconciliation every {RECONCILE_EVERY:.0f} s instead")
        return 0
    return group


def changes_from_12(config: Config, tcp: str | None, udp: str | None) -> list[str]:
    """What portsentinel will do differently from PortSentry 1.2 with this
    config, in a few short lines (for check-config)."""
    lines = []
    logged_only = [f"BLOCK_{p}" for p, level in (("TCP", config.block_tcp),
                                                 ("UDP", config.block_udp)) if level == 0]
    if logged_only:
        lines.append(f"{'/'.join(logged_only)}=0: those scans are only logged, and (unlike 1.2) "
                     "the host is not recorded as blocked")
    lines.append(_firewall_line(config, tcp, udp))
    lines.append(_first_contact_line(config, tcp))
    lines.append(_ipv6_line(config))
    lines.append(_expiry_line(config))
    lines.append("never blocked: this host, its gateways and resolvers, and the ignore files"
                 + (" (IGNORE_FILE and IGNORE_FILE.static)" if config.ignore_file else "")
                 + ("; a host that completed a handshake lately is not banned on spoofable "
                    "probes (DECOY_GRACE)" if config.decoy_grace else ""))
    return lines


def _firewall_line(config: Config, tcp: str | None, udp: str | None) -> str:
    trapped = [p for p, mode in ((TCP, tcp), (UDP, udp)) if kernel_trap_armed(config, p, mode)]
    if config.nftables:
        first = "nftables set" + (f" + kernel trap ({', '.join(trapped)}: the first probe "
                                  "is banned in the kernel)" if trapped else "")
        return f"firewall: {first} first" + (
            "; KILL_ROUTE also runs, off the packet path" if config.kill_route else "")
    if config.kill_route:
        return ("firewall: KILL_ROUTE only, as in 1.2 (BLOCK_NFTABLES=0): a fork per ban, "
                "no kernel trap")
    return "firewall: none (BLOCK_NFTABLES=0 and no KILL_ROUTE)"


def _first_contact_line(config: Config, tcp: str | None) -> str:
    if holds(config, [TCP] if kernel_trap_armed(config, TCP, tcp) else []):
        return (f"first contact: a stranger's first SYN to a served port waits "
                f"{duration_text(config.first_contact_hold)} for the scan to show itself "
                "(FIRST_CONTACT_HOLD), so a scan that probes a real port first learns nothing")
    if config.first_contact_delay:
        return ("first contact: a stranger's first SYN to a served port is dropped once "
                "(FIRST_CONTACT_DELAY): new clients wait about a second")
    why = ("FIRST_CONTACT_HOLD=0" if not config.first_contact_hold or not config.hold_queue
           else "it needs the kernel trap for TCP")
    return (f"first contact: not held ({why}): a scan may learn a real port it probes "
            "before any trap port")


def _ipv6_line(config: Config) -> str:
    ipv6 = "IPv6: watched" + (" and banned in the nftables set" if config.nftables else "")
    for version in (4, 6) if config.kill_route else ():
        template = kill_route_for(config.kill_route, version)
        if template is None:
            ipv6 += (f"; KILL_ROUTE takes IPv{10 - version} only: not run for IPv{version} "
                     "sources" + ("" if config.nftables else
                                  f", so IPv{version} sources are NOT blocked"))
        elif template != config.kill_route:
            program = shlex.split(template)[0]
            ipv6 += (f"; KILL_ROUTE runs as {program} for IPv{version} sources "
                     f"({program.rsplit('/', 1)[-1]} derived)")
    return ipv6


def _expiry_line(config: Config) -> str:
    undone = ["the nftables ban"] if config.nftables else []
    if config.kill_route and (config.kill_route_undo or undo_command(config.kill_route)):
        undone.append("KILL_ROUTE")
    if config.kill_hosts_deny:
        undone.append("hosts.deny")
    undo = " and ".join(filter(None, [", ".join(undone[:-1]), undone[-1]])) if undone else ""
    if config.ban_time > 0:
        expiry = (f"bans expire after {duration_text(config.ban_time)} (BAN_TIME"
                  + (f"; repeat offenders longer, up to {duration_text(config.ban_time_max)}"
                     if config.ban_time_increment > 1 else "") + ")"
                  + (f"; expiry and `portsentinel unblock` undo {undo}" if undo else ""))
    else:
        expiry = ("bans never expire (BAN_TIME=0)"
                  + (f"; `portsentinel unblock` undoes {undo}" if undo else ""))
    if config.kill_route and "KILL_ROUTE" not in undone:
        expiry += " (KILL_ROUTE has no known undo: set KILL_ROUTE_UNDO)"
    if config.ban_time_by_evidence:
        expiry += "; by evidence (BAN_TIME_BY_EVIDENCE): " + ", ".join(
            f"{grade} {duration_text(seconds) if seconds else 'forever'}"
            for grade, seconds in config.ban_time_by_evidence)
    return expiry
