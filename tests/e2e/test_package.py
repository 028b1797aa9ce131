"""The Debian package, installed the way PortSentry is (issue 15).

The .deb is built from this tree with dpkg-buildpackage, then installed with
`apt install ./portsentinel_*.deb` in a throwaway root over an installed
Debian portsentry with a tutorial-style config: an overlay on the host's own
root (a tmpfs holds every change, in a private mount namespace that dies with
the test; the host's /etc is never written) entered with chroot. Package
steps that need Debian's mirror run there in the host's network namespace;
everything that runs a daemon or touches a firewall runs in the lab's target
namespace. A policy-rc.d (as in containers) refuses every service start and
stop, so the old daemon's own prerm cannot stop it: ours must.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import netlab  # noqa: E402
from test_tutorial import tutorial_conf  # noqa: E402  Debian's file, the tutorial's edits

ROOT = Path(__file__).resolve().parents[2]
DEB_ROOT = Path(os.environ.get("PORTSENTRY_DEB_ROOT", ROOT / ".cache/portsentry/root"))
DEBIAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's python3, not a venv's or pyenv's


def build_package(out: Path) -> Path:
    """The .deb, built from the files git knows here (as a clean checkout has them)."""
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    done = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": DEBIAN_PATH})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return next(out.glob("portsentinel_*_all.deb"))


class ThrowawayRoot:
    """The host's root under an overlay whose upper layer is a tmpfs, in a
    mount namespace held by one sleeping process; commands run in it with
    chroot, in the host's or a lab namespace's network."""

    def __init__(self, base: Path, lab: netlab.Lab):
        self.lab, self.merged = lab, base / "merged"
        script = f"""set -e
mount -t tmpfs tmpfs {base}
mkdir {base}/upper {base}/work {self.merged}
mount -t overlay overlay -o lowerdir=/,upperdir={base}/upper,workdir={base}/work {self.merged}
for d in proc sys dev; do mount --rbind /$d {self.merged}/$d; done
mount -t tmpfs tmpfs {self.merged}/run
mount -t tmpfs tmpfs {self.merged}/tmp
printf '#!/bin/sh\\nexit 101\\n' > {self.merged}/usr/sbin/policy-rc.d
chmod +x {self.merged}/usr/sbin/policy-rc.d
echo ready
exec sleep 900
"""
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sh", "-c", script], stdout=subprocess.PIPE,
                                       start_new_session=True)
        assert self.holder.stdout.readline().strip() == b"ready", "no throwaway root"

    def run(self, command: str, netns: str | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        argv = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "chroot",
                str(self.merged), "env", "-i", f"PATH={DEBIAN_PATH}",
                "DEBIAN_FRONTEND=noninteractive", "sh", "-c", command]
        if netns:
            argv = ["ip", "netns", "exec", self.lab.ns[netns], *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def path(self, inside: str) -> Path:
        """A file of the throwaway root, as the holder's namespace sees it."""
        return Path(f"/proc/{self.holder.pid}/root{self.merged}{inside}")

    def pids_of(self, program: str) -> list[int]:
        """Processes of this root whose command line starts with `program`."""
        return [pid for pid in self.rooted()
                if _cmdline(pid).split("\0")[0] == program]

    def close(self) -> None:
        """Every process of this root, by PID, then the holder (the mounts go with it)."""
        netlab.kill_by_pid(lambda: [p for p in self.rooted() if p != self.holder.pid])
        self.holder.kill()
        self.holder.wait(10)

    def rooted(self) -> list[int]:
        """Every process whose root directory is this root (compared as files:
        the magic link leads into the holder's mount namespace)."""
        me = os.stat(self.path("/"))
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    there = os.stat(entry / "root")
                except OSError:
                    continue
                if (there.st_dev, there.st_ino) == (me.st_dev, me.st_ino):
                    pids.append(int(entry.name))
        return pids


