"""Real nmap scans against the real daemon, in network namespaces.

Each scan comes from its own attacker address so every scan type meets a
daemon that has not yet blocked its source. Throughout, a legitimate client
fetches port 80 over IPv4 and IPv6 and must never fail nor be blocked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from netlab import TARGET4, TARGET6, extra4, extra6
from conftest import Client, can_connect, nmap, nmap_argv, open_ports

PROBES = str(Path(__file__).resolve().parents[2] / "bench" / "probes.py")
REAL_TCP = {22, 80, 443, 8080}
TCP_SCAN_PORTS = "20-25,79-81,111,443,8080"
UDP_SCAN_PORTS = "53,67-69,161"


def assert_blocked(daemon, lab, source: str, alert: str, proto: str = "TCP"):
    """The 1.2 alert line, the nftables ban, the history line, and the drop."""
    host = f"{source}/{source}"
    line = daemon.wait_log(f"(?:{alert}) from host: {re.escape(host)} to {proto} port: ",
                           regex=True)
    port = int(line.rsplit(" ", 1)[1])
    daemon.wait_log(f'attackalert: Host {source} has been blocked via dropped route using '
                    f'command: "add element inet portsentinel ')
    assert source in daemon.banned()
    history = daemon.history.read_text()
    assert re.search(rf"^\d+ - \d\d/\d\d/\d{{4}} \d\d:\d\d:\d\d Host: {re.escape(host)} "
                     rf"Port: {port} {proto} Blocked$", history, re.M), history
    target = TARGET6 if ":" in source else TARGET4
    assert not can_connect(lab, source, target, 80), f"{source} still reaches port 80"
    return port


def assert_client_untouched(daemon, client_stats: dict):
    assert client_stats["ok"] > 0
    assert client_stats["failed"] == 0, client_stats
    banned = daemon.banned()
    assert netlab.CLIENT4 not in banned and netlab.CLIENT6 not in banned


ADVANCED = [
    ("-sS", extra4(10), "attackalert: TCP SYN/Normal scan", "TCP"),
    ("-sF", extra4(11), "attackalert: TCP FIN scan", "TCP"),
    ("-sN", extra4(12), "attackalert:  TCP NULL scan", "TCP"),
    ("-sX", extra4(13), "attackalert: TCP XMAS scan", "TCP"),
    # a connect scan: its SYN meets the kernel trap, or (once it has connected to a real
    # service, i.e. is a peer) the challenge: a completed connection to a trap port
    ("-sT", extra4(14), "attackalert: (?:TCP SYN/Normal scan|Connect)", "TCP"),
    ("-sU", extra4(15), "attackalert: UDP scan", "UDP"),
    ("-sS", extra6(16), "attackalert: TCP SYN/Normal scan", "TCP"),
    ("-sT", extra6(17), "attackalert: (?:TCP SYN/Normal scan|Connect)", "TCP"),
    ("-sU", extra6(18), "attackalert: UDP scan", "UDP"),
]


def test_advanced_modes_detect_and_block_every_scan_type(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\nBLOCK_TCP="1"\nBLOCK_UDP="1"\n')
    client = Client(lab)
    for scan, source, alert, proto in ADVANCED:
        ports = UDP_SCAN_PORTS if scan == "-sU" else TCP_SCAN_PORTS
        nmap(lab, scan, source, TARGET6 if ":" in source else TARGET4, ports)
        port = assert_blocked(daemon, lab, source, alert, proto)
        if scan not in ("-sF", "-sN", "-sX"):  # flags no stack sends: a probe to any port
            assert port not in REAL_TCP | {53}, "a real service's port was taken for a trap"
    assert_client_untouched(daemon, client.finish())
    log = daemon.log_text()
    assert "Ignored TCP port: 22" in log and "Ignored UDP port: 53" in log
    assert not re.search(r"(SYN/Normal scan|Connect) from .* to TCP port: (22|80|443)$", log,
                         re.M)
    assert shutil.which("fail2ban-regex"), "fail2ban missing; run scripts/test.sh"
    done = subprocess.run(["fail2ban-regex", str(daemon.history),  # fail2ban's stock filter
                           "/etc/fail2ban/filter.d/portsentry.conf"],
                          capture_output=True, text=True)
    assert f"Failregex: {len(ADVANCED)} total" in done.stdout, done.stdout


# flag combinations no TCP stack sends (nmap's OS fingerprint sends them to open ports)
BOGUS = [
    ("-sN", extra4(30), "attackalert:  TCP NULL scan"),
    ("-sX", extra4(31), "attackalert: TCP XMAS scan"),
    ("-sS --scanflags SYNFIN", extra4(32),
     "attackalert: Unknown Type: TCP Packet Flags: SYN: 1 FIN: 1 ACK: 0 PSH: 0 URG: 0 RST: 0"),
    ("-sS --scanflags SYNRST", extra6(33),
     "attackalert: Unknown Type: TCP Packet Flags: SYN: 1 FIN: 0 ACK: 0 PSH: 0 URG: 0 RST: 1"),
    ("-sF", extra6(34), "attackalert: TCP FIN scan"),
    ("-sS --scanflags FINRST", extra6(35),
     "attackalert: Unknown Type: TCP Packet Flags: SYN: 0 FIN: 1 ACK: 0 PSH: 0 URG: 0 RST: 1"),
]


def test_flags_no_tcp_stack_sends_are_probes_even_to_served_ports(lab, start_daemon):
    """Issue 19: a served port was never a trap, so NULL, XMAS, FIN and
    SYN+FIN probes to real services (nmap -O's T2/T3) went unseen. No real
    stack sends them: banned in the kernel like a trap hit, while the
    legitimate client keeps using those very ports."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
    client = Client(lab)
    for scan, source, alert in BOGUS:
        nmap(lab, scan, source, TARGET6 if ":" in source else TARGET4, "22,80,443")
        port = assert_blocked(daemon, lab, source, re.escape(alert))
        assert port in REAL_TCP, port
    for source in (extra4(35), extra6(36)):  # nmap -O's probes to open ports, both families
        nmap(lab, "-O", source, TARGET6 if ":" in source else TARGET4, "22,80")
        assert_blocked(daemon, lab, source, "attackalert: .*")
    assert_client_untouched(daemon, client.finish())


def test_excluded_ports_and_ip_options(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\nADVANCED_EXCLUDE_TCP="21,23"\n')
    nmap(lab, "-sS", extra4(19), TARGET4, "21,23")  # only excluded ports: no alert
    assert extra4(19) not in daemon.banned()
    assert "Advanced mode will manually exclude port: 23" in daemon.log_text()
    source = extra4(18)
    done = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "--max-retries", "0",
                    "--ip-options", r"\x01\x01\x01\x01", "-e", "eth0", "-S", source,
                    "-p", "24", TARGET4, timeout=60)
    assert done.returncode == 0, done.stderr
    daemon.wait_log(f"attackalert: Packet from host: {source}/{source} to TCP port: 24 "
                    "has IP options set (detection avoidance technique).")
    assert source in daemon.banned()


def test_a_service_started_later_is_not_a_trap(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\n')
    late = lab.start("target", "python3", "-c",
                     "import socket,time\ns=socket.socket(socket.AF_INET6)\n"
                     "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
                     "s.bind(('::', 631)); s.listen(); print('up', flush=True); time.sleep(60)",
                     stdout=subprocess.PIPE)
    assert late.stdout.readline().strip() == b"up"
    client_check = lab.exec("client", "python3", "-c",
                            "import socket; socket.create_connection(('198.51.100.1', 631), 2)"
                            ".close(); print('ok')")
    assert client_check.stdout.strip() == "ok", client_check.stderr
    assert netlab.CLIENT4 not in daemon.banned()
    assert "to TCP port: 631" not in daemon.log_text()
    lab.stop(late)


def test_classic_modes_count_completed_connections(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="tcp"\nUDP_MODE="udp"\n'
                          'TCP_PORTS="1,11,15,79,111"\nUDP_PORTS="7,9,69,161"\n'
                          'PORT_BANNER="GO AWAY"\n')
    client = Client(lab)
    assert "Going into listen mode on TCP port: 111" in daemon.log_text()
    nmap(lab, "-sT", extra4(20), TARGET4, "1-25,79-81,111")
    assert_blocked(daemon, lab, extra4(20), "attackalert: Connect", "TCP")
    nmap(lab, "-sU", extra4(21), TARGET4, "7,9,53,69,161")
    assert_blocked(daemon, lab, extra4(21), "attackalert: Connect", "UDP")
    nmap(lab, "-sT", extra6(22), TARGET6, "1-25,79-81,111")
    assert_blocked(daemon, lab, extra6(22), "attackalert: Connect", "TCP")
    # a SYN scan never completes a handshake: tcp mode must not react to it
    nmap(lab, "-sS", extra4(23), TARGET4, "1,11,15")
    assert extra4(23) not in daemon.banned()
    assert_client_untouched(daemon, client.finish())


def test_stealth_modes_watch_only_the_listed_ports(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="stcp"\nUDP_MODE="sudp"\n'
                          'TCP_PORTS="1,11,15,79,111"\nUDP_PORTS="7,9,69,161"\n')
    client = Client(lab)
    assert "Going into stealth listen mode on TCP port: 111" in daemon.log_text()
    nmap(lab, "-sS", extra4(24), TARGET4, "20-25,80,443")  # no listed port: no alert
    assert extra4(24) not in daemon.banned()
    assert can_connect(lab, extra4(24), TARGET4, 80)
    nmap(lab, "-sX", extra4(25), TARGET4, "1,11,15,22,80")
    assert_blocked(daemon, lab, extra4(25), "attackalert: TCP XMAS scan", "TCP")
    nmap(lab, "-sU", extra6(26), TARGET6, "7,9,53,69")
    assert_blocked(daemon, lab, extra6(26), "attackalert: UDP scan", "UDP")
    assert_client_untouched(daemon, client.finish())


@pytest.mark.skipif(not shutil.which("iptables"), reason="iptables missing")
def test_kill_route_hosts_deny_and_run_cmd(lab, start_daemon, tmp_path):
    marks = tmp_path / "ran"
    marks.mkdir()
    iptables = shutil.which("iptables")
    daemon = start_daemon(
        'TCP_MODE="atcp"\nBLOCK_TCP="1"\nBLOCK_NFTABLES="0"\n'  # 1.2's way: KILL_ROUTE only
        f'KILL_ROUTE="{iptables} -I INPUT -s $TARGET$ -j DROP"\n'
        'KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n'
        f'KILL_RUN_CMD="/usr/bin/touch {marks}/$TARGET$-$PORT$-$MODE$"\n')
    client = Client(lab)
    source = extra4(27)
    nmap(lab, "-sS", source, TARGET4, TCP_SCAN_PORTS)
    route = daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert f'"{iptables} -I INPUT -s {source} -j DROP"' in route
    daemon.wait_log(f"attackalert: External command run for host: {source}")
    rules = lab.exec("target", "iptables", "-S", "INPUT").stdout
    assert f"-A INPUT -s {source}/32 -j DROP" in rules
    assert rules.count(source) == 1
    assert f"ALL: {source} : DENY" in daemon.hosts_deny.read_text().splitlines()
    ran = [p.name for p in marks.iterdir()]
    assert len(ran) == 1 and re.fullmatch(rf"{re.escape(source)}-\d+-atcp", ran[0])
    log = daemon.log_text()
    order = [log.index(f"via wrappers with string: \"ALL: {source} : DENY\""),
             log.index(f"Host {source} has been blocked via dropped route"),
             log.index(f"External command run for host: {source}")]
    assert order == sorted(order), "1.2 order: hosts.deny, KILL_ROUTE, KILL_RUN_CMD"
    assert "inet portsentinel" not in lab.exec("target", "nft", "list", "tables").stdout
    assert not can_connect(lab, source, TARGET4, 80)
    assert_client_untouched(daemon, client.finish())


def test_block_0_only_logs(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\nBLOCK_TCP="0"\n')
    source = extra4(28)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: TCP SYN/Normal scan from host: {source}/{source}")
    daemon.wait_log("attackalert: Ignoring TCP response per configuration file setting.")
    assert source not in daemon.banned()
    assert not daemon.history.exists() or source not in daemon.history.read_text()
    assert can_connect(lab, source, TARGET4, 80)


def test_failed_kill_route_is_reported_and_retried(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\nBLOCK_TCP="1"\nBLOCK_NFTABLES="0"\n'
                          'KILL_ROUTE="/bin/false $TARGET$"\n')
    source = extra4(29)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log("kill_route for host " + source + " failed: exit status 1")
    daemon.wait_log(f"attackalert: ERROR: Could not block host {source} !!")
    assert not daemon.history.exists() or source not in daemon.history.read_text()


def test_shutdown_is_clean_and_keeps_bans(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\n', classic=True)
    source = extra6(29)
    nmap(lab, "-sS", source, TARGET6, "20-25")
    daemon.wait_log("has been blocked via dropped route")
    assert daemon.stop() == 0
    assert "adminalert: PortSentry is shutting down" in daemon.log_text()
    assert source in daemon.banned()  # the kernel keeps enforcing it


def test_first_contact_delay_leaves_nothing_to_learn(lab, start_daemon):
    """FIRST_CONTACT_DELAY: even when nmap's first probe is a real service, its
    SYN is dropped once; the retransmission meets the ban."""
    daemon = start_daemon('TCP_MODE="atcp"\nFIRST_CONTACT_DELAY="1"\n')
    for source in (extra4(16), extra4(17), extra6(19)):
        target = TARGET6 if ":" in source else TARGET4
        done = nmap(lab, "-sS", source, target, "22,80,443,8080,21,23,25,110,111,135,139,445")
        assert source in daemon.banned()
        assert not open_ports(done.stdout), done.stdout
    # a legitimate newcomer: its first SYN is dropped, the retransmission gets through.
    # A new address: earlier tests left TIME_WAIT sockets of the client's own
    # connections, and a SYN that finds one is no stranger's (rightly not delayed)
    newcomer = "198.51.100.40"
    lab.exec("client", "ip", "addr", "add", f"{newcomer}/24", "dev", "eth0", check=True)
    fetch = ("import socket,time; t=time.monotonic(); "
             f"socket.create_connection(('198.51.100.1', 80), 5, ('{newcomer}', 0)).close(); "
             "print(round(time.monotonic() - t, 2))")
    try:
        done = lab.exec("client", "python3", "-c", fetch)
    finally:
        lab.exec("client", "ip", "addr", "del", f"{newcomer}/24", "dev", "eth0")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) >= 0.5  # one retransmission later
    assert newcomer not in daemon.banned()


IDLE_ECHO = """
import socket, sys, time
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 515)); s.listen(); print("up", flush=True)
s.settimeout(60)
conns = [s.accept()[0] for _ in range(2)]
for c in conns:
    c.settimeout(30)
for _ in range(3):
    for c in conns:
        c.sendall(c.recv(100))
"""
IDLE_CLIENT = """
import socket, sys, time
conns = [socket.create_connection((t, 515), 5) for t in sys.argv[1:]]
for c in conns:
    c.settimeout(5)
for i in range(3):
    for c in conns:
        c.sendall(b"ping"); assert c.recv(100) == b"ping"
    time.sleep(4)  # connection tracking forgets the connection meanwhile
print("ok")
"""


def test_ack_scans_are_banned_but_late_acks_and_a_peers_acks_are_not(lab, start_daemon):
    """Issue 19: nmap -sA/-sW/-sM went unseen. An ACK no connection expects,
    to ACK_SCAN_TRIGGER distinct unserved trap ports, is a scan. A keep-alive
    client whose connection tracking entry expired (its next ACKs look new,
    to a served port), and a peer's own ACK scan (a spoofable probe), are
    never banned."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
    timeout = "net.netfilter.nf_conntrack_tcp_timeout_established"
    old = lab.exec("target", "sysctl", "-n", timeout, check=True).stdout.strip()
    lab.exec("target", "sysctl", "-qw", f"{timeout}=2", check=True)
    echo = lab.start("target", "python3", "-c", IDLE_ECHO, stdout=subprocess.PIPE)
    try:
        assert echo.stdout.readline().strip() == b"up"
        idle = lab.start("client", "python3", "-c", IDLE_CLIENT, TARGET4, TARGET6,
                         stdout=subprocess.PIPE)
        for scan, source in (("-sA", extra4(36)), ("-sW", extra6(36)), ("-sM", extra4(37)),
                             ("-sS --scanflags SYNACK", extra6(37)), ("-sA", extra6(38)),
                             ("-sW", extra4(39)), ("-sM", extra6(39))):
            done = nmap(lab, scan, source, TARGET6 if ":" in source else TARGET4,
                        "20-25,79-81,111")
            assert_blocked(daemon, lab, source, "attackalert: TCP ACK scan")
            # banned in the kernel at the 5th distinct trap port: at most 4 of them
            # answered (served ports count for nothing, before the ban they answer)
            answered = {int(p) for p in re.findall(r"(\d+)/(?:unfiltered|closed|open)/tcp",
                                                   done.stdout)} - REAL_TCP
            assert len(answered) <= 4, done.stdout
        listed = daemon.cli("list").stdout
        assert re.search(rf"^{re.escape(extra4(37))} .*kernel", listed, re.M), listed
        # pardoned: its next late ACK is one ACK again, not the rest of a scan; the
        # ports it probed before count again
        daemon.cli("unblock", extra4(36))
        nmap(lab, "-sA", extra4(36), TARGET4, "30")
        time.sleep(0.5)
        assert extra4(36) not in daemon.banned()
        done = nmap(lab, "-sA", extra4(36), TARGET4, "20-25,79-81,111")
        assert extra4(36) in daemon.banned(), done.stdout
        # four ports, then a fifth within the window but after a pause: the kernel's
        # count bans it too (the fifth port learns nothing)
        slow = extra4(38)
        nmap(lab, "-sA", slow, TARGET4, "20,21,23,24")
        time.sleep(16)
        done = nmap(lab, "-sA", slow, TARGET4, "25")
        assert "25/unfiltered" not in done.stdout, done.stdout
        daemon.wait_log(f"attackalert: TCP ACK scan from host: {slow}/{slow}")
        listed = daemon.cli("list").stdout
        assert re.search(rf"^{re.escape(slow)} .*kernel", listed, re.M), listed
        peer = lab.exec("client", "nmap", "-sA", "-Pn", "-n", "--max-retries", "0",
                        "-p", "20-25,79-81,111", TARGET4, timeout=60)
        assert peer.returncode == 0, peer.stderr
        assert idle.wait(timeout=30) == 0 and idle.stdout.read().strip() == b"ok"
        daemon.wait_log(f"attackalert: Host {netlab.CLIENT4} completed a TCP handshake")
        banned = daemon.banned()
        assert netlab.CLIENT4 not in banned and netlab.CLIENT6 not in banned, banned
    finally:
        lab.exec("target", "sysctl", "-qw", f"{timeout}={old}")
        lab.stop(echo)


def test_an_ack_scan_slower_than_the_kernels_bucket_is_banned_by_the_daemon(
        lab, start_daemon):
    """Found by an adversarial try: one ACK to a new trap port a little
    slower than one a window never overflowed the kernel's bucket (it gets a
    port back each window), so the scan went on unseen. The daemon is told
    of each port and counts them over five windows: the fifth bans, made by
    the daemon. A keep-alive client whose connection tracking entries expire
    meanwhile is not touched."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\nACK_SCAN_WINDOW="2s"\n')
    timeout = "net.netfilter.nf_conntrack_tcp_timeout_established"
    old = lab.exec("target", "sysctl", "-n", timeout, check=True).stdout.strip()
    lab.exec("target", "sysctl", "-qw", f"{timeout}=2", check=True)
    echo = lab.start("target", "python3", "-c", IDLE_ECHO, stdout=subprocess.PIPE)
    try:
        assert echo.stdout.readline().strip() == b"up"
        idle = lab.start("client", "python3", "-c", IDLE_CLIENT, TARGET4, TARGET6,
                         stdout=subprocess.PIPE)
        slow = extra6(35)
        # one every 2.2 s, on a fixed schedule (however long each nmap takes):
        # slower than the bucket's refill, yet the five span 8.8 s of the 10
        scans, start = [], time.monotonic()
        for n, port in enumerate((20, 21, 23, 24, 79)):
            time.sleep(max(0.0, start + 2.2 * n - time.monotonic()))
            scans.append(lab.start("attacker", *nmap_argv("-sA", slow, TARGET6, str(port))))
        assert all(scan.wait(timeout=60) == 0 for scan in scans)
        daemon.wait_log(f"attackalert: TCP ACK scan from host: {slow}/{slow} to TCP port: 79")
        assert slow in daemon.banned()
        listed = daemon.cli("list").stdout
        assert re.search(rf"^{re.escape(slow)} .*local", listed, re.M), listed
        assert idle.wait(timeout=30) == 0 and idle.stdout.read().strip() == b"ok"
        banned = daemon.banned()
        assert netlab.CLIENT4 not in banned and netlab.CLIENT6 not in banned, banned
    finally:
        lab.exec("target", "sysctl", "-qw", f"{timeout}={old}")
        lab.stop(echo)


def test_a_flood_past_the_evidence_log_limit_is_said(lab, start_daemon):
    """Found by an adversarial try: a spoofed ACK flood past the kernel's
    log limit for ACK-family probes (2,000 a second) hid a slow ACK scan,
    which only the daemon counts, and nothing said so. The kernel now tells
    the daemon, at most once a second, that probes went unreported; the
    daemon warns, at most once a minute."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show",
                                                  "eth0").stdout)[1]
    flood = lab.exec("attacker", sys.executable, PROBES, "flood", "eth0", mac, TARGET6,
                     "8000", "2", "23", "ack", timeout=30)
    assert flood.returncode == 0, flood.stderr
    line = daemon.wait_log("adminalert: WARNING: more ACK-family, IP protocol or transport "
                           "probes than")
    assert "a scan slower than the kernel's bucket can go unseen" in line, line
    assert daemon.log_text().count("probes than") == 1  # once a minute, not once a second


def test_an_ip_protocol_scan_is_banned_but_one_tunnels_protocol_is_not(lab, start_daemon):
    """Issue 19: nmap -sO (which IP protocols does the host speak?) went
    unseen. PROTO_SCAN_TRIGGER (4) distinct protocols other than TCP, UDP and
    ICMP ban, in the kernel; one protocol (a GRE or ESP peer's) never does."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
    tunnel = extra4(39)
    nmap(lab, "-sO", tunnel, TARGET4, "47,50")  # GRE, ESP: two protocols, no scan
    time.sleep(0.5)
    assert tunnel not in daemon.banned()
    for source in (extra4(38), extra6(38)):
        done = nmap(lab, "-sO", source, TARGET6 if ":" in source else TARGET4, "1-255")
        line = daemon.wait_log(f"attackalert: IP protocol scan from host: {source}/{source} "
                               "to IP protocol: ")
        assert source in daemon.banned(), done.stdout
        daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
        history = daemon.history.read_text()
        assert re.search(rf"Host: {re.escape(source)}/{re.escape(source)} Port: "
                         rf"{line.rsplit(' ', 1)[1]} IP Blocked$", history, re.M), history
    listed = daemon.cli("list").stdout
    assert re.search(rf"^{re.escape(extra4(38))} .*kernel", listed, re.M), listed
    daemon.cli("unblock", extra4(38))
    assert extra4(38) not in daemon.banned()


TUNNEL = """
import socket, sys, time
socks = []
for proto in (47, 50):  # GRE and ESP, as a tunnel's peer sends them
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.bind((sys.argv[1], 0)); socks.append(s)
for _ in range(28):
    for s in socks:
        s.sendto(b"\\0" * 24, (sys.argv[2], 0)); time.sleep(0.25)
"""


def test_a_tunnels_two_protocols_never_ban_however_long_it_runs(lab, start_daemon):
    """Found by an adversarial try: a GRE+ESP peer was banned after two
    minutes. Its (source, protocol) pairs were remembered for the window
    only, so each came back as new, and two a window drained a bucket that
    gets one back. Pairs seen again are remembered while they go on."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\nPROTO_SCAN_WINDOW="2s"\n')
    peer = extra4(37)
    sent = lab.exec("attacker", "python3", "-c", TUNNEL, peer, TARGET4, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr  # 14 s: seven windows
    time.sleep(0.5)
    assert peer not in daemon.banned()
    assert "IP protocol scan" not in daemon.log_text()


UDPLITE_SERVICE = """
import socket, sys
socks = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port in range(7000, 7006):  # six ports: more than ACK_SCAN_TRIGGER
        s = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDPLITE)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port)); s.setblocking(False); socks.append(s)
