"""Every way of starting the daemon gives the same working daemon: the classic
daemon (`portsentinel -atcp -audp`, `portsentinel run`), the foreground, under
systemd's readiness protocol, and scripts/install.sh on a host without systemd.

Everything runs in network namespaces the tests create; daemons are stopped by
the PID in their pid file, never by name."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import netlab
from conftest import PORTSENTINEL, DetachedProcess, become_subreaper, nmap
from netlab import TARGET4, extra4

ROOT = Path(__file__).resolve().parents[2]
ATCP_AUDP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def proc_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[3])


def test_classic_start_portsentry_style_is_a_working_daemon(lab, start_daemon):
    """`portsentinel -atcp -audp` detaches once ready; the daemon it leaves
    answers the control socket, blocks, reloads on SIGHUP and stops cleanly on
    SIGTERM, removing its pid file."""
    daemon = start_daemon(ATCP_AUDP, "-atcp", "-audp", classic=True)
    pid = daemon.proc.pid
    assert daemon.pid_file.read_text() == f"{pid}\n"
    # detached: not a session leader (no terminal can come back), cwd /, stdio /dev/null
    assert session_of(pid) not in (pid, os.getsid(0))
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {"/dev/null"}
    assert int(proc_field(pid, "Threads")) > 1  # the control/reporter threads survived

    status = lab.exec("target", str(PORTSENTINEL), "status", "--socket", str(daemon.socket),
                      timeout=10)
    assert status.returncode == 0, status.stderr
    assert f"(pid {pid})" in status.stdout and "modes: tcp=atcp udp=audp" in status.stdout

    source = extra4(22)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert source in daemon.banned()
    deadline = time.monotonic() + 5
    while source not in daemon.cli("list").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    os.kill(pid, signal.SIGHUP)
    daemon.wait_log("adminalert: configuration reloaded")
    assert "reloaded" in daemon.cli("reload").stdout
    assert daemon.proc.poll() is None

    assert daemon.stop() == 0
    assert "adminalert: PortSentry is shutting down" in daemon.log_text()
    assert not daemon.pid_file.exists() and not daemon.socket.exists()
    assert source in daemon.banned()  # bans stay in the kernel


def test_classic_start_reports_errors_and_refuses_a_second_daemon(lab, start_daemon, tmp_path):
    """The parent of a classic start waits for the daemon: a bad config, a
    running daemon or a busy control socket is a clear error and exit 1."""
    become_subreaper()
    bad = tmp_path / "bad.conf"
    bad.write_text('BLOCK_TCP="7"\n')
    done = lab.exec("target", str(PORTSENTINEL), "-atcp", "-c", str(bad), "--pid-file",
                    str(tmp_path / "bad.pid"), timeout=60)
    assert done.returncode == 1 and "BLOCK_TCP" in done.stderr, done
    assert not (tmp_path / "bad.pid").exists()
    done = lab.exec("target", str(PORTSENTINEL), "-atcp", "--log", "stdout", timeout=60)
    assert done.returncode == 1 and "--log stdout needs --foreground" in done.stderr, done

    first = start_daemon(ATCP_AUDP, classic=True)
    # the same pid file: refused by the parent's child before it touches anything
    again = lab.exec("target", str(PORTSENTINEL), "run", "-c", str(first.conf), "--pid-file",
                     str(first.pid_file), timeout=60)
    assert again.returncode == 1, again
    assert (f"cannot start: another portsentinel is running (pid {first.proc.pid}, "
            f"from {first.pid_file})") in again.stderr
    assert first.pid_file.read_text() == f"{first.proc.pid}\n"

    # another pid file but the same control socket: the daemon's own start-up
    # error travels back over the pipe
    other = tmp_path / "other"
    busy = start_second(lab, other, f'NFT_TABLE="second"\nCONTROL_SOCKET="{first.socket}"\n')
    assert busy.returncode == 1, busy
    assert f"portsentinel: cannot start: another portsentinel is running (it answers on " \
           f"{first.socket})" in busy.stderr
    assert not (other / "pid").exists()
    assert "ERROR: cannot start" in (other / "log").read_text()
    # it gave up before arming anything: no sensors, no table of its own
    assert lab.exec("target", "nft", "list", "table", "inet", "second").returncode != 0
    assert "pid" in first.cli("status").stdout  # the first one is untouched


def test_foreground_writes_and_removes_the_pid_file(lab, start_daemon, tmp_path):
    daemon = start_daemon(ATCP_AUDP)
    assert daemon.pid_file.read_text() == f"{daemon.proc.pid}\n"
    again = lab.exec("target", str(PORTSENTINEL), "run", "-c", str(daemon.conf),
                     "--foreground", "--pid-file", str(daemon.pid_file), timeout=60)
    assert again.returncode == 1
    assert f"another portsentinel is running (pid {daemon.proc.pid}" in again.stderr
    assert daemon.stop() == 0
    assert not daemon.pid_file.exists()
    # a stale pid file (its process is gone) does not stop a start
    gone = subprocess.Popen(["true"])
    gone.wait()
    daemon.pid_file.write_text(f"{gone.pid}\n")
    daemon.start()
    assert daemon.pid_file.read_text() == f"{daemon.proc.pid}\n"
    assert daemon.stop() == 0 and not daemon.pid_file.exists()


def test_systemd_readiness_protocol(lab, tmp_path):
    """Type=notify: READY=1 only once the sensors and the firewall are armed,
    STOPPING=1 when a stop begins."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(0.05)
    daemon = None
    try:
        conf = tmp_path / "portsentry.conf"
        conf.write_text(ATCP_AUDP + f'STATE_FILE="{tmp_path}/state.db"\n'
                        f'CONTROL_SOCKET="{tmp_path}/control.sock"\n'
                        f'HISTORY_FILE="{tmp_path}/h"\nBLOCKED_FILE="{tmp_path}/b"\n')
        log = tmp_path / "daemon.log"
        lab.exec("target", "nft", "flush", "ruleset", check=True)
        daemon = lab.start("target", str(PORTSENTINEL), "run", "-c", str(conf), "--foreground",
                           "--log", "stdout", "--pid-file", str(tmp_path / "pid"),
                           stdout=log.open("w"),
                           env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
        deadline = time.monotonic() + 30
        messages = []
        while not any(m.startswith(b"READY=1") for m in messages):
            assert time.monotonic() < deadline and daemon.poll() is None, log.read_text()
            try:
                messages.append(listener.recv(4096))
            except TimeoutError:
                continue
            # at the moment READY=1 arrives, start() has returned: everything is armed
            if messages[-1].startswith(b"READY=1"):
                assert "PortSentry is now active and listening." in log.read_text()
                trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel",
                                "trapped").stdout
                assert "@ban4" in trap, trap
        assert messages == [b"READY=1\nMAINPID=%d\nSTATUS=modes: tcp=atcp udp=audp"
                            % daemon.pid], messages
        status = lab.exec("target", str(PORTSENTINEL), "status", "--socket",
                          str(tmp_path / "control.sock"), timeout=10)
        assert status.returncode == 0, status.stderr
        daemon.send_signal(signal.SIGTERM)
        listener.settimeout(10)
        assert listener.recv(4096) == b"STOPPING=1"
        assert daemon.wait(15) == 0
    finally:
        listener.close()
        if daemon is not None:
            lab.stop(daemon)


