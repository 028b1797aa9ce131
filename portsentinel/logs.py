"""PortSentry 1.2's log lines, word for word, and where they go.

The format functions are pure so the wording is tested exactly; `Log` sends
lines to syslog (ident `portsentry` by default) and/or stdout, at a priority
that fits the message (1.2 used one priority for everything).
"""

from __future__ import annotations

import os
import syslog
import threading
import time
from contextlib import contextmanager

from .addrset import text as address_text
from .engine import FIN, SYN, ACK, PSH, URG, RST, TRANSPORTS, Kind, Probe

_SCAN_NAMES = {
    Kind.SYN: "TCP SYN/Normal scan",
    Kind.FIN: "TCP FIN scan",
    Kind.NULL: " TCP NULL scan",  # 1.2 prints two spaces here; filters may rely on it
    Kind.XMAS: "TCP XMAS scan",
    Kind.ACK: "TCP ACK scan",
    Kind.PROTOCOL: "IP protocol scan",
    Kind.UDP: "UDP scan",
    Kind.FRAGMENT: "TCP fragmented scan",
}


def host_label(probe_source: str, name: str | None) -> str:
    """`name/IP` as 1.2 writes it (the IP twice when names are not resolved)."""
    return f"{name or probe_source}/{probe_source}"


def _flag(flags: int, bit: int) -> int:
    return 1 if flags & bit else 0


# (protocol, SCTP chunk type or DCCP packet type) -> the scan's name
_TRANSPORT_SCANS = {("sctp", 1): "SCTP INIT scan", ("sctp", 10): "SCTP COOKIE-ECHO scan",
                    ("dccp", 0): "DCCP Request scan"}
TRANSPORT_LABELS = {name: label for name, (_, label) in TRANSPORTS.items()}


def scan_name(probe: Probe) -> str:
    if probe.kind is Kind.TRANSPORT:
        label = TRANSPORT_LABELS.get(probe.protocol, probe.protocol.upper())
        return _TRANSPORT_SCANS.get((probe.protocol, probe.flags), f"{label} scan")
    if probe.kind is Kind.OTHER:
        f = probe.flags
        return (f"Unknown Type: TCP Packet Flags: SYN: {_flag(f, SYN)} FIN: {_flag(f, FIN)} "
                f"ACK: {_flag(f, ACK)} PSH: {_flag(f, PSH)} URG: {_flag(f, URG)} "
                f"RST: {_flag(f, RST)}")
    return _SCAN_NAMES[probe.kind]


def alert_line(probe: Probe, name: str | None = None, source: str | None = None) -> str:
    """`source`: the source's text, when the caller has it already."""
    host = host_label(source or address_text(probe.source), name)
    proto = TRANSPORT_LABELS.get(probe.protocol) or probe.protocol.upper()
    if probe.kind is Kind.CONNECT:
        return f"attackalert: Connect from host: {host} to {proto} port: {probe.port}"
    if probe.kind is Kind.PROTOCOL:
        return f"attackalert: {scan_name(probe)} from host: {host} to IP protocol: {probe.port}"
    return f"attackalert: {scan_name(probe)} from host: {host} to {proto} port: {probe.port}"


def ip_options_line(probe: Probe, name: str | None = None) -> str:
    to = (f"IP protocol: {probe.port}" if probe.kind is Kind.PROTOCOL
          else f"{probe.protocol.upper()} port: {probe.port}")
    return (f"attackalert: Packet from host: {host_label(address_text(probe.source), name)} to "
            f"{to} has IP options set (detection avoidance technique).")


def wrappers_line(target: str, line: str) -> str:
    return f'attackalert: Host {target} has been blocked via wrappers with string: "{line}"'


def route_line(target: str, command: str) -> str:
    return f'attackalert: Host {target} has been blocked via dropped route using command: "{command}"'


def run_cmd_line(target: str, command: str) -> str:
    return f'attackalert: External command run for host: {target} using command: "{command}"'


def already_blocked_line(target: str) -> str:
    return f"attackalert: Host: {target} is already blocked. Ignoring"


def ignoring_response_line(protocol: str) -> str:
    return f"attackalert: Ignoring {protocol.upper()} response per configuration file setting."


