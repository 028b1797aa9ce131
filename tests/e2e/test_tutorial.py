"""The seed tutorial's PortSentry setup, kept unchanged, under portsentinel.

The Debian tutorial every PortSentry user follows edits Debian's
/etc/portsentry/portsentry.conf: BLOCK_TCP="1", BLOCK_UDP="1", the route
KILL_ROUTE commented out and `KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$
-j DROP"` uncommented; /etc/default/portsentry gets TCP_MODE="atcp" and
UDP_MODE="audp"; monitoring hosts go into portsentry.ignore.static.

Here that layout is built in a private mount namespace of the daemon (an
overlay on /etc, fresh tmpfs on /var/lib and /run: the host's own files are
never written), and the daemon is started with no -c, as a PortSentry user's
install starts it. The user must get the defaults' protection (the nftables
ban and the kernel trap first, KILL_ROUTE in addition, IPv6 banned too) and
`portsentinel unblock` must leave a clean firewall.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import netlab
from conftest import PORTSENTINEL, Client, can_connect, open_ports
from netlab import CLIENT4, CLIENT6, TARGET4, TARGET6, extra4, extra6

KILL_ROUTE = "/sbin/iptables -I INPUT -s $TARGET$ -j DROP"
REAL_TCP = {22, 80, 443, 8080}
# nmap -r scans these in order, so a real service (22) comes before the first
# trap port (23): the first-contact hold, which the unchanged config gets like
# the defaults, must hide it
SCAN_PORTS = "22-25,79-81,111,443,8080"

# Debian 12's portsentry.conf, its active lines and the iptables line the
# tutorial uncomments; used when the package is not unpacked (scripts/test.sh
# unpacks it and sets PORTSENTRY_DEB_ROOT, and then the real file is used)
DEBIAN_CONF = """\
TCP_PORTS="1,11,15,79,111,119,143,540,635,1080,1524,2000,5742,6667,12345,12346,20034,27665,31337,32771,32772,32773,32774,40421,49724,54320"
UDP_PORTS="1,7,9,69,161,162,513,635,640,641,700,37444,34555,31335,32770,32771,32772,32773,32774,31337,54321"
ADVANCED_PORTS_TCP="1024"
ADVANCED_PORTS_UDP="1024"
ADVANCED_EXCLUDE_TCP="113,139"
ADVANCED_EXCLUDE_UDP="520,138,137,67"
IGNORE_FILE="/etc/portsentry/portsentry.ignore"
HISTORY_FILE="/var/lib/portsentry/portsentry.history"
BLOCKED_FILE="/var/lib/portsentry/portsentry.blocked"
RESOLVE_HOST = "0"
BLOCK_UDP="0"
BLOCK_TCP="0"
KILL_ROUTE="/sbin/route add -host $TARGET$ reject"
# iptables support for Linux
#KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"
KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"
SCAN_TRIGGER="0"
"""
DEBIAN_IGNORE_STATIC = "# /etc/portsentry/portsentry.ignore.static\n127.0.0.1/32\n0.0.0.0\n"


def debian_file(name: str, fallback: str) -> str:
    root = os.environ.get("PORTSENTRY_DEB_ROOT")
    path = Path(root, "etc/portsentry", name) if root else None
    return path.read_text() if path and path.exists() else fallback


def tutorial_conf(extra: str = "") -> str:
    """Debian's portsentry.conf with the tutorial's edits, nothing else."""
    text = debian_file("portsentry.conf", DEBIAN_CONF)
    edits = [('BLOCK_UDP="0"', 'BLOCK_UDP="1"'), ('BLOCK_TCP="0"', 'BLOCK_TCP="1"'),
             ('\nKILL_ROUTE="/sbin/route add -host $TARGET$ reject"',
              '\n#KILL_ROUTE="/sbin/route add -host $TARGET$ reject"'),
             (f'\n#KILL_ROUTE="{KILL_ROUTE}"', f'\nKILL_ROUTE="{KILL_ROUTE}"')]
    for old, new in edits:
        assert text.count(old) == 1, f"Debian's portsentry.conf changed: {old!r}"
        text = text.replace(old, new)
    return extra + text


class TutorialDaemon:
    """portsentinel in the target namespace, in a private mount namespace that
    holds the tutorial's /etc/portsentry and /etc/default/portsentry; started
    with no -c, so it reads /etc/portsentry/portsentry.conf itself."""

    def __init__(self, lab: netlab.Lab, tmp: Path, conf: str):
        self.lab, self.tmp = lab, tmp
        upper, work = tmp / "etc-upper", tmp / "etc-work"
        (upper / "portsentry").mkdir(parents=True)
        (upper / "default").mkdir()
        work.mkdir()
        (upper / "portsentry/portsentry.conf").write_text(conf)
        (upper / "portsentry/portsentry.ignore.static").write_text(
            debian_file("portsentry.ignore.static", DEBIAN_IGNORE_STATIC)
            + f"# monitoring\n{CLIENT4}\n{CLIENT6}/128\n")
        (upper / "default/portsentry").write_text(
            "# /etc/default/portsentry\n#\n# tutorial: advanced stealth modes\n"
            'TCP_MODE="atcp"\nUDP_MODE="audp"\n')
        self.log = tmp / "daemon.log"
        script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
                  " && mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /run"
                  f" && exec {PORTSENTINEL} run --foreground --log stdout")
        lab.exec("target", "nft", "flush", "ruleset", check=True)
        self.proc = lab.start("target", "unshare", "--mount", "--propagation", "private",
                              "sh", "-c", script, stdout=self.log.open("w"))
        self.wait_log("PortSentry is now active and listening.")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log.read_text().splitlines():
                if text in line:
                    return line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged (exit {self.proc.poll()}):\n"
                                     f"{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def file(self, path: str) -> str:
        """A file as the daemon sees it (its private /etc, /var/lib)."""
        try:
            return Path(f"/proc/{self.proc.pid}/root{path}").read_text()
        except FileNotFoundError:
            return ""

    def inside(self, *argv: str) -> subprocess.CompletedProcess:
        """A command in the daemon's network and mount namespaces, as the admin runs it."""
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "-n", *argv],
                              capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> None:
        self.lab.stop(self.proc)


