"""PortSentry's block actions and records: hosts.deny, KILL_ROUTE,
KILL_RUN_CMD, the history file and the blocked file.

Commands run as argv lists, never through a shell; `$TARGET$` is only ever
filled with an address the packet parser produced (an `ipaddress` object), and
the exit status is checked. These run in the reporter thread, off the packet
path; the nftables ban (if on) was already applied inline by then.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from . import logs
from .config import command_argv, fill, undo_command

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


class CompatActions:
    """hosts.deny, KILL_ROUTE and KILL_RUN_CMD for one configuration."""

    def __init__(self, config, log: logs.Log):
        self.config, self.log = config, log

    def hosts_deny(self, target: str, port: int, mode: str) -> str:
        line = fill(self.config.kill_hosts_deny, target, port, mode)
        append_line_once(self.config.hosts_deny_file, line)
        self.log(logs.wrappers_line(target, line))
        return line

    def kill_route(self, target: str, port: int, mode: str) -> str:
        template = self.config.kill_route
        run_command(command_argv(template, target, port, mode))
        command = fill(template, target, port, mode)
        self.log(logs.route_line(target, command))
        return command

    def undo(self, target: str, hosts_deny_line: str | None, kill_route_command: str | None,
             port: int, mode: str) -> list[str]:
        """Reverse what a ban did outside nftables; returns problems, if any."""
        problems = []
        if hosts_deny_line and remove_line(self.config.hosts_deny_file, hosts_deny_line):
            self.log(f'adminalert: Host {target} removed from {self.config.hosts_deny_file}: '
                     f'"{hosts_deny_line}"', logs.INFO)
        if kill_route_command:
            undo = (fill(self.config.kill_route_undo, target, port, mode)
                    if self.config.kill_route_undo else undo_command(kill_route_command))
            if undo is None:
                problems.append(f"KILL_ROUTE has no known undo; set KILL_ROUTE_UNDO or "
                                f"reverse by hand: {kill_route_command}")
            else:
                try:
                    run_command(command_argv(undo, target, port, mode))
                    self.log(f'adminalert: Host {target} route removed using command: "{undo}"',
                             logs.INFO)
                except ActionFailed as err:
                    problems.append(f'undo "{undo}" failed: {err}')
        return problems

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

    def blocked(self, epoch: float, target: str, name: str | None, port: int,
                protocol: str, mode: str) -> None:
        line = logs.history_line(epoch, target, name, port, protocol)
        for path in (self.history_file, self.blocked_file.with_name(f"{self.blocked_file.name}.{mode}")):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write(line + "\n")
            except OSError as err:  # a full disk must not stop blocking
                self.log.error(f"adminalert: ERROR: cannot write {path}: {err.strerror}")