print("up", flush=True)
import select
while True:
    for s in select.select(socks, [], [], 30)[0]:
        data, peer = s.recvfrom(2048); s.sendto(data, peer)
"""
UDPLITE_CLIENT = """
import socket, sys
source, target, first, last, answers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
fresh = sys.argv[6:] == ["fresh"]  # a new socket (a new local port) for each datagram
family = socket.AF_INET6 if ":" in target else socket.AF_INET
def new():
    s = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDPLITE)
    s.bind((source, 0)); s.settimeout(2)
    return s
s = new()
got = 0
for _ in range(3):  # and again: a client's retries are one port each
    for port in range(first, last + 1):
        s = new() if fresh else s
        s.sendto(b"hello", (target, port))
        if answers:
            got += s.recvfrom(100)[0] == b"hello"
print(got)
"""
# a DCCP Request (RFC 4340: 16-byte generic header with 48-bit sequence numbers, then
# the service code), sent raw: this kernel need not speak DCCP for a scanner to send it
DCCP_REQUESTS = """
import socket, struct, sys
source, target, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in target else socket.AF_INET
s = socket.socket(family, socket.SOCK_RAW, 33)
s.bind((source, 0))
for port in range(first, last + 1):
    header = struct.pack("!HHBBHBBHI", 40000, port, 5, 0, 0, 0 << 1 | 1, 0, 0, 1) + b"\\0" * 4
    s.sendto(header, (target, 0))