@pytest.fixture
def tutorial(lab, tmp_path):
    started = []

    def start(extra: str = "") -> TutorialDaemon:
        daemon = TutorialDaemon(lab, tmp_path, tutorial_conf(extra))
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def scan(lab, kind: str, source: str) -> set[int]:
    """One bounded nmap scan from the attacker; the real ports it found open."""
    v6 = ":" in source
    argv = ["nmap", *(["-6"] if v6 else []), kind, "-r", "-Pn", "-n", "-T4",
            "--max-retries", "0", "--host-timeout", "40s", "-e", "eth0", "-S", source,
            "-p", SCAN_PORTS, "-oG", "-", TARGET6 if v6 else TARGET4]
    done = lab.exec("attacker", *argv, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return open_ports(done.stdout) & REAL_TCP


def drop_rules(lab) -> dict[str, list[str]]:
    return {tool: [line for line in lab.exec("target", tool, "-S", "INPUT").stdout.splitlines()
                   if "-j DROP" in line]
            for tool in ("iptables", "ip6tables")}


def banned(lab) -> set[str]:
    found = set()
    for name in ("ban4", "ban6"):
        out = lab.exec("target", "nft", "-j", "list", "set", "inet", "portsentinel", name).stdout
        for item in json.loads(out or '{"nftables": []}')["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                found.add(element["elem"]["val"] if isinstance(element, dict) else element)
    return found


def monitoring_checks(lab) -> None:
    """What a monitoring host does: an SNMP query (UDP 161, a trap port in
    audp) and a TCP check of a port that is down (111, a trap port in atcp)."""
    code = ("import socket,sys\n"
            "for target, family in ((sys.argv[1], socket.AF_INET), (sys.argv[2], socket.AF_INET6)):\n"
            " u = socket.socket(family, socket.SOCK_DGRAM); u.sendto(b'snmp', (target, 161))\n"
            " try: socket.create_connection((target, 111), 1).close()\n"
            " except OSError: pass\n")
    done = lab.exec("client", "python3", "-c", code, TARGET4, TARGET6)
    assert done.returncode == 0, done.stderr


def test_tutorial_config_unchanged_gets_the_kernel_trap_and_kill_route(lab, tutorial):
    daemon = tutorial()
    daemon.wait_log("kernel trap armed for TCP")
    daemon.wait_log("kernel trap armed for UDP")
    check = daemon.inside(str(PORTSENTINEL), "check-config")
    assert check.returncode == 0, check.stderr
    assert "config: /etc/portsentry/portsentry.conf: OK" in check.stdout
    assert "modes: tcp=atcp udp=audp" in check.stdout
    assert "KILL_ROUTE also runs" in check.stdout and "ip6tables" in check.stdout, check.stdout

    client = Client(lab)
    monitoring_checks(lab)
    v4, v4_manual, v6 = extra4(21), extra4(22), extra6(23)
    revealed = {source: scan(lab, kind, source)
                for kind, source in (("-sS", v4), ("-sT", v4_manual), ("-sS", v6))}
    monitoring_checks(lab)
    stats = client.finish()

    assert revealed == {v4: set(), v4_manual: set(), v6: set()}, revealed
    for source in (v4, v4_manual, v6):
        program = "/sbin/ip6tables" if ":" in source else "/sbin/iptables"
        daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route using "
                        f'command: "{program} -I INPUT -s {source} -j DROP"')
        daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route using "
                        f'command: "add element inet portsentinel ')
        assert re.search(rf"attackalert: TCP SYN/Normal scan from host: {re.escape(source)}/"
                         rf"{re.escape(source)} to TCP port: \d+$", daemon.log.read_text(), re.MULTILINE)
        assert not can_connect(lab, source, TARGET6 if ":" in source else TARGET4, 80)
    assert {v4, v4_manual, v6} <= banned(lab)
    rules = drop_rules(lab)
    assert sorted(rules["iptables"]) == sorted(f"-A INPUT -s {s}/32 -j DROP" for s in (v4, v4_manual))
    assert rules["ip6tables"] == [f"-A INPUT -s {v6}/128 -j DROP"]
    history = daemon.file("/var/lib/portsentry/portsentry.history")
    assert all(f"Host: {s}/{s} Port: " in history for s in (v4, v4_manual, v6)), history
    hosts_deny = daemon.file("/etc/hosts.deny").splitlines()
    assert f"ALL: {v4} : DENY" in hosts_deny and f"ALL: [{v6}] : DENY" in hosts_deny

    # the monitoring host (portsentry.ignore.static) kept working and was never blocked
    assert stats["ok"] > 0 and stats["failed"] == 0, stats
    assert not {CLIENT4, CLIENT6} & banned(lab)
    assert CLIENT4 not in str(rules) and CLIENT6 not in str(rules)
    assert "has been blocked" not in "\n".join(
        line for line in daemon.log.read_text().splitlines() if CLIENT4 in line or CLIENT6 in line)

    # `portsentinel unblock` undoes both, with the command really run (ip6tables for IPv6)
    for source in (v4, v6):
        done = daemon.inside(str(PORTSENTINEL), "unblock", source)
        assert done.returncode == 0 and f"unblocked: {source}" in done.stdout, done.stderr
        assert "warning" not in done.stderr, done.stderr
    daemon.wait_log(f'adminalert: Host {v6} route removed using command: '
                    f'"/sbin/ip6tables -D INPUT -s {v6} -j DROP"')
    # the tutorial's manual removal first, then portsentinel unblock: still clean
    manual = lab.exec("target", "/sbin/iptables", "-D", "INPUT", "-s", v4_manual, "-j", "DROP")
    assert manual.returncode == 0, manual.stderr
    done = daemon.inside(str(PORTSENTINEL), "unblock", v4_manual)
    assert done.returncode == 0 and f"unblocked: {v4_manual}" in done.stdout, done.stderr
    assert "warning" not in done.stderr, done.stderr

    assert drop_rules(lab) == {"iptables": [], "ip6tables": []}
    assert not {v4, v4_manual, v6} & banned(lab)
    assert not any(s in daemon.file("/etc/hosts.deny") for s in (v4, v4_manual, v6))
    for source in (v4, v4_manual, v6):
        assert can_connect(lab, source, TARGET6 if ":" in source else TARGET4, 80)
    assert "ERROR" not in daemon.log.read_text(), daemon.log.read_text()[-3000:]


