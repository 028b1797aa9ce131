"""FIRST_CONTACT_HOLD (on by default): a stranger's first SYN to a served port
waits a few milliseconds in our netfilter queue; a scan that probes real
ports first has hit a trap port by then and learns nothing, a new client
connects on its first try, a little later; and the hold fails open."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time

import pytest

from netlab import TARGET4, TARGET6, extra4, extra6
from conftest import can_connect, nmap, open_ports

REAL_FIRST = "22,80,443,444-460"  # nmap -r goes in order: three real ports first


@contextlib.contextmanager
def newcomer(lab, address: str):
    """A client address nobody has seen (each test takes its own)."""
    prefix = "64" if ":" in address else "24"
    lab.exec("client", "ip", "addr", "add", f"{address}/{prefix}", "dev", "eth0",
             *(["nodad"] if ":" in address else []), check=True)
    try:
        yield address
    finally:
        lab.exec("client", "ip", "addr", "del", f"{address}/{prefix}", "dev", "eth0")


def connect_seconds(lab, source: str, port: int = 80) -> float:
    """Seconds a first-try TCP connect from `source` in the client namespace takes."""
    target = TARGET6 if ":" in source else TARGET4
    code = ("import socket,sys,time\nt=time.monotonic()\n"
            "socket.create_connection((sys.argv[1], int(sys.argv[3])), 5,"
            " source_address=(sys.argv[2], 0)).close()\nprint(time.monotonic()-t)\n")
    done = lab.exec("client", sys.executable, "-c", code, target, source, str(port))
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def counter(daemon, name: str) -> int:
    found = re.search(rf"{name}_total (\d+)", daemon.cli("status").stdout)
    return int(found[1]) if found else 0


@pytest.mark.parametrize("scan,source", [("-sS", extra4(20)), ("-sT", extra4(21)),
                                         ("-sS", extra6(22)), ("-sT", extra6(23))])
def test_a_scan_that_probes_real_ports_first_learns_none(lab, start_daemon, scan, source):
    """nmap -r probes 22, 80 and 443 (real) before any trap port: each
    first SYN waits, the trap port bans, the held SYNs are dropped."""
    daemon = start_daemon('TCP_MODE="atcp"\n', classic=scan == "-sT")  # both ways of starting
    assert "first-contact hold: 20ms (queue 7417)" in daemon.cli("status").stdout
    target = TARGET6 if ":" in source else TARGET4
    done = nmap(lab, f"{scan} -r", source, target, REAL_FIRST)
    assert source in daemon.banned()
    assert not open_ports(done.stdout), done.stdout
    assert counter(daemon, "portsentinel_first_contacts_held") >= 1
    # the ban is logged, listed and liftable; lifted, the source connects again
    daemon.wait_log(f"attackalert: Host {source} has been blocked")
    assert source in daemon.cli("list").stdout
    daemon.cli("unblock", source)
    assert can_connect(lab, source, target, 80)


@pytest.mark.parametrize("address", ["198.51.100.60", "2001:db8::60"])
def test_a_new_client_connects_on_its_first_try_and_waits_once(lab, start_daemon, address):
    daemon = start_daemon('TCP_MODE="atcp"\n')
    with newcomer(lab, address):
        first = connect_seconds(lab, address)
        assert 0.015 <= first < 0.5, first  # held ~20 ms, never a retransmission (1 s)
        assert counter(daemon, "portsentinel_first_contacts_held") == 1
        for port in (80, 443, 22):  # cleared: its later SYNs go straight through
            connect_seconds(lab, address, port)
        assert counter(daemon, "portsentinel_first_contacts_held") == 1
    assert address not in daemon.banned()


def test_the_hold_fails_open_when_the_daemon_stalls_or_dies(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\n')
    with newcomer(lab, "198.51.100.61") as address:
        daemon.proc.send_signal(signal.SIGSTOP)  # stalled: its first SYN is never released
        try:
            assert 0.9 < connect_seconds(lab, address) < 2.5  # its retransmission passes
            assert connect_seconds(lab, address) < 0.5  # and then at once
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        daemon.wait_log("first-contact hold: 1 new source passed unheld")
        assert counter(daemon, "portsentinel_first_contacts_lapsed") == 1
        assert connect_seconds(lab, address) < 0.5  # released late, cleared: never held again
    with newcomer(lab, "198.51.100.62") as address:
        held = counter(daemon, "portsentinel_first_contacts_held")
        daemon.proc.kill()  # no reader on the queue: the kernel bypasses it
        daemon.proc.wait(10)
        assert connect_seconds(lab, address) < 0.5
    assert held == 1  # the stalled one, taken once the daemon ran again


def test_stopping_hands_back_what_is_held(lab, start_daemon):
    """A client whose SYN is held as the daemon stops still connects at once."""
    daemon = start_daemon('TCP_MODE="atcp"\nFIRST_CONTACT_HOLD="1s"\n')
    with newcomer(lab, "2001:db8::61"):
        client = lab.start("client", sys.executable, "-c",
                           "import socket,time\nt=time.monotonic()\n"
                           "socket.create_connection(('2001:db8::1', 80), 5,"
                           " source_address=('2001:db8::61', 0)).close()\n"
                           "print(time.monotonic()-t)\n", stdout=subprocess.PIPE)
        time.sleep(0.3)
        assert counter(daemon, "portsentinel_first_contacts_held") == 1  # held, for 1 s
        assert client.poll() is None
        assert daemon.stop() == 0
        client.wait(10)
        seconds = float(client.stdout.read())
    assert 0.25 < seconds < 0.9, seconds  # released at the stop, not after its second