# -- scripts/install.sh on a host without systemd ----------------------------

HIDDEN = ("/opt", "/usr/local/sbin", "/etc/systemd/system", "/etc/default", "/etc/logrotate.d",
          "/run", "/var/lib/portsentinel")

INSTALL_AND_CHECK = r"""
set -euo pipefail
mount --make-rprivate /
for dir in $HIDDEN; do mount -t tmpfs -o mode=0755 portsentinel-test "$dir"; done
# a PortSentry config of this host would be read instead of the embedded default
if [[ -d /etc/portsentry ]]; then mount -t tmpfs portsentinel-test /etc/portsentry; fi
[[ ! -d /run/systemd/system ]]
cd "$SOURCE"
bash scripts/install.sh
pid=$(cat /run/portsentinel.pid)
echo "daemon pid: $pid"
timeout 20 portsentinel status
# a second install on a running host: the daemon is restarted with the new code
bash scripts/install.sh
new=$(cat /run/portsentinel.pid)
echo "daemon pid: $new"
alive() { [[ -e /proc/$1/status ]] && ! grep -q '^State:.*zombie' "/proc/$1/status"; }
[[ $new != "$pid" ]] && ! alive "$pid"
timeout 20 portsentinel status
kill -TERM "$new"
for _ in $(seq 150); do alive "$new" || break; sleep 0.1; done
[[ ! -e /run/portsentinel.pid ]] && echo "pid file removed"
"""


