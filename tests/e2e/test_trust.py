"""Every ban, whoever made it, is logged, listed and liftable; the ban sets
never fill silently; one address is one thing in every family."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from conftest import nmap
from netlab import ATTACKER6, TARGET4, TARGET6, extra4

from portsentinel.control import request

ATCP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'
PROBES = str(Path(__file__).resolve().parents[2] / "bench" / "probes.py")


def listed(daemon) -> dict[str, dict]:
    return {b["address"]: b for b in json.loads(daemon.cli("list", "--json").stdout)}


def test_a_ban_the_kernel_makes_alone_is_logged_listed_and_liftable(lab, start_daemon):
    """A service bound to 127.0.0.1:25 only (a local MTA) serves nobody outside:
    port 25 is a trap, and the kernel bans the first probe by itself. That ban
    used to be silent when userspace took port 25 for served: not logged, not
    listed, not liftable."""
    local_only = lab.start("target", sys.executable, "-c",
                           "import socket,time\ns=socket.socket()\n"
                           "s.bind(('127.0.0.1',25))\ns.listen()\ntime.sleep(300)")
    daemon = start_daemon(ATCP)
    source = extra4(11)
    time.sleep(0.3)
    nmap(lab, "-sS", source, TARGET4, "25")
    line = daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    assert "add element inet portsentinel ban4" in line
    daemon.wait_log("to TCP port: 25")
    bans = listed(daemon)
    assert bans[source]["origin"] == "kernel" and bans[source]["port"] == 25, bans
    assert daemon.history.read_text().count(f"Host: {source}/") == 1, daemon.history.read_text()
    status = daemon.cli("status").stdout
    assert "portsentinel_bans_total{origin=kernel} 1" in status, status
    done = daemon.cli("unblock", source)
    assert source in done.stdout and source not in daemon.banned()
    lab.stop(local_only)


def test_unblock_and_reconciliation_know_bans_made_behind_our_back(lab, start_daemon):
    daemon = start_daemon(ATCP)
    stray, found = extra4(12), extra4(13)
    for address in (stray, found):
        lab.exec("target", "nft", "add", "element", "inet", "portsentinel", "ban4",
                 f"{{ {address} timeout 1h }}", check=True)
    # unblock lifts what only the kernel holds, and says so
    done = daemon.cli("unblock", stray)
    assert f"note: {stray} was in the firewall's ban set without a record" in done.stdout
    assert stray not in daemon.banned()
    daemon.wait_log(f"Host {stray} was in the firewall's ban set without a record")
    # reconciliation records the other one
    out = daemon.cli("reconcile").stdout
    assert out == f"{found}: in the firewall only; now recorded\n", out
    daemon.wait_log("1 bans were in the firewall but not in the state")
    assert listed(daemon)[found]["origin"] == "kernel"
    # someone flushes the whole ruleset (e.g. an nftables.service restart)
    lab.exec("target", "nft", "flush", "ruleset", check=True)
    request(daemon.socket, {"command": "reconcile"})
    daemon.wait_log("firewall restored")  # at once, from the ruleset events
    assert found in daemon.banned(), "the recorded ban is back in the kernel"
    source = extra4(14)
    nmap(lab, "-sS", source, TARGET4, "20-25")  # and the trap is armed again
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel", "trapped").stdout
    assert re.search(r"add @ban4 .* counter packets [1-9]", trap), trap


def test_a_real_scanner_is_banned_after_a_flood_filled_the_ban_set(lab, start_daemon):
    daemon = start_daemon(ATCP + 'BAN_SET_SIZE="40"\nBAN_RATE_LIMIT="1000/s"\n')
    mac = re.search(r"link/ether (\S+)",
                    lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    done = lab.exec("attacker", sys.executable, PROBES, "flood", "eth0", mac, TARGET6,
                    "200", "0.5", "1", timeout=30)  # 100 spoofed sources
    assert '"sent": 100' in done.stdout, done.stdout + done.stderr
    daemon.wait_log("of BAN_SET_SIZE (40)")
    daemon.wait_log("to make room for new ones", timeout=15)
    time.sleep(1.5)
    nmap(lab, "-sS", ATTACKER6, TARGET6, "20-25")
    daemon.wait_log(f"attackalert: Host {ATTACKER6} has been blocked via dropped route")
    assert ATTACKER6 in daemon.banned()
    assert len(daemon.banned()) <= 40


def test_an_ipv4_mapped_address_is_the_ipv4_address(lab, start_daemon):
    daemon = start_daemon(ATCP)
    address = extra4(15)
    daemon.cli("block", f"::ffff:{address}")
    assert address in daemon.banned() and f"::ffff:{address}" not in daemon.banned()
    assert address in listed(daemon)
    done = daemon.cli("unblock", f"::ffff:{address}")
    assert address in done.stdout and address not in daemon.banned()
    refused = daemon.cli("block", "::ffff:127.0.0.1", check=False)
    assert refused.returncode != 0 and "never blocked" in refused.stderr


def test_an_ipv4_mapped_ban_found_in_ban6_becomes_the_ipv4_ban(lab, start_daemon):
    """Put in ban6 by hand, ::ffff:a.b.c.d matches no packet and no unblock
    found it; reconciliation makes it the IPv4 ban it means, liftable."""
    daemon = start_daemon(ATCP)
    address = extra4(17)
    lab.exec("target", "nft", "add", "element", "inet", "portsentinel", "ban6",
             f"{{ ::ffff:{address} timeout 300s }}", check=True)
    daemon.cli("reconcile")  # (or start-up adoption, if it came after the element)
    assert address in daemon.banned() and not any(":" in a for a in daemon.banned())
    assert listed(daemon)[address]["origin"] == "kernel"
    daemon.cli("unblock", address)
    assert not daemon.banned()
