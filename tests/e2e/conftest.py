"""End-to-end fixtures: a namespace lab with real services, the real daemon
in the target namespace, real nmap in the attacker namespace."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import netlab  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
PORTSENTINEL = Path(sys.executable).with_name("portsentinel")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    missing = [t for t in ("nmap", "nft", "iptables", "ip") if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing tools: {missing}; run scripts/test.sh")


@pytest.fixture(scope="session")
def lab():
    _require()
    with netlab.Lab() as lab:
        services = lab.start("target", sys.executable, str(TESTS / "services.py"), "1800",
                             stdout=subprocess.PIPE)
        assert services.stdout.readline().strip() == b"ready"
        yield lab


class Client:
    """The legitimate client's request loop, running in its namespace."""

    def __init__(self, lab: netlab.Lab, seconds: float = 600):
        self.lab = lab
        self.proc = lab.start("client", sys.executable, str(TESTS / "client.py"),
                              netlab.TARGET4, netlab.TARGET6, str(seconds),
                              stdout=subprocess.PIPE)

    def finish(self) -> dict:
        self.lab.stop(self.proc)
        return json.loads(self.proc.stdout.read() or b"{}")


PORTSENTRY_FLAGS = {"-tcp", "-stcp", "-atcp", "-udp", "-sudp", "-audp"}
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Daemons that detach from us are reparented to this process (not to
    PID 1), so their exit status can be collected like a child's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class DetachedProcess:
    """A daemon that detached (classic start), known by the PID from its pid
    file; Popen's poll/send_signal/wait/kill, so Lab.stop and the tests treat
    it like a child. Signals go to that PID only."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not reparented to us: ask /proc
                if not Path(f"/proc/{self.pid}").exists() or \
                        Path(f"/proc/{self.pid}/stat").read_text().split(") ")[-1][0] == "Z":
                    self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (30.0 if timeout is None else timeout)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


class Daemon:
    """portsentinel in the target namespace with a config written for the test.
    `classic=True` starts it the classic way (it detaches; PortSentry's `-atcp`
    style when the arguments begin with a mode flag) and tracks it by the PID
    in its pid file; `env` adds environment variables."""

    def __init__(self, lab: netlab.Lab, workdir: Path, config: str, *args: str,
                 fresh: bool = True, role: str = "target", classic: bool = False,
                 env: dict[str, str] | None = None):
        self.lab, self.workdir, self.role = lab, workdir, role
        self.classic, self.env = classic, env
        self.pid_file = workdir / "pid"
        workdir.mkdir(parents=True, exist_ok=True)
        self.history = workdir / "portsentry.history"
        self.blocked = workdir / "portsentry.blocked"
        self.hosts_deny = workdir / "hosts.deny"
        self.conf = workdir / "portsentry.conf"
        self.state = workdir / "state.db"
        self.socket = workdir / "control.sock"
        # the test's own keys first: the first occurrence of a key wins
        defaults = {"HISTORY_FILE": self.history, "BLOCKED_FILE": self.blocked,
                    "HOSTS_DENY_FILE": self.hosts_deny, "STATE_FILE": self.state,
                    "CONTROL_SOCKET": self.socket}
        self.conf.write_text(config + "".join(f'{key}="{value}"\n' for key, value in
                                              defaults.items() if f"{key}=" not in config))
        self.log = workdir / "daemon.log"
        if fresh:  # every test starts from an empty firewall in the target namespace
            lab.exec(role, "nft", "flush", "ruleset", check=True)
        self.args = args
        self.start()

    def start(self) -> None:
        lab, workdir, args = self.lab, self.workdir, self.args
        self.log.open("a").write("---- start\n")
        env = {**os.environ, **self.env} if self.env else None
        if self.classic:
            self._start_classic(env)
        else:
            self.proc = lab.start(self.role, str(PORTSENTINEL), "run", "-c", str(self.conf),
                                  "--foreground", "--log", "stdout",
                                  "--pid-file", str(workdir / "pid"), *args,
                                  stdout=self.log.open("a"), env=env)
        self.wait_log("PortSentry is now active and listening.", after_last_start=True)

    def _start_classic(self, env) -> None:
        """Returns once the daemon said it is ready (or fails with its error)."""
        become_subreaper()
        options = ["-c", str(self.conf), "--log", f"file:{self.log}",
                   "--pid-file", str(self.pid_file)]
        args = list(self.args)
        argv = ([*args, *options] if args and args[0] in PORTSENTRY_FLAGS
                else ["run", *options, *args])
        done = self.lab.exec(self.role, str(PORTSENTINEL), *argv, timeout=120, env=env)
        assert done.returncode == 0, f"classic start failed ({done.returncode}): " \
                                     f"{done.stdout}{done.stderr}\n{self.log.read_text()[-3000:]}"
        self.proc = DetachedProcess(int(self.pid_file.read_text()))
        self.lab.procs.append(self.proc)  # the lab's teardown stops it by PID too

    def wait_log(self, text: str, timeout: float = 10.0, after_last_start: bool = False,
                 regex: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.log.read_text()
            if after_last_start:
                log = log.rsplit("---- start\n", 1)[-1]
            for line in log.splitlines():
                if (re.search(text, line) if regex else text in line):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before "
                                     f"{text!r}:\n{log[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged after {timeout}s:\n{log[-3000:]}")
            time.sleep(0.05)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = self.lab.exec(self.role, str(PORTSENTINEL), *args, "--socket", str(self.socket))
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def set_timeouts(self) -> dict[str, float | None]:
        """Address -> seconds left in the kernel set (None: no timeout)."""
        found = {}
        for name in ("ban4", "ban6"):
            out = self.lab.exec(self.role, "nft", "-j", "list", "set", "inet", "portsentinel",
                                name).stdout
            for item in json.loads(out or '{"nftables": []}')["nftables"]:
                for element in item.get("set", {}).get("elem", []):
                    if isinstance(element, dict):
                        found[element["elem"]["val"]] = element["elem"].get("expires")
                    else:
                        found[element] = None
        return found

    def log_text(self) -> str:
        return self.log.read_text()

    def banned(self) -> set[str]:
        found = set()
        for name in ("ban4", "ban6"):
            out = self.lab.exec(self.role, "nft", "-j", "list", "set", "inet", "portsentinel",
                                name).stdout
            for item in json.loads(out or '{"nftables": []}')["nftables"]:
                for element in item.get("set", {}).get("elem", []):
                    found.add(element["elem"]["val"] if isinstance(element, dict) else element)
        return found

    def stop(self) -> int | None:
        return self.lab.stop(self.proc)


@pytest.fixture
def start_daemon(lab, tmp_path):
    started: list[Daemon] = []

    def start(config: str, *args: str, **kw) -> Daemon:
        daemon = Daemon(lab, tmp_path, config, *args, **kw)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def nmap_argv(scan: str, source: str, target: str, ports: str) -> list[str]:
    argv = ["nmap", *scan.split(), "-Pn", "-n", "-T4", "--max-retries", "0", "--host-timeout", "40s",
            "-e", "eth0", "-S", source, "-p", ports, "-oG", "-", target]
    if ":" in source:
        argv.insert(1, "-6")
    return argv


def nmap(lab: netlab.Lab, scan: str, source: str, target: str, ports: str,
         timeout: float = 90) -> subprocess.CompletedProcess:
    """One bounded nmap scan from `source` (an attacker address) to `target`."""
    done = lab.exec("attacker", *nmap_argv(scan, source, target, ports), timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def open_ports(nmap_output: str) -> set[int]:
    ports = set()
    for line in nmap_output.splitlines():
        if "Ports:" in line:
            for entry in line.split("Ports:", 1)[1].split(","):
                fields = entry.strip().split("/")
                if len(fields) > 1 and fields[1] == "open":
                    ports.add(int(fields[0]))
    return ports


def can_connect(lab: netlab.Lab, source: str, target: str, port: int = 80) -> bool:
    """A TCP connect from `source` in the attacker namespace: does it get through?"""
    code = ("import socket,sys\n"
            "try:\n"
            " socket.create_connection((sys.argv[1], int(sys.argv[3])), 1.5,"
            " source_address=(sys.argv[2], 0)).close(); print('connected')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print('blocked', e)\n")
    out = lab.exec("attacker", sys.executable, "-c", code, target, source, str(port)).stdout
    return not out.startswith("blocked")
