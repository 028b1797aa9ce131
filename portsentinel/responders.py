"""PortSentry's block actions and records: hosts.deny, KILL_ROUTE,
KILL_RUN_CMD, the history file and the blocked file.

Commands run as argv lists, never through a shell; `$TARGET$` is only ever
filled with an address the packet parser produced (an `ipaddress` object), and
the exit status is checked. These run in the reporter thread, off the packet
path; the nftables ban (if on) was already applied inline by then.

KILL_ROUTE is never run with an address of the wrong family: 1.2's commands
only ever saw IPv4. For an IPv6 source an `iptables` command runs as the
`ip6tables` next to it; a command that cannot take IPv6 is skipped (said
once in the log), the source being banned in the nftables set.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import subprocess
from pathlib import Path

from . import logs
from .command_templates import IPTABLES_PROGRAM, command_argv, fill, kill_route_for, undo_command

COMMAND_TIMEOUT = 30.0


class ActionFailed(Exception):
    pass


def append_line_once(path: Path, line: str) -> bool:
    """Append `line` unless the file already has it; False when it did.

    One locked O_APPEND write, so readers never see half a line and two
    writers cannot both append the same line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, "rb", closefd=False) as existing:
            content = existing.read()
        if line.encode() in content.splitlines():
            return False
        prefix = b"\n" if content and not content.endswith(b"\n") else b""
        os.write(fd, prefix + line.encode() + b"\n")
        return True
    finally:
        os.close(fd)


