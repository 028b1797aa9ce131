"""Legitimate traffic is never banned, by the kernel trap or by the engine,
while real scans run. Every request is counted; one failure or one ban of a
client address fails the test. The workloads are in tests/legit.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import TESTS, nmap
from netlab import ATTACKER4, ATTACKER6, CLIENT4, CLIENT6, TARGET4, TARGET6, extra4

LEGIT = str(TESTS / "legit.py")
ATCP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'
CLIENTS = (CLIENT4, CLIENT6)


@pytest.fixture(scope="module")
def extra_services(lab):
    """Keep-alive HTTP on 81 and a resetting service on 82 (target); a UDP server
    on 123 in the client namespace that answers 100 ms late."""
    procs = []
    for role, argv in (("target", ("serve", "900")), ("client", ("echo-later", "123", "900"))):
        proc = lab.start(role, sys.executable, LEGIT, *argv, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        procs.append(proc)
    yield
    for proc in procs:
        lab.stop(proc)


def run_case(lab, case: str, n: int, role: str = "client",
             targets: tuple[str, str] = (TARGET4, TARGET6)) -> dict:
    done = lab.exec(role, sys.executable, LEGIT, case, *targets, str(n), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def assert_never_banned(daemon, counts: dict, addresses=CLIENTS) -> None:
    assert counts["failed"] == 0 and counts["ok"] > 0, counts
    banned = daemon.banned()
    assert not banned & set(addresses), f"banned: {banned & set(addresses)}"
    alerts = [line for line in daemon.log_text().splitlines() if "attackalert" in line
              and any(f" {a}/" in line or f"Host {a} " in line for a in addresses)]
    assert not alerts, alerts
    listed = daemon.cli("list", "--json").stdout
    assert not {b["address"] for b in json.loads(listed)} & set(addresses), listed


def test_port_reuse_into_time_wait_is_not_a_scan(lab, start_daemon, extra_services):
    """A NAT gateway reuses a source port while the server's side of the last
    connection still waits in TIME_WAIT (the server closed first)."""
    daemon = start_daemon(ATCP)
    assert_never_banned(daemon, run_case(lab, "reuse", 3))


def test_syn_retransmitted_after_a_lost_syn_ack(lab, start_daemon, extra_services):
    """The client's second SYN meets the server's half-open request socket."""
    daemon = start_daemon(ATCP)
    lose_first_syn_ack = """
    table inet loss {
        set seen { type inet_service; flags dynamic, timeout; timeout 1m; }
        chain input { type filter hook input priority 0; policy accept;
            tcp sport 80 tcp flags & (syn | ack) == syn | ack tcp dport != @seen \
                add @seen { tcp dport } drop
        }
    }"""
    lab.exec("client", "nft", "-f", "-", input=lose_first_syn_ack, check=True)
    try:
        counts = run_case(lab, "burst", 16)
        dropped = lab.exec("client", "nft", "list", "set", "inet", "loss", "seen").stdout
    finally:
        lab.exec("client", "nft", "delete", "table", "inet", "loss")
    assert dropped.count("expires") >= 16, dropped  # every first SYN-ACK was lost
    assert_never_banned(daemon, counts)


@pytest.mark.parametrize("path", ["kernel trap", "userspace"])
def test_a_late_reply_to_this_hosts_own_query_is_not_a_probe(lab, start_daemon,
                                                             extra_services, path):
    """ntpdate-style: this host asks from UDP 123 and closes; the answer comes
    100 ms later to a port no socket serves. A reply is never a probe, whether
    the kernel trap or the engine judges it."""
    daemon = start_daemon(ATCP + ('KERNEL_TRAP="0"\n' if path == "userspace" else ""))
    counts = run_case(lab, "outgoing", 3, role="target", targets=(CLIENT4, CLIENT6))
    time.sleep(0.5)  # the late answers arrive
    assert counts["failed"] == 0, counts
    assert_never_banned(daemon, run_case(lab, "burst", 20))


def test_legitimate_clients_keep_working_while_real_scans_run(lab, start_daemon,
                                                              extra_services):
    daemon = start_daemon(ATCP)
    results: dict[str, dict] = {}
    cases = [("client", "reuse", 8), ("client", "keepalive", 20), ("client", "burst", 2500),
             ("client", "reset", 20), ("client", "latefin", 20), ("client", "udp", 100),
             ("target", "outgoing", 10)]

    def run(role, case, n):
        targets = (CLIENT4, CLIENT6) if role == "target" else (TARGET4, TARGET6)
        results[case] = run_case(lab, case, n, role=role, targets=targets)

    threads = [threading.Thread(target=run, args=c) for c in cases]
    for t in threads:
        t.start()
    time.sleep(0.5)
    nmap(lab, "-sS", ATTACKER4, TARGET4, "1-1024")
    nmap(lab, "-sS", ATTACKER6, TARGET6, "1-1024")
    nmap(lab, "-sU", ATTACKER6, TARGET6, "1-200")
    for t in threads:
        t.join(timeout=200)
    assert set(results) == {c[1] for c in cases}, results
    total = sum(r["ok"] + r["failed"] for r in results.values())
    assert total >= 2000, results
    for case, counts in results.items():
        assert counts["failed"] == 0, (case, counts)
    assert_never_banned(daemon, {"ok": total, "failed": 0})
    banned = daemon.banned()
    assert ATTACKER4 in banned and ATTACKER6 in banned, banned
    listed = {b["address"] for b in json.loads(daemon.cli("list", "--json").stdout)}
    assert {ATTACKER4, ATTACKER6} <= listed, listed


def test_a_probe_is_never_taken_for_a_reply_to_itself(lab, start_daemon):
    """The conntrack lookup finds an entry by either tuple, so a probe finds the
    entry it made itself: only an entry this host started makes a reply. The
    daemon is paused so that the probe's entry surely exists when it looks."""
    daemon = start_daemon(ATCP + 'KERNEL_TRAP="0"\n')
    source = extra4(16)
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.bind((sys.argv[1],0))\ns.sendto(b'probe',(sys.argv[2],7))")
        lab.exec("attacker", sys.executable, "-c", code, source, TARGET4, check=True)
        time.sleep(0.3)  # the probe's own conntrack entry is confirmed by now
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert source in daemon.banned()