"""


def test_sctp_udplite_and_dccp_port_scans_are_banned_but_their_clients_are_not(
        lab, start_daemon):
    """Issue 19: SCTP (nmap -sY, -sZ), UDP-Lite and DCCP port scans counted as
    one IP protocol each, so a scan of a thousand SCTP ports went unbanned.
    Their opening packets (SCTP INIT / COOKIE ECHO, a UDP-Lite datagram, a
    DCCP Request) to ports no socket serves are evidence as ACK-family probes
    are: ACK_SCAN_TRIGGER (5) distinct ports ban, in the kernel. A UDP-Lite
    client of six served ports, one retrying one unserved port, and the
    answers to this host's own UDP-Lite client (18 new local ports) are
    never banned."""
    service = lab.start("target", "python3", "-c", UDPLITE_SERVICE, stdout=subprocess.PIPE)
    remote = lab.start("client", "python3", "-c", UDPLITE_SERVICE, stdout=subprocess.PIPE)
    try:
        assert service.stdout.readline().strip() == b"up"
        assert remote.stdout.readline().strip() == b"up"
        daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
        for target, source in ((netlab.CLIENT4, TARGET4), (netlab.CLIENT6, TARGET6)):
            done = lab.exec("target", "python3", "-c", UDPLITE_CLIENT, source, target,
                            "7000", "7005", "1", "fresh", timeout=30)
            assert done.stdout.strip() == "18", done.stdout + done.stderr
        for target, source in ((TARGET4, netlab.CLIENT4), (TARGET6, netlab.CLIENT6)):
            done = lab.exec("client", "python3", "-c", UDPLITE_CLIENT, source, target,
                            "7000", "7005", "1", timeout=30)
            assert done.stdout.strip() == "18", done.stdout + done.stderr
            done = lab.exec("client", "python3", "-c", UDPLITE_CLIENT, source, target,
                            "9000", "9000", "0", timeout=30)  # a service that is down
            assert done.returncode == 0, done.stderr
        time.sleep(0.5)
        banned = daemon.banned()
        assert netlab.CLIENT4 not in banned and netlab.CLIENT6 not in banned, banned
        assert "UDP-Lite scan" not in daemon.log_text()
        for scan, source, name in (("-sY", extra4(30), "SCTP INIT scan"),
                                   ("-sY", extra6(30), "SCTP INIT scan"),
                                   ("-sZ", extra4(31), "SCTP COOKIE-ECHO scan")):
            done = nmap(lab, scan, source, TARGET6 if ":" in source else TARGET4, "1-1000")
            port = assert_blocked(daemon, lab, source, f"attackalert: {name}", "SCTP")
            assert 1 <= port <= 1000
        for source in (extra4(32), extra6(32)):
            target = TARGET6 if ":" in source else TARGET4
            done = lab.exec("attacker", "python3", "-c", UDPLITE_CLIENT, source, target,
                            "100", "120", "0", timeout=30)
            assert done.returncode == 0, done.stderr
            daemon.wait_log(f"attackalert: UDP-Lite scan from host: {source}/{source} to "
                            "UDP-Lite port: ")
            assert source in daemon.banned()
        for source in (extra4(33), extra6(33)):
            target = TARGET6 if ":" in source else TARGET4
            done = lab.exec("attacker", "python3", "-c", DCCP_REQUESTS, source, target,
                            "100", "120", timeout=30)
            assert done.returncode == 0, done.stderr
            daemon.wait_log(f"attackalert: DCCP Request scan from host: {source}/{source} to "
                            "DCCP port: ")
            assert source in daemon.banned()
        listed = daemon.cli("list").stdout
        assert re.search(rf"^{re.escape(extra4(30))} .*repeated", listed, re.M), listed
        daemon.cli("unblock", extra4(30))
        assert extra4(30) not in daemon.banned()
        banned = daemon.banned()
        assert netlab.CLIENT4 not in banned and netlab.CLIENT6 not in banned, banned
    finally:
        lab.stop(service)
        lab.stop(remote)


THREE_PROTOCOLS = """
import socket, sys
for proto in (47, 50, 4):  # GRE, ESP, IP in IP
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.bind((sys.argv[1], 0)); s.sendto(b"\\0" * 24, (sys.argv[2], 0))
"""
RAW_SCTP_INITS = """
import socket, struct, sys, time
source, target, first, last, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET, socket.SOCK_RAW, 132)
s.bind((source, 0))
for port in range(first, last + 1):
    s.sendto(struct.pack("!HHII", 40000, port, 0, 0) + bytes([1, 0, 0, 20]) + bytes(16),
             (target, 0))
    time.sleep(gap)
