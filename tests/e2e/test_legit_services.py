"""Clients of services that are momentarily down, forwarded, or answering a
broadcast are never banned (found by trying it as an adversarial user)."""

from __future__ import annotations

import sys
import time

from conftest import nmap
from netlab import ATTACKER4, CLIENT4, TARGET4

ATCP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'
NEWCOMERS = ("198.51.100.41", "198.51.100.42", "198.51.100.43", "198.51.100.44")


def with_newcomers(lab):
    for address in NEWCOMERS:
        lab.exec("client", "ip", "addr", "add", f"{address}/24", "dev", "eth0", check=True)


def without_newcomers(lab):
    for address in NEWCOMERS:
        lab.exec("client", "ip", "addr", "del", f"{address}/24", "dev", "eth0")


def connect(lab, source: str, port: int, target: str = TARGET4) -> str:
    code = ("import socket,sys\n"
            "try:\n"
            " s=socket.create_connection((sys.argv[1],int(sys.argv[2])),2,(sys.argv[3],0))\n"
            " s.settimeout(2); print('ok', s.recv(64)); s.close()\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print('failed', e)\n")
    return lab.exec("client", sys.executable, "-c", code, target, str(port), source).stdout


def udp_send(lab, source: str, port: int, source_port: int = 0) -> None:
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.bind((sys.argv[3],int(sys.argv[4])))\ns.sendto(b'x',(sys.argv[1],int(sys.argv[2])))")
    lab.exec("client", sys.executable, "-c", code, TARGET4, str(port), source, str(source_port),
             check=True)


def short_service(lab, kind: str, port: int, seconds: float):
    code = ("import socket,sys,time\n"
            f"s=socket.socket(socket.AF_INET6,socket.{kind})\n"
            "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('::',{port}))\n"
            + ("s.listen()\ns.settimeout(0.2)\nt=time.time()\n"
               f"while time.time()-t<{seconds}:\n"
               " try: c,_=s.accept(); c.sendall(b'up\\n'); c.close()\n"
               " except OSError: pass\n" if kind == "SOCK_STREAM" else
               f"time.sleep({seconds})\n"))
    return lab.start("target", sys.executable, "-c", code)


def test_clients_of_a_restarting_service_are_not_banned(lab, start_daemon):
    """A service below 1024 restarts (systemctl restart sshd) while clients
    reconnect: for SERVICE_MEMORY its port is no trap, for strangers and peers.
    Both services live 3 s, less than the daemon's served-ports poll: the
    kernel learned their ports from their first clients' packets."""
    daemon = start_daemon(ATCP)
    with_newcomers(lab)
    try:
        tcp = short_service(lab, "SOCK_STREAM", 444, 3.0)
        udp = short_service(lab, "SOCK_DGRAM", 514, 3.0)
        time.sleep(1.5)
        assert connect(lab, CLIENT4, 444).startswith("ok")  # the client: a peer soon
        udp_send(lab, CLIENT4, 514)  # a syslog client
        time.sleep(2.5)  # both services are down now (restarting)
        assert tcp.poll() is not None and udp.poll() is not None
        assert connect(lab, NEWCOMERS[0], 444).startswith("refused")  # a stranger
        assert connect(lab, CLIENT4, 444).startswith("refused")  # a peer: not challenged
        udp_send(lab, NEWCOMERS[1], 514)
        time.sleep(0.5)
        banned = daemon.banned()
        assert not banned & {CLIENT4, *NEWCOMERS}, banned
        assert "attackalert" not in daemon.log_text()
    finally:
        without_newcomers(lab)


def test_clients_of_forwarded_ports_are_not_banned(lab, start_daemon):
    """Port forwards (a container's published port, a redirect): the packet
    sensor sees the port before NAT, where no socket is; the kernel sees it
    after. Neither the trap nor the slow-scan test may take it for a scan."""
    daemon = start_daemon(ATCP)
    forwards = """
    table ip forwards {
        chain prerouting { type nat hook prerouting priority dstnat; policy accept;
            tcp dport 555 redirect to :22
            udp dport 554 redirect to :53
            tcp dport { 9001, 9002, 9003, 9004, 9005 } redirect to :8080
        }
    }"""
    lab.exec("target", "nft", "-f", "-", input=forwards, check=True)
    with_newcomers(lab)
    try:
        for source in NEWCOMERS[:2]:
            assert connect(lab, source, 555).startswith("ok"), source
        udp_send(lab, NEWCOMERS[2], 554)
        for port in (9001, 9002, 9003, 9004, 9005):  # five forwarded ports, one client
            assert connect(lab, NEWCOMERS[3], port).startswith("ok"), port
        time.sleep(0.5)
        banned = daemon.banned()
        assert not banned & set(NEWCOMERS), banned
        assert "attackalert" not in daemon.log_text(), daemon.log_text()[-1500:]
        nmap(lab, "-sS", ATTACKER4, TARGET4, "20-25")  # a real scan is still banned
        daemon.wait_log(f"attackalert: Host {ATTACKER4} has been blocked via dropped route")
    finally:
        without_newcomers(lab)
        lab.exec("target", "nft", "delete", "table", "ip", "forwards")


def test_an_answer_to_this_hosts_dhcp_broadcast_is_not_a_scan(lab, start_daemon):
    """A DHCP server answers this host's broadcast to port 68, which connection
    tracking cannot pair with the broadcast query."""
    daemon = start_daemon(ATCP)
    with_newcomers(lab)
    try:
        udp_send(lab, NEWCOMERS[0], 68, source_port=67)
        udp_send(lab, NEWCOMERS[0], 69)  # while another port stays a trap
        daemon.wait_log(f"UDP scan from host: {NEWCOMERS[0]}/{NEWCOMERS[0]} to UDP port: 69")
        assert "to UDP port: 68" not in daemon.log_text()
    finally:
        without_newcomers(lab)
