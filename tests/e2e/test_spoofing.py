"""Spoofed sources: decoy scans must not make us block a legitimate client,
and hostile input must not stop the daemon."""

from __future__ import annotations

import re
import time

import pytest

import netlab
from conftest import Client, can_connect, nmap
from netlab import ATTACKER4, CLIENT4, TARGET4, TARGET6, extra4, extra6

ATCP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'


def test_decoy_scan_spoofing_the_client_blocks_only_the_attacker(lab, start_daemon):
    daemon = start_daemon(ATCP)
    client = Client(lab)
    time.sleep(3.0)  # the client has been talking to port 80 for a while (a mature peer)
    # nmap -D: every probe is sent from the client's address too
    done = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "-T4", "--max-retries", "0",
                    "-D", CLIENT4, "-e", "eth0", "-S", ATTACKER4, "-p", "1-200,443,8080",
                    TARGET4, timeout=120)
    assert done.returncode == 0, done.stderr
    daemon.wait_log(f"attackalert: Host {ATTACKER4} has been blocked via dropped route")
    daemon.wait_log(f"attackalert: Host {CLIENT4} completed a TCP handshake with this host "
                    "lately: not blocked on stateless probes")
    time.sleep(1.0)
    stats = client.finish()
    assert stats["failed"] == 0 and stats["ok"] > 10, stats
    banned = daemon.banned()
    assert ATTACKER4 in banned and CLIENT4 not in banned
    assert not can_connect(lab, ATTACKER4, TARGET4, 80)


def test_a_scanner_that_just_connected_gets_no_grace(lab, start_daemon):
    """Connecting to a real service first does not buy a connect scan the
    decoy grace: a peer is only a peer PEER_MATURITY seconds later."""
    daemon = start_daemon(ATCP)
    source = extra4(19)
    assert can_connect(lab, source, TARGET4, 80)
    done = lab.exec("attacker", "nmap", "-sT", "-Pn", "-n", "-T4", "--max-retries", "0",
                    "-e", "eth0", "-S", source, "-p", "20-25,80,443", TARGET4, timeout=60)
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert "443/tcp  open" not in done.stdout, done.stdout
    assert source in daemon.banned()
    # and it was the kernel trap that banned it, not a later, slower path
    trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel", "trapped").stdout
    assert re.search(r"add @ban4 .* counter packets [1-9]", trap), trap


def test_a_spoofed_never_seen_address_is_still_banned(lab, start_daemon):
    """Decoy grace needs a completed handshake: a made-up source is banned."""
    daemon = start_daemon(ATCP)
    source = extra4(21)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")


def test_gateway_and_resolver_are_never_blocked(lab, start_daemon, tmp_path):
    gateway = extra4(22)
    lab.ip(lab.ns["target"], "route", "add", "default", "via", gateway)
    try:
        daemon = start_daemon(ATCP)
        nmap(lab, "-sS", gateway, TARGET4, "20-25")
        time.sleep(1.0)
        assert gateway not in daemon.banned()
        assert "from host: " + gateway not in daemon.log_text()
        # the route goes away: its gateway becomes bannable again, at once
        lab.ip(lab.ns["target"], "route", "del", "default", "via", gateway)
        daemon.wait_log("ignore list loaded")
        nmap(lab, "-sS", gateway, TARGET4, "20-25")
        daemon.wait_log(f"attackalert: Host {gateway} has been blocked via dropped route")
    finally:
        lab.ip(lab.ns["target"], "route", "flush", "exact", "0.0.0.0/0")


def test_ban_rate_limit_stops_banning_keeps_detecting(lab, start_daemon):
    daemon = start_daemon('TCP_MODE="atcp"\nBAN_RATE_LIMIT="2/m"\nKERNEL_TRAP="0"\n')
    sources = [extra4(i) for i in (23, 24, 25)]
    for source in sources:
        nmap(lab, "-sS", source, TARGET4, "20-22")
    daemon.wait_log(f"from host: {sources[2]}/{sources[2]}")
    daemon.wait_log("attackalert: WARNING: ban rate limit")
    banned = daemon.banned()
    assert sources[0] in banned and sources[1] in banned and sources[2] not in banned


def test_unwritable_history_is_logged_and_blocking_goes_on(lab, start_daemon, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    daemon = start_daemon(ATCP + f'HISTORY_FILE="{blocker}/history"\n')
    source = extra4(26)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"adminalert: ERROR: cannot write {blocker}/history")
    assert source in daemon.banned()
    assert daemon.proc.poll() is None


def test_malformed_packets_do_not_stop_the_sensor(lab, start_daemon):
    daemon = start_daemon(ATCP)
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    # frames straight onto the lab's wire: bad IHL, truncated headers, later
    # fragments, an IPv6 extension-header chain longer than we walk
    code = r"""
import socket, struct, ipaddress, sys
mac = bytes.fromhex(sys.argv[1].replace(':', ''))
v4 = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
v6 = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x86DD))
src, dst = ipaddress.ip_address('198.51.100.27').packed, ipaddress.ip_address('198.51.100.1').packed
frames = []
for ihl, frag, tail in ((15, 0, b''), (5, 0, b'\x00'), (6, 0, b'\x00' * 3), (5, 0, b'\x00' * 13),
                        (5, 100, b'\x00' * 20), (1, 0, b'\x00' * 40)):
    frames.append(struct.pack('!BBHHHBBH4s4s', 0x40 | ihl, 0, 20 + len(tail), 1, frag, 64, 6, 0,
                              src, dst) + tail)
for frame in frames:
    v4.sendto(frame, ('eth0', 0x0800, 0, 0, mac))
s6, d6 = ipaddress.ip_address('2001:db8::1b').packed, ipaddress.ip_address('2001:db8::1').packed
chain = (bytes([60, 0]) + b'\x01\x04\x00\x00\x00\x00') * 12
for payload in (chain, b'\x06\x00', b''):
    v6.sendto(struct.pack('!IHBB', 0x60000000, len(payload), 60, 64) + s6 + d6 + payload,
              ('eth0', 0x86DD, 0, 0, mac))
print('sent', len(frames) + 3)
"""
    sent = lab.exec("attacker", "python3", "-c", code, mac)
    assert "sent 9" in sent.stdout, sent.stderr
    time.sleep(0.5)
    assert daemon.proc.poll() is None
    source = extra4(28)
    nmap(lab, "-sS", source, TARGET4, "20-25")  # still detecting afterwards
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert "198.51.100.27" not in daemon.banned()  # nothing parsed out of the garbage


