"""A throw-away network of namespaces for end-to-end tests and benchmarks.

    target 198.51.100.1 / 2001:db8::1
    attacker 198.51.100.2 / 2001:db8::2 (plus .10-.39 / ::10-::39 as extra sources)
    client 198.51.100.3 / 2001:db8::3

all joined by a bridge in a fourth namespace. Traffic never leaves these
namespaces. Every process started here is tracked and killed by PID, and the
namespaces are deleted on close.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NET4, NET6 = "198.51.100", "2001:db8:"
TARGET4, ATTACKER4, CLIENT4 = f"{NET4}.1", f"{NET4}.2", f"{NET4}.3"
TARGET6, ATTACKER6, CLIENT6 = "2001:db8::1", "2001:db8::2", "2001:db8::3"
# more targets for fleet tests: target2 .4 / ::4, target3 .5 / ::5; a hub address
# on the bridge itself (in the lan namespace) for shared services such as Redis
MORE_TARGETS = {"target2": ("198.51.100.4", "2001:db8::4"), "target3": ("198.51.100.5", "2001:db8::5"),
                "target4": ("198.51.100.6", "2001:db8::6"), "target5": ("198.51.100.7", "2001:db8::7")}
HUB4 = f"{NET4}.250"
EXTRA_SOURCES = range(10, 40)  # the client adds .40 and up


def extra4(i: int) -> str:
    return f"{NET4}.{i}"


def extra6(i: int) -> str:
    return f"2001:db8::{i:x}"


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


class Lab:
    def __init__(self, tag: str | None = None, targets: int = 1):
        tag = tag or f"{os.getpid() % 100000}"
        self.ns = {role: f"ps{tag}{role[0]}" for role in ("target", "attacker", "client", "lan")}
        self.more = list(MORE_TARGETS)[:targets - 1]
        for role in self.more:
            self.ns[role] = f"ps{tag}t{role[-1]}"
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []

    # -- building ---------------------------------------------------------
    def up(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
            self.created.append(name)
            self.ip(name, "link", "set", "lo", "up")
        lan = self.ns["lan"]
        self.ip(lan, "link", "add", "br0", "type", "bridge")
        self.ip(lan, "link", "set", "br0", "up")
        self.ip(lan, "addr", "add", f"{HUB4}/24", "dev", "br0")
        hosts = {"target": ([TARGET4], [TARGET6]),
                 "attacker": ([ATTACKER4, *map(extra4, EXTRA_SOURCES)],
                              [ATTACKER6, *map(extra6, EXTRA_SOURCES)]),
                 "client": ([CLIENT4], [CLIENT6])}
        hosts.update({role: ([MORE_TARGETS[role][0]], [MORE_TARGETS[role][1]])
                      for role in self.more})
        for role, (v4, v6) in hosts.items():
            ns = self.ns[role]
            self.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
            self.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
            peer = f"v{role[0]}{role[-1] if role in self.more else ''}"
            self.ip(lan, "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
            self.ip(lan, "link", "set", peer, "master", "br0", "up")
            for address in v4:
                self.ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
            for address in v6:
                self.ip(ns, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
            self.ip(ns, "link", "set", "eth0", "up")
        self.wait_reachable()

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """A refused TCP connect to the target proves the path works both ways."""
        deadline = time.monotonic() + timeout
        probe = ("import socket,sys\ns=socket.create_connection((sys.argv[1], 9), 1)")
        for address in (TARGET4, TARGET6):
            while "ConnectionRefusedError" not in sh(
                    "ip", "netns", "exec", self.ns["client"], sys.executable, "-c", probe,
                    address, check=False).stderr:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{address} unreachable in the lab")
                time.sleep(0.1)

    def ip(self, ns: str, *args: str) -> None:
        sh("ip", "-n", ns, *args)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")

    # -- running ----------------------------------------------------------
    def exec(self, role: str, *argv: str, check: bool = False, timeout: float = 120,
             **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[role], *argv, check=check,
                  timeout=timeout, **kw)

    def start(self, role: str, *argv: str, stdout=None, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *argv],
                                stdout=stdout or subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
             timeout: float = 10.0) -> int | None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                self.stop(proc, timeout=5)
            except Exception:
                pass
        self.procs.clear()
        for name in reversed(self.created):
            self._kill_members(name)  # e.g. daemons that forked away from us
            sh("ip", "netns", "del", name, check=False)
        self.created.clear()

    @staticmethod
    def _kill_members(name: str) -> None:
        """Kill, by PID, every process still inside the namespace `name`."""
        kill_by_pid(lambda: [int(p) for p in sh("ip", "netns", "pids", name,
                                                 check=False).stdout.split()])

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()


def kill_by_pid(members) -> None:
    """SIGTERM, then SIGKILL, every process `members()` lists (by PID, never by name)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = members()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(0.5)


def wait_for_line(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
        time.sleep(0.05)
    content = path.read_text(errors="replace") if path.exists() else "<no file>"
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{content[-3000:]}")