def _alive(pid: int) -> bool:
    """Running: a daemon that forked away may be reparented to the test run
    (a subreaper, conftest.py), so once stopped it is a zombie until reaped."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


@pytest.fixture
def throwaway_root(lab):
    for tool in ("dpkg-buildpackage", "dh", "unshare", "nsenter", "fail2ban-regex"):
        if not shutil.which(tool, path=DEBIAN_PATH):
            pytest.fail(f"missing {tool}; run scripts/test.sh")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        deb = build_package(base)
        (base / "mnt").mkdir()
        root = ThrowawayRoot(base / "mnt", lab)
        try:
            yield root, deb
        finally:
            root.close()
            lab.exec("target", "nft", "delete", "table", "inet", "portsentinel")
            lab.exec("target", "iptables", "-F", "INPUT")
            lab.exec("target", "ip6tables", "-F", "INPUT")


def test_the_package_takes_over_from_portsentry_and_leaves_nothing_behind(lab, throwaway_root):
    root, deb = throwaway_root
    old = sorted(DEB_ROOT.parent.glob("portsentry_*.deb"))
    assert old, "Debian's portsentry package (scripts/test.sh downloads it)"
    shutil.copy(old[-1], root.path("/tmp/"))
    shutil.copy(deb, root.path("/tmp/"))
    # portsentry installed from Debian's own package, then given a tutorial's config
    root.run("apt-get update -qq")
    root.run(f"apt-get install -y -qq ./tmp/{old[-1].name} python3-prometheus-client "
             "python3-redis nftables iptables")
    root.path("/etc/portsentry/portsentry.conf").write_text(tutorial_conf())
    root.path("/etc/default/portsentry").write_text('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
    root.path("/etc/portsentry/portsentry.ignore").write_text("127.0.0.1/32\n0.0.0.0\n")
    conf_before = {name: root.path(f"/etc/portsentry/{name}").read_bytes()
                   for name in ("portsentry.conf", "portsentry.ignore.static")}
    default_before = root.path("/etc/default/portsentry").read_bytes()
    # the old daemon runs, as its init script starts it
    root.run("/usr/sbin/portsentry -atcp && /usr/sbin/portsentry -audp", netns="target")
    deadline = time.monotonic() + 10
    while len(root.pids_of("/usr/sbin/portsentry")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    old_pids = root.pids_of("/usr/sbin/portsentry")
    assert len(old_pids) == 2, old_pids

    # the take-over: apt removes portsentry (Conflicts), its daemon goes
    installed = root.run(f"apt-get install -y ./tmp/{deb.name}", netns="target")
    assert "portsentry" in re.search(r"REMOVED:\s*\n(.*)\n", installed.stdout)[1]
    deadline = time.monotonic() + 10
    while any(map(_alive, old_pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in old_pids if _alive(p)], "PortSentry 1.2 still runs"
    assert root.run("dpkg-query -W -f '${Status}' portsentry", check=False).stdout \
        == "deinstall ok config-files"
    for name, content in conf_before.items():  # conffiles untouched
        assert root.path(f"/etc/portsentry/{name}").read_bytes() == content
    assert root.path("/etc/default/portsentry").read_bytes() == default_before
    started_at_boot = [p for p in root.path("/etc").glob("rc[2-5].d/S*portsentry")]
    assert not started_at_boot, started_at_boot  # its init script (a conffile) is disabled
    unit = root.path("/lib/systemd/system/portsentinel.service").read_text()
    assert "ExecStart=/usr/sbin/portsentinel run --foreground" in unit
    assert root.path("/usr/share/man/man8/portsentinel.8.gz").exists()
    assert root.path("/usr/share/man/man8/portsentry.8.gz").exists()  # `man portsentry`
    assert root.path("/usr/share/man/man5/portsentry.conf.5.gz").exists()
    assert "/var/lib/portsentry/portsentry.history" in \
        root.path("/etc/logrotate.d/portsentinel").read_text()

    # the new daemon, started the classic way (no systemd here), reads that config
    root.run("portsentinel run", netns="target", timeout=30)
    status = root.run("portsentinel status", netns="target").stdout
    assert "atcp" in status and "audp" in status, status
    scan = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "-r", "-p", "1-30",
                    "--max-retries", "0", netlab.TARGET4, timeout=120)
    assert scan.returncode == 0, scan.stderr
    deadline = time.monotonic() + 10
    history = root.path("/var/lib/portsentry/portsentry.history")
    while time.monotonic() < deadline and not (history.exists()
                                               and netlab.ATTACKER4 in history.read_text()):
        time.sleep(0.2)
    assert f"Host: {netlab.ATTACKER4}/{netlab.ATTACKER4} Port: " in history.read_text()
    bans = root.run("portsentinel list", netns="target").stdout
    assert netlab.ATTACKER4 in bans
    assert f"-s {netlab.ATTACKER4}/32 -j DROP" in lab.exec("target", "iptables", "-S").stdout
    assert f"ALL: {netlab.ATTACKER4} : DENY" in root.path("/etc/hosts.deny").read_text()
    # fail2ban's portsentry filter, unchanged, finds the scanner in the history
    regex = root.run("fail2ban-regex /var/lib/portsentry/portsentry.history "
                     "/etc/fail2ban/filter.d/portsentry.conf").stdout
    assert re.search(r"Failregex: [1-9]\d* total", regex), regex

    # removed (not purged): no rule, no ban, no daemon left; the admin's config stays
    root.run("apt-get remove -y portsentinel", netns="target")
    assert not [p for p in root.rooted() if "portsentinel" in _cmdline(p)]
    assert lab.exec("target", "nft", "list", "table", "inet", "portsentinel").returncode != 0
    assert netlab.ATTACKER4 not in lab.exec("target", "iptables", "-S").stdout
    assert root.path("/etc/portsentry/portsentry.conf").read_bytes() \
        == conf_before["portsentry.conf"]
    assert netlab.ATTACKER4 not in root.path("/etc/hosts.deny").read_text()  # KILL_HOSTS_DENY
    reach = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "-p", "22", netlab.TARGET4)
    assert "22/tcp open" in reach.stdout, reach.stdout  # the scanner's ban is gone too
    assert root.path("/var/lib/portsentinel").exists()  # the state: until purged
    root.run("apt-get purge -y portsentinel", netns="target")
    assert not root.path("/var/lib/portsentinel").exists()
    assert root.path("/etc/portsentry/portsentry.conf").exists()  # portsentry's, not ours
    # its init script may start it at boot again, now that we are gone
    assert list(root.path("/etc").glob("rc2.d/S*portsentry"))

    # removed while the daemon is stopped: its bans are lifted from the state
    root.run(f"apt-get install -y ./tmp/{deb.name}", netns="target")
    root.run("portsentinel run --pid-file /run/elsewhere.pid", netns="target", timeout=30)
    second = netlab.extra4(30)
    lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "-r", "-p", "1-5", "--max-retries", "0",
             "-S", second, "-e", "eth0", netlab.TARGET4, timeout=60)
    deadline = time.monotonic() + 10
    while second not in root.run("portsentinel list", netns="target").stdout:
        assert time.monotonic() < deadline, "the second scanner was not banned"
        time.sleep(0.2)
    assert f"-s {second}/32 -j DROP" in lab.exec("target", "iptables", "-S").stdout
    pid = int(root.path("/run/elsewhere.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    root.run("apt-get remove -y portsentinel", netns="target")
    assert second not in lab.exec("target", "iptables", "-S").stdout
    assert lab.exec("target", "nft", "list", "table", "inet", "portsentinel").returncode != 0


def test_removal_stops_a_daemon_started_with_another_pid_file(lab, throwaway_root):
    root, deb = throwaway_root
    shutil.copy(deb, root.path("/tmp/"))
    root.run("apt-get update -qq")
    root.run("apt-get install -y -qq python3-prometheus-client python3-redis nftables")
    root.run(f"apt-get install -y ./tmp/{deb.name}", netns="target")
    root.run("portsentinel run --pid-file /run/alt.pid", netns="target", timeout=30)
    pid = int(root.path("/run/alt.pid").read_text())
    root.run("apt-get remove -y portsentinel", netns="target")
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the daemon outlived its package"
        time.sleep(0.1)
    assert lab.exec("target", "nft", "list", "table", "inet", "portsentinel").returncode != 0