def could_not_block_line(target: str) -> str:
    return f"attackalert: ERROR: Could not block host {target} !!"


def history_line(epoch: float, target: str, name: str | None, port: int, protocol: str) -> str:
    """`942286729 - 11/10/1999 20:18:49 Host: 192.0.2.12/192.0.2.12 Port: 111 TCP Blocked`"""
    stamp = _stamp("%m/%d/%Y %H:%M:%S", int(epoch))
    return (f"{int(epoch)} - {stamp} Host: {host_label(target, name)} "
            f"Port: {port} {TRANSPORT_LABELS.get(protocol) or protocol.upper()} Blocked")


_stamps: dict[str, tuple[int, str]] = {}  # format -> (second, its text): a flood's lines


def _stamp(form: str, second: int) -> str:
    """Local time of `second` in `form`, worked out once a second."""
    cached = _stamps.get(form)
    if cached is not None and cached[0] == second:
        return cached[1]
    text = time.strftime(form, time.localtime(second))
    _stamps[form] = (second, text)
    return text


class Held(threading.local):
    """A thread's lines held back until the end of a job (`holding`)."""

    lines = None


@contextmanager
def holding(held: Held, empty, release):
    """Hold this thread's lines in `held.lines` (first `empty`) until the
    end, then `release(lines)`; a hold within a hold is the outer one's."""
    if held.lines is not None:
        yield
        return
    held.lines = empty
    try:
        yield
    finally:
        lines, held.lines = held.lines, None
        release(lines)


FACILITIES = {name: getattr(syslog, f"LOG_{name.upper()}") for name in (
    "daemon", "auth", "authpriv", "user", "local0", "local1", "local2", "local3",
    "local4", "local5", "local6", "local7")}
FACILITIES["security"] = syslog.LOG_AUTH

NOTICE, INFO, WARNING, ERROR = syslog.LOG_NOTICE, syslog.LOG_INFO, syslog.LOG_WARNING, syslog.LOG_ERR


class Log:
    """Thread-safe sink for the classic lines: syslog and/or stdout."""

    def __init__(self, ident: str = "portsentry", facility: str = "daemon",
                 to_syslog: bool = True, stream=None):
        self.to_syslog = to_syslog
        self.stream = stream
        self.ident = ident
        self._lock = threading.Lock()
        self._job = Held()  # this thread's stream lines, while held
        if to_syslog:
            syslog.openlog(ident, syslog.LOG_PID, FACILITIES[facility])

    def __call__(self, message: str, priority: int = NOTICE) -> None:
        if self.to_syslog:
            syslog.syslog(priority, message)
        if self.stream is not None:
            stamp = _stamp("%b %d %H:%M:%S", int(time.time()))
            line = f"{stamp} {self.ident}[{os.getpid()}]: {message}\n"
            held = self._job.lines
            if held is not None:
                held.append(line)
                return
            with self._lock:
                self.stream.write(line)
                self.stream.flush()

    def grouped(self):
        """This thread's stream lines until the end, written and flushed
        together then (syslog lines go at once: each is its own message)."""
        return holding(self._job, [], self._write_held)

    def _write_held(self, lines: list[str]) -> None:
        if lines:
            with self._lock:
                self.stream.write("".join(lines))
                self.stream.flush()

    def error(self, message: str) -> None:
        self(message, ERROR)



class LineBudget:
    """An overall limit on repeat lines (a token bucket, clock given): the
    engine limits "already blocked" lines per host, this limits them for all
    hosts together, so ten thousand banned hosts probing cannot flood syslog.
    What it holds back is counted for a one-line summary."""

    def __init__(self, per_second: float, burst: int):
        self.rate, self.burst = per_second, float(burst)
        self.tokens, self.at, self.held = float(burst), None, 0

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.held += 1
        return False

    def summary(self) -> str | None:
        """The line for what was held back since the last call, if anything."""
        if not self.held:
            return None
        held, self.held = self.held, 0
        return (f"attackalert: {held} more probes from blocked hosts were not logged "
                "(repeat lines are limited to "
                f"{self.rate:g}/s overall)")