@pytest.fixture
def bare_netns():
    """A network namespace of our own, with only loopback, and the empty
    directories the test mounts over if the host lacks them."""
    name = f"psi{os.getpid() % 100000}"
    netlab.sh("ip", "netns", "add", name)
    created = []
    try:
        netlab.sh("ip", "-n", name, "link", "set", "lo", "up")
        for path in map(Path, HIDDEN):
            if not path.exists():
                path.mkdir(parents=True)
                created.append(path)
        yield name
    finally:
        netlab.Lab._kill_members(name)  # by PID, whatever is left in it
        netlab.sh("ip", "netns", "del", name, check=False)
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:
                pass


def test_install_sh_without_systemd_starts_a_daemon_that_answers(bare_netns, tmp_path):
    """scripts/install.sh in a private mount namespace (tmpfs over everything
    it writes, /run without systemd) and a network namespace of its own:
    it starts the classic daemon, and `portsentinel status` answers."""
    if not shutil.which("unshare"):
        pytest.fail("unshare missing; run scripts/test.sh")
    become_subreaper()  # the daemon that install.sh leaves is reparented to us
    source = tmp_path / "source"
    for item in ("portsentinel", "packaging", "scripts"):
        shutil.copytree(ROOT / item, source / item,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, source / item)
    # the namespace has no network: what pip needs is fetched here, beforehand, for
    # the python3 install.sh will use (a venv of it, as install.sh makes)
    python3 = shutil.which("python3", path=SYSTEM_PATH)
    subprocess.run([python3, "-m", "venv", str(tmp_path / "fetch")], check=True, timeout=120)
    wheels = tmp_path / "wheels"
    pip = [str(tmp_path / "fetch/bin/pip"), "-q", "--disable-pip-version-check"]
    for argv in ([*pip, "download", "-d", str(wheels), "setuptools>=68", "wheel"],
                 [*pip, "wheel", "-w", str(wheels), str(source)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr
    shutil.rmtree(source / "build", ignore_errors=True)
    env = {"PATH": SYSTEM_PATH, "HOME": "/root", "LANG": "C.UTF-8", "HIDDEN": " ".join(HIDDEN),
           "SOURCE": str(source), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    pids = []
    try:
        done = subprocess.run(["ip", "netns", "exec", bare_netns, "unshare", "--mount",
                               "--propagation", "private", "bash", "-c", INSTALL_AND_CHECK],
                              env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        pids = [int(line.split()[-1]) for line in done.stdout.splitlines()
                if line.startswith("daemon pid: ")]
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "portsentinel started (pid" in out
        assert out.count(f"(pid {pids[0]}) running since") == 1, out
        assert f"(pid {pids[1]}) running since" in out and "modes: tcp=atcp udp=audp" in out
        assert "firewall: nftables inet portsentinel" in out and "pid file removed" in out
        # it stopped cleanly on SIGTERM (it was reparented to us: its exit status is ours)
        assert DetachedProcess(pids[1]).wait(15) == 0
        assert DetachedProcess(pids[0]).wait(15) == 0
    finally:
        for pid in pids:
            DetachedProcess(pid).kill()


def test_a_second_daemon_with_its_own_socket_cannot_take_over_the_table(lab, start_daemon,
                                                                         tmp_path):
    first = start_daemon('TCP_MODE="atcp"\n')
    rules = lab.exec("target", "nft", "-a", "list", "chain", "inet", "portsentinel", "trap").stdout
    other = tmp_path / "second"
    second = start_second(lab, other, f'CONTROL_SOCKET="{other}/c.sock"\n')
    assert second.returncode == 1, second
    assert "another portsentinel uses the nftables table inet portsentinel" in second.stderr
    after = lab.exec("target", "nft", "-a", "list", "chain", "inet", "portsentinel", "trap").stdout
    assert after == rules  # untouched (handles would change with any rewrite)
    assert "pid" in first.cli("status").stdout


def start_second(lab, other, keys: str):
    """A second daemon's start with its own files under `other`, and `keys`."""
    other.mkdir()
    conf = other / "portsentry.conf"
    conf.write_text(f'TCP_MODE="atcp"\n{keys}STATE_FILE="{other}/state.db"\n'
                    f'HISTORY_FILE="{other}/h"\nBLOCKED_FILE="{other}/b"\n')
    return lab.exec("target", str(PORTSENTINEL), "run", "-c", str(conf), "--pid-file",
                    str(other / "pid"), "--log", f"file:{other / 'log'}", timeout=60)
