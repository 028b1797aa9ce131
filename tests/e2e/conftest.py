"""End-to-end fixtures: a namespace lab with real services, the real daemon
in the target namespace, real nmap in the attacker namespace."""

from __future__ import annotations

import json
import os
import re
import shutil
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


class Daemon:
    """portsentinel in the target namespace with a config written for the test."""

    def __init__(self, lab: netlab.Lab, workdir: Path, config: str, *args: str,
                 fresh: bool = True, role: str = "target"):
        self.lab, self.workdir, self.role = lab, workdir, role
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
        self.proc = lab.start(self.role, str(PORTSENTINEL), "run", "-c", str(self.conf),
                              "--foreground", "--log", "stdout",
                              "--pid-file", str(workdir / "pid"), *args,
                              stdout=self.log.open("a"))
        self.wait_log("PortSentry is now active and listening.", after_last_start=True)

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

    def start(config: str, *args: str) -> Daemon:
        daemon = Daemon(lab, tmp_path, config, *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def nmap(lab: netlab.Lab, scan: str, source: str, target: str, ports: str,
         timeout: float = 90) -> subprocess.CompletedProcess:
    """One bounded nmap scan from `source` (an attacker address) to `target`."""
    v6 = ":" in source
    argv = ["nmap", scan, "-Pn", "-n", "-T4", "--max-retries", "0", "--host-timeout", "40s",
            "-e", "eth0", "-S", source, "-p", ports, "-oG", "-", target]
    if v6:
        argv.insert(1, "-6")
    done = lab.exec("attacker", *argv, timeout=timeout)
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