@pytest.mark.parametrize("source, target", [(extra4(20), TARGET4), (extra6(20), TARGET6)])
def test_a_peer_that_connect_scans_is_challenged_and_banned(lab, start_daemon, source, target):
    """A peer's SYN is not enough, but a completed connection to a trap port
    is (both families: the challenge's destination NAT is written per family)."""
    daemon = start_daemon(ATCP, classic=True)
    assert can_connect(lab, source, target, 80)  # a real conversation: now a peer
    time.sleep(2.5)  # ... a mature one
    nmap(lab, "-sT", source, target, "20-25")
    daemon.wait_log(f"attackalert: Connect from host: {source}/{source} to TCP port: ")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert source in daemon.banned()
    assert not can_connect(lab, source, target, 80)


@pytest.mark.parametrize("source, target", [(extra4(24), TARGET4), (extra6(24), TARGET6)])
def test_a_peers_stateless_scan_learns_nothing(lab, start_daemon, source, target):
    """Found by an adversarial try: a peer's FIN, NULL and XMAS probes (and
    UDP datagrams) to trap ports were let through, unbanned (its address may
    be a decoy's), so the stack answered them: a RST (an ICMP unreachable)
    from every trap port, silence from the real services. Any host that had
    used the web site mapped the open ports. A peer's probe is still not
    banned, but no longer answered: every port looks alike."""
    daemon = start_daemon(ATCP)
    assert can_connect(lab, source, target, 80)  # a real conversation: now a peer
    time.sleep(2.5)  # ... a mature one
    for scan in ("-sN", "-sF", "-sX"):
        done = nmap(lab, scan, source, target, "20-25,80,443")
        assert "closed" not in done.stdout, (scan, done.stdout)
    done = nmap(lab, "-sU", source, target, "53,69,111,161")
    assert "closed" not in done.stdout, done.stdout
    daemon.wait_log(f"attackalert: Host {source} completed a TCP handshake with this host "
                    "lately: not blocked on stateless probes")
    assert source not in daemon.banned()
    assert can_connect(lab, source, target, 80)  # and its real service still answers


def test_the_challenge_works_when_the_address_is_not_on_the_incoming_interface(
        lab, start_daemon):
    """Found by an adversarial try: nftables' `redirect` drops a packet that
    came in by an interface with no address of its family (a bridge port, a
    service address on lo or a dummy interface), so a peer's connect scan met only
    dropped SYNs there and was never banned. The challenge now keeps the
    packet's own (local) destination and changes only its port."""
    lab.exec("target", "ip", "addr", "del", f"{TARGET4}/24", "dev", "eth0", check=True)
    try:
        for argv in (("addr", "add", f"{TARGET4}/32", "dev", "lo"),  # a service address
                     ("route", "add", f"{netlab.NET4}.0/24", "dev", "eth0", "src", TARGET4)):
            lab.exec("target", "ip", *argv, check=True)
        daemon = start_daemon(ATCP, classic=True)
        source = extra4(23)
        assert can_connect(lab, source, TARGET4, 80)  # a real conversation: now a peer
        time.sleep(2.5)  # ... a mature one
        nmap(lab, "-sT", source, TARGET4, "20-25")
        daemon.wait_log(f"attackalert: Connect from host: {source}/{source} to TCP port: ")
        daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
        assert not can_connect(lab, source, TARGET4, 80)
    finally:
        lab.exec("target", "ip", "addr", "del", f"{TARGET4}/32", "dev", "lo")
        lab.exec("target", "ip", "addr", "add", f"{TARGET4}/24", "dev", "eth0")


def test_a_paced_scan_that_avoids_every_trap_is_caught(lab, start_daemon):
    """Issue 7: ports above ADVANCED_PORTS_TCP only (no trap at all), at
    nmap's polite pace: the sequential test decides after ~4 first contacts."""
    daemon = start_daemon(ATCP)
    source = extra4(29)
    done = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "-T2", "--max-retries", "0",
                    "-e", "eth0", "-S", source, "-p", "2000-2012", TARGET4, timeout=120)
    assert done.returncode == 0, done.stderr
    line = daemon.wait_log(f"attackalert: Slow scan from host: {source}/{source} to TCP port: ")
    assert "failed first contacts, sequential test" in line
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert source in daemon.banned()


def test_a_client_of_the_real_services_is_not_a_slow_scanner(lab, start_daemon):
    daemon = start_daemon(ATCP)
    client = Client(lab, seconds=600)
    time.sleep(3)
    stats = client.finish()
    assert stats["failed"] == 0 and stats["ok"] > 20
    assert "Slow scan" not in daemon.log_text()
    assert netlab.CLIENT4 not in daemon.banned()
