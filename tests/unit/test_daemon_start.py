"""Starting the daemon: sd_notify, the pid file, the classic start's pipe
protocol, --log targets and the systemd unit's readiness settings."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from portsentinel import cli
from portsentinel.config import ConfigError
from portsentinel.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]


# -- sd_notify ---------------------------------------------------------------

def test_notify_to_a_socket_path(tmp_path: Path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(5)
        notifier = Notifier(str(tmp_path / "notify"))
        assert notifier.ready("modes: tcp=atcp udp=off")
        assert listener.recv(4096) == (b"READY=1\nMAINPID=%d\nSTATUS=modes: tcp=atcp udp=off"
                                       % os.getpid())
        assert notifier.stopping()
        assert listener.recv(4096) == b"STOPPING=1"


def test_notify_to_the_abstract_namespace():
    name = f"portsentinel-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        assert Notifier("@" + name).send("READY=1")
        assert listener.recv(4096) == b"READY=1"


def test_notify_without_systemd_or_with_a_dead_socket_is_silent(tmp_path: Path):
    assert not Notifier(None) and not Notifier(None).ready()
    assert not Notifier("").send("READY=1")
    assert not Notifier(str(tmp_path / "nobody")).ready()  # no listener: no exception
    assert not Notifier("vsock:2:1234").ready()


def test_notifier_takes_the_socket_out_of_the_environment(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    notifier = Notifier.from_environment()
    assert notifier.address == "/run/systemd/notify"
    assert "NOTIFY_SOCKET" not in os.environ  # commands we run do not inherit it


def test_stopping_is_sent_before_the_daemons_own_handler_runs(tmp_path: Path):
    seen = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(5)
        try:
            signal.signal(signal.SIGTERM, lambda *_: seen.append(listener.recv(4096)))
            cli._notify_stopping_on_signals(Notifier(str(tmp_path / "notify")))
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    assert seen == [b"STOPPING=1"]


# -- the pid file ------------------------------------------------------------

def test_pid_file_is_claimed_and_released(tmp_path: Path):
    pid_file = tmp_path / "run" / "portsentinel.pid"
    cli.claim_pid_file(pid_file)
    assert pid_file.read_text() == f"{os.getpid()}\n"
    cli.release_pid_file(pid_file)
    assert not pid_file.exists()


def test_pid_file_of_a_running_portsentinel_refuses_the_start(tmp_path: Path):
    other = subprocess.Popen([sys.executable, "-c", "print(flush=True); import time; "
                              "time.sleep(60)", "portsentinel"], stdout=subprocess.PIPE)
    try:
        other.stdout.readline()  # it has exec'd: its command line is the new one
        pid_file = tmp_path / "portsentinel.pid"
        pid_file.write_text(f"{other.pid}\n")
        with pytest.raises(cli.StartError, match=rf"another portsentinel is running "
                                                 rf"\(pid {other.pid}, from {pid_file}\)"):
            cli.claim_pid_file(pid_file)
        assert pid_file.read_text() == f"{other.pid}\n"
        cli.release_pid_file(pid_file)  # not ours: left alone
        assert pid_file.exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("content", ["dead", "other process", "self", "garbage", ""])
def test_a_stale_pid_file_is_replaced(tmp_path: Path, content: str):
    pid_file = tmp_path / "portsentinel.pid"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        if content == "dead":
            gone = subprocess.Popen(["true"])
            gone.wait()
            pid_file.write_text(f"{gone.pid}\n")
        elif content == "other process":  # the pid was reused by something else
            pid_file.write_text(f"{sleeper.pid}\n")
        elif content == "self":  # e.g. a container restarted with the same pid
            pid_file.write_text(f"{os.getpid()}\n")
        else:
            pid_file.write_text(content)
        cli.claim_pid_file(pid_file)
        assert pid_file.read_text() == f"{os.getpid()}\n"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unwritable_pid_file_is_a_start_error(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(cli.StartError, match="cannot write the pid file"):
        cli.claim_pid_file(tmp_path / "file" / "portsentinel.pid")


# -- the classic start's pipe ------------------------------------------------

def _parent_reading(message: bytes | None, timeout: float = 5.0) -> int:
    read_end, write_end = os.pipe()
    if message is not None:
        os.write(write_end, message)
        os.close(write_end)
        return cli._await_daemon(read_end, timeout)
    try:  # the daemon says nothing and keeps the pipe open
        return cli._await_daemon(read_end, timeout)
    finally:
        os.close(write_end)


def test_parent_exits_0_once_the_daemon_is_ready(capsys):
    assert _parent_reading(b"ready\n") == 0
    assert capsys.readouterr() == ("", "")


def test_parent_prints_the_daemons_error_and_exits_1(capsys):
    assert _parent_reading(b"error cannot start: another portsentinel is running\n") == 1
    assert capsys.readouterr().err == ("portsentinel: cannot start: another portsentinel is "
                                       "running\n")


def test_parent_of_a_daemon_that_died_silently_exits_1(capsys):
    assert _parent_reading(b"") == 1
    assert "exited during start-up" in capsys.readouterr().err


def test_parent_waits_a_bounded_time(capsys):
    assert _parent_reading(None, timeout=0.2) == 1
    assert "has not reported ready after" in capsys.readouterr().err


def test_startup_reports_over_the_pipe_once():
    read_end, write_end = os.pipe()
    startup = cli.Startup(write_end)
    log = _Log()
    assert startup.failed("cannot start: boom", log) == 1
    assert startup.pipe is None
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"error cannot start: boom\n"
    assert log.errors == ["adminalert: ERROR: cannot start: boom"]


class _Log:
    def __init__(self):
        self.errors = []

    def __call__(self, message, priority=None):
        pass

    def error(self, message):
        self.errors.append(message)


# -- --log targets -----------------------------------------------------------

def _args(log: str | None, foreground: bool) -> argparse.Namespace:
    return argparse.Namespace(log=log, foreground=foreground, syslog_ident="portsentry",
                              syslog_facility="daemon")


def test_log_to_a_file(tmp_path: Path):
    path = tmp_path / "daemon.log"
    log = cli._log_for(_args(f"file:{path}", foreground=False))
    log("adminalert: PortSentry is now active and listening.")
    assert not log.to_syslog
    assert path.read_text().endswith(f"portsentry[{os.getpid()}]: adminalert: PortSentry is "
                                     "now active and listening.\n")


def test_log_stdout_only_in_the_foreground():
    assert cli._log_for(_args("stdout", foreground=True)).stream is sys.stdout
    assert cli._log_for(_args(None, foreground=True)).stream is sys.stdout
    with pytest.raises(ConfigError, match="--log stdout needs --foreground"):
        cli._log_for(_args("stdout", foreground=False))
    log = cli._log_for(_args(None, foreground=False))
    assert log.to_syslog and log.stream is None


@pytest.mark.parametrize("targets, error", [
    ("syslog,stderr", "unknown target stderr"),
    ("file:", "needs a path"),
    ("stdout,file:/tmp/x", "one of stdout and file:PATH"),
    ("file:/nonexistent-dir/x.log", "cannot open /nonexistent-dir/x.log"),
])
def test_bad_log_targets(targets: str, error: str):
    with pytest.raises(ConfigError, match=error):
        cli._log_for(_args(targets, foreground=True))


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_classic_run_with_log_stdout_is_refused_before_forking(tmp_path: Path, capsys):
    conf = tmp_path / "portsentry.conf"
    conf.write_text('TCP_MODE="atcp"\n')
    assert cli.main(["-atcp", "-c", str(conf), "--log", "stdout",
                     "--pid-file", str(tmp_path / "pid")]) == 1
    assert "--log stdout needs --foreground" in capsys.readouterr().err
    assert not (tmp_path / "pid").exists()


# -- the systemd unit --------------------------------------------------------

def test_unit_uses_the_readiness_protocol_in_the_foreground():
    unit = (ROOT / "packaging/portsentinel.service").read_text()
    assert "\nType=notify\n" in unit and "\nNotifyAccess=main\n" in unit
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert " run --foreground " in start
    assert "AF_UNIX" in next(line for line in unit.splitlines()
                             if line.startswith("RestrictAddressFamilies="))