def remove_line(path: Path, line: str) -> bool:
    """Remove every copy of `line`; False if absent. The file is rewritten in
    place under the same lock as appends (the systemd unit lets us write
    /etc/hosts.deny itself, not create files next to it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, "rb", closefd=False) as f:
            lines = f.read().splitlines(keepends=True)
        kept = [l for l in lines if l.rstrip(b"\r\n") != line.encode()]
        if len(kept) == len(lines):
            return False
        data = b"".join(kept)
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        return True
    finally:
        os.close(fd)


def run_command(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError:
        raise ActionFailed(f"command not found: {argv[0]}") from None
    except PermissionError:
        raise ActionFailed(f"command not executable: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ActionFailed(f"command timed out after {COMMAND_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode(errors="replace").strip()[:200]
        raise ActionFailed(f"exit status {done.returncode}" + (f": {detail}" if detail else ""))


def _already_undone(argv: list[str], error: ActionFailed) -> bool:
    """Did an undo fail only because what it removes is gone already (e.g.
    the admin ran the tutorial's `iptables -D` by hand first)?"""
    program = argv[0].rsplit("/", 1)[-1]
    if IPTABLES_PROGRAM.match(program) and "-D" in argv:
        check = [a if a != "-D" else "-C" for a in argv]
        try:
            done = subprocess.run(check, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 1  # -C: 1 = no such rule
    return program in ("route", "ip") and "No such process" in str(error)


class CompatActions:
    """hosts.deny, KILL_ROUTE and KILL_RUN_CMD for one configuration."""

    def __init__(self, config, log: logs.Log):
        self.config, self.log = config, log
        # KILL_ROUTE per address family (None: that family is not given to it)
        self.routes = {v: kill_route_for(config.kill_route, v) if config.kill_route else None
                       for v in (4, 6)}
        self._said: set[int] = set()

    def hosts_deny(self, target: str, port: int, mode: str) -> str:
        template = self.config.kill_hosts_deny
        # hosts_access(5) wants IPv6 addresses in brackets ("ALL: [2001:db8::2] : DENY")
        value = f"[{target}]" if ":" in target and "[$TARGET$]" not in template else target
        line = fill(template, value, port, mode)
        append_line_once(self.config.hosts_deny_file, line)
        self.log(logs.wrappers_line(target, line))
        return line

    def kill_route(self, target: str, port: int, mode: str) -> str | None:
        """Run KILL_ROUTE for `target`; the command really run, or None when it
        cannot take this address family (and the nftables set bans it)."""
        version = ipaddress.ip_address(target).version
        template = self.routes[version]
        if template is None:
            self._say_once(version, None)
            if not self.config.nftables:  # nothing else bans it: not blocked
                raise ActionFailed(f"KILL_ROUTE takes IPv{10 - version} addresses only; "
                                   f"not run for {target}")
            return None
        if template != self.config.kill_route:
            self._say_once(version, template)
        run_command(command_argv(template, target, port, mode))
        command = fill(template, target, port, mode)
        self.log(logs.route_line(target, command))
        return command

    def _say_once(self, version: int, template: str | None) -> None:
        if version in self._said:
            return
        self._said.add(version)
        if template is not None:
            self.log(f'adminalert: KILL_ROUTE for IPv{version} sources runs as "{template}" '
                     f'(derived from "{self.config.kill_route}")', logs.INFO)
        elif self.config.nftables:
            self.log(f'adminalert: KILL_ROUTE "{self.config.kill_route}" takes IPv{10 - version} '
                     f"addresses only: it is not run for IPv{version} sources, which are banned "
                     "in the nftables set (said once)", logs.NOTICE)
        else:
            self.log.error(f'adminalert: ERROR: KILL_ROUTE "{self.config.kill_route}" takes '
                           f"IPv{10 - version} addresses only and BLOCK_NFTABLES=0: IPv{version} "
                           "sources are not blocked (said once)")

    def undo(self, target: str, hosts_deny_line: str | None, kill_route_command: str | None,
             port: int, mode: str, hosts_deny_file: str | None = None,
             kill_route_undo: str | None = None) -> list[str]:
        """Reverse what a ban did outside nftables; returns problems, if any.
        `hosts_deny_file` and `kill_route_undo` are as they were at ban time
        (a reload may have changed the config since); older records have none."""
        problems = []
        deny_file = Path(hosts_deny_file) if hosts_deny_file else self.config.hosts_deny_file
        if hosts_deny_line and remove_line(deny_file, hosts_deny_line):
            self.log(f'adminalert: Host {target} removed from {deny_file}: '
                     f'"{hosts_deny_line}"', logs.INFO)
        if kill_route_command:
            undo = kill_route_undo or self.undo_for(target, kill_route_command, port, mode)
            if undo is None:
                problems.append(f"KILL_ROUTE has no known undo; set KILL_ROUTE_UNDO or "
                                f"reverse by hand: {kill_route_command}")
            else:
                argv = command_argv(undo, target, port, mode)
                try:
                    run_command(argv)
                    self.log(f'adminalert: Host {target} route removed using command: "{undo}"',
                             logs.INFO)
                except ActionFailed as err:
                    if _already_undone(argv, err):
                        self.log(f'adminalert: Host {target} route was already removed: '
                                 f'"{kill_route_command}"', logs.INFO)
                    else:
                        problems.append(f'undo "{undo}" failed: {err}')
        return problems

    def undo_for(self, target: str, kill_route_command: str, port: int, mode: str) -> str | None:
        """The undo of the command that was really run (e.g. the ip6tables one)."""
        if not self.config.kill_route_undo:
            return undo_command(kill_route_command)
        # the same family mapping as KILL_ROUTE got (iptables -> ip6tables for IPv6)
        template = kill_route_for(self.config.kill_route_undo, ipaddress.ip_address(target).version)
        return None if template is None else fill(template, target, port, mode)

    def run_cmd(self, target: str, port: int, mode: str) -> str:
        template = self.config.kill_run_cmd
        run_command(command_argv(template, target, port, mode))
        command = fill(template, target, port, mode)
        self.log(logs.run_cmd_line(target, command))
        return command


class Records:
    """The history file (every block, forever) and `<BLOCKED_FILE>.<mode>`."""

    def __init__(self, history_file: Path, blocked_file: Path, log: logs.Log):
        self.history_file, self.blocked_file, self.log = history_file, blocked_file, log
        self._made: set[Path] = set()  # folders known to exist
        self._per_mode: dict[str, Path] = {}  # mode -> its blocked file
        self._job = logs.Held()  # path -> lines, while this thread's job holds them

    def blocked(self, epoch: float, target: str, name: str | None, port: int,
                protocol: str, mode: str) -> None:
        line = (logs.history_line(epoch, target, name, port, protocol) + "\n").encode()
        blocked = self._per_mode.get(mode)
        if blocked is None:
            blocked = self._per_mode[mode] = self.blocked_file.with_name(
                f"{self.blocked_file.name}.{mode}")
        lines = self._job.lines
        for path in (self.history_file, blocked):
            if lines is not None:
                lines.setdefault(path, []).append(line)
            else:
                self._write(path, line)

    def grouped(self):
        """This thread's lines until the end, one write a file then (a kernel
        log batch's bans: an open/write/close per line was the worker's
        biggest cost under a flood)."""
        return logs.holding(self._job, {}, self._write_held)

    def _write_held(self, lines: dict[Path, list[bytes]]) -> None:
        for path, group in lines.items():
            self._write(path, b"".join(group))

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self._append(path, data)
        except OSError as err:  # a full disk must not stop blocking
            self._made.discard(path.parent)
            self.log.error(f"adminalert: ERROR: cannot write {path}: {err.strerror}")

    def _append(self, path: Path, line: bytes) -> None:
        """One O_APPEND write, opened each time (logrotate may move the file)."""
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