def test_tutorial_ban_expiry_undoes_both(lab, tutorial):
    """BAN_TIME (one line added to the tutorial's file): expiry lifts the
    nftables ban and runs the undo of the command that really ran."""
    daemon = tutorial('BAN_TIME="3s"\n')
    v4, v6 = extra4(24), extra6(24)
    for source in (v4, v6):
        assert scan(lab, "-sS", source) == set()
        daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route using "
                        'command: "/sbin/ip')
    assert {v4, v6} <= banned(lab)
    assert all(drop_rules(lab).values())
    daemon.wait_log(f"adminalert: Host {v4} ban expired; unblocked", timeout=15)
    daemon.wait_log(f'adminalert: Host {v6} route removed using command: '
                    f'"/sbin/ip6tables -D INPUT -s {v6} -j DROP"', timeout=15)
    assert drop_rules(lab) == {"iptables": [], "ip6tables": []}
    assert not {v4, v6} & banned(lab)
    assert can_connect(lab, v6, TARGET6, 80)


def test_block_nftables_0_is_the_explicit_way_to_1_2(lab, tutorial):
    """BLOCK_NFTABLES="0" keeps 1.2's behaviour: KILL_ROUTE only; an IPv6 source
    is never given to the IPv4-only command."""
    daemon = tutorial('BLOCK_NFTABLES="0"\n')
    assert "inet portsentinel" not in lab.exec("target", "nft", "list", "tables").stdout
    scan(lab, "-sS", extra4(25))
    daemon.wait_log(f"attackalert: Host {extra4(25)} has been blocked via dropped route using "
                    f'command: "/sbin/iptables -I INPUT -s {extra4(25)} -j DROP"')
    assert drop_rules(lab)["iptables"] == [f"-A INPUT -s {extra4(25)}/32 -j DROP"]
    assert "inet portsentinel" not in lab.exec("target", "nft", "list", "tables").stdout