"""


def test_transport_evidence_spares_new_services_and_survives_floods_and_pauses(
        lab, start_daemon):
    """Found by an adversarial try of the above: (1) a client of a five-port
    UDP-Lite service started after the daemon was banned before the served
    ports' poll knew them: the kernel now only counts, and the daemon asks at
    the fifth port whether it is served; (2) that client's datagrams also
    counted as one IP protocol toward -sO's four; (3) a spoofed flood drained
    the one rate limit before anything was counted, so a real scan went
    unbanned; (4) a scanner pausing longer than the window between rounds of
    four ports got a fresh bucket each round. A second try: (5) that client's
    served ports drained the kernel's bucket, so one probe of an unserved
    port banned it: only ports the daemon finds unserved count now; (6) a
    peer (the legitimate client, a completed handshake) sending them is
    never banned."""
    daemon = start_daemon('TCP_MODE="atcp"\nUDP_MODE="audp"\nACK_SCAN_WINDOW="3s"\n')
    client = Client(lab)
    service = lab.start("target", "python3", "-c", UDPLITE_SERVICE, stdout=subprocess.PIPE)
    try:
        assert service.stdout.readline().strip() == b"up"  # after the daemon's poll
        done = lab.exec("client", "python3", "-c", UDPLITE_CLIENT, netlab.CLIENT4, TARGET4,
                        "7000", "7005", "1", timeout=30)
        assert done.stdout.strip() == "18", done.stdout + done.stderr
        lab.exec("client", "python3", "-c", RAW_SCTP_INITS, netlab.CLIENT4, TARGET4, "3301",
                 "3301", "0", timeout=30)  # one SCTP INIT to a port nothing serves
        done = lab.exec("client", "python3", "-c", THREE_PROTOCOLS, netlab.CLIENT4, TARGET4,
                        timeout=30)
        assert done.returncode == 0, done.stderr  # with UDP-Lite four: -sO's trigger
        time.sleep(0.5)
        assert netlab.CLIENT4 not in daemon.banned()
        assert "UDP-Lite scan" not in daemon.log_text()
    finally:
        lab.stop(service)
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show",
                                                  "eth0").stdout)[1]
    flood = lab.start("attacker", sys.executable, PROBES, "flood", "eth0", mac, TARGET6,
                      "15000", "3", "9", "udplite", stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)  # the flood under way
        scan = lab.exec("attacker", "python3", "-c", RAW_SCTP_INITS, extra6(31), TARGET6,
                        "700", "719", "0.02", timeout=30)
        assert scan.returncode == 0, scan.stderr
        daemon.wait_log(f"attackalert: SCTP INIT scan from host: {extra6(31)}/{extra6(31)}")
    finally:
        assert flood.wait(timeout=30) == 0
    slow = extra4(32)
    for first in (800, 810):  # four ports, a pause past the window, four more
        lab.exec("attacker", "python3", "-c", RAW_SCTP_INITS, slow, TARGET4, str(first),
                 str(first + 3), "0.05", timeout=30)
        time.sleep(4)
    daemon.wait_log(f"attackalert: SCTP INIT scan from host: {slow}/{slow}")
    assert slow in daemon.banned()
    time.sleep(3)  # the client a mature peer for a while now (it is a peer since its start)
    for source, target in ((netlab.CLIENT4, TARGET4), (netlab.CLIENT6, TARGET6)):
        lab.exec("client", "python3", "-c", RAW_SCTP_INITS, source, target, "900", "907",
                 "0.01", timeout=30)  # a peer's stateless probes: spoofable, never a ban
    daemon.wait_log(f"from host: {netlab.CLIENT6}/{netlab.CLIENT6} to SCTP port: ")
    assert_client_untouched(daemon, client.finish())
