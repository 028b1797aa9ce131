"""Faults a production host meets: the daemon goes on and nothing is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import can_connect, nmap
from netlab import CLIENT4, TARGET4, TARGET6, extra4

PROBES = str(Path(__file__).resolve().parents[2] / "bench" / "probes.py")

ATCP = 'TCP_MODE="atcp"\nUDP_MODE="audp"\n'
HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock: every other writer waits, then fails
db.execute("CREATE TABLE IF NOT EXISTS held (x)")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def test_a_locked_state_database_does_not_stop_the_daemon(lab, start_daemon):
    """Another program holds the state's write lock for longer than SQLite's
    5 s timeout: the main loop, the sensors and the kernel trap go on; the ban
    made meanwhile is listed at once and written, with its reason and port,
    once the database is free again."""
    daemon = start_daemon(ATCP)
    # held well past SQLite's 5 s wait, whenever the ban's write comes
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(daemon.state), "12"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        source = extra4(22)
        nmap(lab, "-sS", source, TARGET4, "20-25")
        assert source in daemon.banned()  # the kernel trap goes on meanwhile
        daemon.wait_log("is kept in memory and written later", timeout=11)
        assert source in listed(daemon)  # listed while the state is locked
    finally:
        holder.wait(20)
    daemon.wait_log("the state is writable again; every ban is recorded")
    assert daemon.proc.poll() is None, daemon.log_text()[-2000:]
    import sqlite3
    row = sqlite3.connect(daemon.state).execute(
        "SELECT port, reason, origin FROM bans WHERE address = ?", (source,)).fetchone()
    assert row is not None and row[0] in range(20, 26) and "scan" in row[1], row
    later = extra4(23)  # and it still detects, records and bans
    nmap(lab, "-sS", later, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {later} has been blocked via dropped route")
    time.sleep(0.5)
    assert later in listed(daemon)


def listed(daemon) -> set[str]:
    return {b["address"] for b in json.loads(daemon.cli("list", "--json").stdout)}


def test_block_of_a_blocked_address_sets_its_time_and_runs_no_command_twice(
        lab, start_daemon, tmp_path):
    ran = tmp_path / "ran"
    script = tmp_path / "route.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {ran}\n')
    script.chmod(0o755)
    daemon = start_daemon(ATCP + f'KILL_ROUTE="{script} add $TARGET$"\n'
                                 f'KILL_ROUTE_UNDO="{script} del $TARGET$"\n')
    address = extra4(24)
    first = daemon.cli("block", address, "--for", "1h")
    second = daemon.cli("block", address, "--for", "2h")
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert ran.read_text() == f"add {address}\n"
    left = daemon.set_timeouts()[address]
    assert 3600 < left <= 7200, left
    daemon.wait_log(f"Host {address} was blocked already; its ban now lasts 7200s")
    daemon.cli("unblock", address)
    assert ran.read_text() == f"add {address}\ndel {address}\n"
    assert address not in daemon.banned()


def test_a_ruleset_flush_is_undone_within_a_second(lab, start_daemon):
    """`nft flush ruleset` (an nftables.service restart): the daemon notices at
    once and puts back its table, the kernel trap and every ban in force."""
    daemon = start_daemon(ATCP)
    banned = extra4(25)
    daemon.cli("block", banned, "--for", "1h")
    lab.exec("target", "nft", "flush", "ruleset", check=True)
    flushed = time.monotonic()
    while banned not in daemon.banned():
        assert time.monotonic() - flushed < 1.0, daemon.log_text()[-1500:]
        time.sleep(0.02)
    daemon.wait_log("firewall restored: table, kernel trap and 1 bans")
    assert 3000 < daemon.set_timeouts()[banned] <= 3600
    source = extra4(26)  # the trap is armed again
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel", "trapped").stdout
    assert re.search(r"add @ban4 .* counter packets [1-9]", trap), trap
    # a chain flushed by hand is noticed too
    lab.exec("target", "nft", "flush", "chain", "inet", "portsentinel", "trap", check=True)
    time.sleep(1.0)
    assert "goto trapped" in lab.exec("target", "nft", "list", "chain", "inet", "portsentinel",
                                      "trap").stdout


def test_a_change_the_watch_cannot_see_is_found_by_reconciliation(lab, start_daemon):
    """An element added to a set of ours that only we fill (a port made a
    trap by another program): the watch's kernel filter drops element
    additions unread; the reconciliation, which lists our table again only
    when the ruleset's generation moved, still finds it and undoes it."""
    daemon = start_daemon(ATCP)
    daemon.cli("reconcile")  # the table checked: an unchanged generation spares the next

    def trap_ports() -> str:
        return lab.exec("target", "nft", "list", "set", "inet", "portsentinel",
                        "trap_tcp").stdout
    assert "2000" not in trap_ports()
    lab.exec("target", "nft", "add", "element", "inet", "portsentinel", "trap_tcp", "{ 2000 }",
             check=True)
    time.sleep(0.5)
    assert "2000" in trap_ports()  # unseen by the watch
    daemon.cli("reconcile")
    assert "2000" not in trap_ports()
    daemon.wait_log("our nftables table was changed by another program")


def test_sigkill_in_a_burst_of_bans_then_restart_loses_and_doubles_nothing(
        lab, start_daemon, tmp_path):
    """Killed while spoofed sources are being banned: after a restart every ban
    is both in the kernel set and in the state, and no hosts.deny line twice."""
    daemon = start_daemon(ATCP + 'BAN_RATE_LIMIT="1000/s"\nKILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n')
    mac = re.search(r"link/ether (\S+)",
                    lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    flood = lab.start("attacker", sys.executable, PROBES, "flood", "eth0", mac, TARGET6,
                      "500", "1", "1")
    time.sleep(0.4)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    flood.wait(10)
    daemon.start()
    daemon.wait_log("PortSentry is now active and listening.", after_last_start=True)
    time.sleep(1.0)  # adoption of what the kernel banned while we were down
    kernel = daemon.banned()
    assert len(kernel) > 100, len(kernel)
    state = {b["address"] for b in json.loads(daemon.cli("list", "--json").stdout)}
    assert state == kernel, (len(state), len(kernel), sorted(kernel ^ state)[:5])
    lines = daemon.hosts_deny.read_text().splitlines()
    assert len(lines) == len(set(lines)), "a hosts.deny line twice"


def test_a_broken_ignore_file_keeps_the_last_good_list(lab, start_daemon, tmp_path):
    ignore = tmp_path / "portsentry.ignore"
    friend = extra4(27)
    ignore.write_text(f"{friend}\n")
    daemon = start_daemon(ATCP + f'IGNORE_FILE="{ignore}"\n')
    ignore.write_text(f"{friend}\nthis is not an address\n")
    daemon.wait_log("ignore list not reloaded", timeout=5)
    nmap(lab, "-sS", friend, TARGET4, "20-25")
    time.sleep(0.5)
    assert friend not in daemon.banned()  # still ignored: the old list stands
    assert daemon.proc.poll() is None


def test_a_full_disk_loses_no_ban(lab, start_daemon, tmp_path):
    """The state directory's filesystem fills up: blocking goes on, the bans are
    listed from memory, and written once there is room again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        daemon = start_daemon(ATCP + f'STATE_FILE="{disk}/state.db"\n'
                                     f'HISTORY_FILE="{disk}/history"\n')
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        source = extra4(28)
        nmap(lab, "-sS", source, TARGET4, "20-25")
        assert source in daemon.banned()
        daemon.wait_log(f"cannot write {disk}/history")
        state = {b["address"] for b in json.loads(daemon.cli("list", "--json").stdout)}
        assert source in state
        filler.unlink()
        daemon.wait_log("every ban is recorded", timeout=5)
        assert daemon.proc.poll() is None
        daemon.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_reload_never_undoes_older_bans_with_new_settings(lab, start_daemon, tmp_path):
    """A ban is undone the way it was done: its hosts.deny file and its
    KILL_ROUTE undo are kept with it, whatever a reload changed since."""
    ran = tmp_path / "ran"
    script = tmp_path / "route.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {ran}\n')
    script.chmod(0o755)
    first, second = tmp_path / "deny.first", tmp_path / "deny.second"
    keys = (ATCP + 'KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n'
            f'KILL_ROUTE="{script} add $TARGET$"\n')
    daemon = start_daemon(keys + f'HOSTS_DENY_FILE="{first}"\n'
                                 f'KILL_ROUTE_UNDO="{script} undo-one $TARGET$"\n')
    address = extra4(29)
    daemon.cli("block", address)
    assert f"ALL: {address} : DENY" in first.read_text()
    config = daemon.conf.read_text()
    config = config.replace(f'HOSTS_DENY_FILE="{first}"', f'HOSTS_DENY_FILE="{second}"')
    config = config.replace("undo-one", "undo-two")
    daemon.conf.write_text(config)
    daemon.cli("reload")
    daemon.cli("unblock", address)
    assert f"ALL: {address} : DENY" not in first.read_text()
    assert ran.read_text() == f"add {address}\nundo-one {address}\n"


def test_a_slow_reverse_zone_does_not_stall_the_bans_behind_it(lab, start_daemon):
    """RESOLVE_HOST=1 with a resolver that never answers (a scanner controlling
    its reverse zone): each ban's records wait at most half a second for a
    name, not the resolver's timeout, one after the other."""
    sink = lab.start("client", sys.executable, "-c",
                     "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                     "s.bind(('0.0.0.0',53))\ns.settimeout(1)\nt=time.time()\n"
                     "while time.time()-t<120:\n try: s.recvfrom(2048)\n except OSError: pass\n")
    netns_etc = Path("/etc/netns") / lab.ns["target"]  # `ip netns exec` mounts it over /etc
    netns_etc.mkdir(parents=True, exist_ok=True)
    (netns_etc / "resolv.conf").write_text(f"nameserver {CLIENT4}\noptions timeout:5 attempts:1\n")
    try:
        daemon = start_daemon(ATCP + 'RESOLVE_HOST="1"\nKILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n')
        sources = [extra4(i) for i in (20, 21, 22)]
        for source in sources:
            nmap(lab, "-sS", source, TARGET4, "20-21")
        scanned = time.monotonic()
        while not all(f"ALL: {s} : DENY" in (daemon.hosts_deny.read_text()
                                              if daemon.hosts_deny.exists() else "")
                      for s in sources):
            assert time.monotonic() - scanned < 3.0, daemon.log_text()[-1500:]
            time.sleep(0.05)
    finally:
        shutil.rmtree(netns_etc, ignore_errors=True)
        if not any(netns_etc.parent.iterdir()):
            netns_etc.parent.rmdir()
        lab.stop(sink)


@pytest.mark.parametrize("sensor, seen_as", [("0", "TCP fragmented scan"),
                                             ("auto", "TCP SYN/Normal scan")])
def test_probes_the_sensor_used_to_miss_are_seen(lab, start_daemon, sensor, seen_as):
    """The userspace path (no kernel trap): `nmap -f` splits the TCP header
    over fragments, and a SYN can hide behind 248 bytes of IPv6 options. The
    packet sensor (KERNEL_SENSOR=0) sees the first fragment; the kernel as the
    sensor sees the SYN whole, reassembled."""
    daemon = start_daemon(ATCP + 'KERNEL_TRAP="0"\n' f'KERNEL_SENSOR="{sensor}"\n')
    fragmented = extra4(10 if sensor == "0" else 11)
    done = lab.exec("attacker", "nmap", "-sS", "-f", "-Pn", "-n", "--max-retries", "0",
                    "-e", "eth0", "-S", fragmented, "-p", "20-25", TARGET4, timeout=60)
    assert done.returncode == 0, done.stderr
    daemon.wait_log(f"attackalert: {seen_as} from host: {fragmented}/{fragmented}")
    daemon.wait_log(f"attackalert: Host {fragmented} has been blocked via dropped route")
    mac = re.search(r"link/ether (\S+)",
                    lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    code = r"""
import socket, struct, ipaddress, sys
mac = bytes.fromhex(sys.argv[1].replace(':', ''))
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x86DD))
src, dst = ipaddress.ip_address(sys.argv[2]).packed, ipaddress.ip_address(sys.argv[3]).packed
options = bytes([6, 30, 1, 244]) + bytes(244)  # destination options, 248 bytes, then TCP
tcp = struct.pack('!HHIIBBHHH', 40000, 111, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
s.sendto(struct.pack('!IHBB', 0x60000000, len(options) + 20, 60, 64) + src + dst + options + tcp,
         ('eth0', 0x86DD, 0, 0, mac))
print('sent')
"""
    hidden = "2001:db8::1d" if sensor == "0" else "2001:db8::1e"
    sent = lab.exec("attacker", sys.executable, "-c", code, mac, hidden, TARGET6)
    assert "sent" in sent.stdout, sent.stderr
    daemon.wait_log(f"attackalert: Host {hidden} has been blocked via dropped route")


def test_quiet_changes_inside_our_table_are_undone(lab, start_daemon):
    """Not the whole table: its trap ports flushed, a rule slipped into a chain."""
    daemon = start_daemon(ATCP)
    lab.exec("target", "nft", "flush", "set", "inet", "portsentinel", "trap_tcp", check=True)
    daemon.wait_log("firewall restored", timeout=3)
    assert "{0-112,114-138,140-1023}" in lab.exec("target", "nft", "list", "set", "inet", "portsentinel",
                               "trap_tcp").stdout.replace(" ", "")
    lab.exec("target", "nft", "insert", "rule", "inet", "portsentinel", "trap", "accept",
             check=True)
    time.sleep(1.0)
    trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel", "trap").stdout
    assert "\t\taccept\n" not in trap, trap
    source = extra4(27)
    nmap(lab, "-sS", source, TARGET4, "20-25")  # the trap bans in the kernel again
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    trap = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel", "trapped").stdout
    assert re.search(r"add @ban4 .* counter packets [1-9]", trap), trap


def test_a_foreign_chain_or_policy_in_our_table_is_undone(lab, start_daemon):
    """Found by an adversarial try: a hooked chain of another program's in our
    table (policy drop: this host cut off) and our input chain's policy set
    to drop were never seen (the check compared rules and sets only), and a
    foreign chain with a rule was reported restored but kept."""
    daemon = start_daemon(ATCP)

    def table() -> str:
        return lab.exec("target", "nft", "list", "table", "inet", "portsentinel").stdout
    lab.exec("target", "nft", "add", "chain", "inet", "portsentinel", "evil",
             "{ type filter hook input priority -400 ; policy drop ; }", check=True)
    lab.exec("target", "nft", "add", "chain", "inet", "portsentinel", "evil2", check=True)
    lab.exec("target", "nft", "add", "rule", "inet", "portsentinel", "evil2", "tcp", "dport",
             "22", "accept", check=True)
    lab.exec("target", "nft", "add", "chain", "inet", "portsentinel", "input",
             "{ type filter hook input priority filter - 10 ; policy drop ; }", check=True)
    daemon.cli("reconcile")
    deadline = time.monotonic() + 5
    while ("evil" in table() or "policy drop" in table()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "evil" not in table() and "policy drop" not in table(), table()
    daemon.wait_log("our nftables table was changed by another program")
    assert "policy accept" in lab.exec("target", "nft", "list", "chain", "inet",
                                       "portsentinel", "input").stdout


def test_our_table_set_dormant_by_another_program_is_woken(lab, start_daemon):
    """A dormant table's rules do nothing: every ban and the kernel trap off,
    with nothing deleted for the ruleset watch to see. Reconciliation finds
    it (the table is listed: the generation moved) and makes it again."""
    daemon = start_daemon(ATCP)
    lab.exec("target", "nft", "add", "table", "inet", "portsentinel", "{ flags dormant ; }",
             check=True)
    said = daemon.cli("reconcile").stdout  # not "agree": it was just made again
    assert "changed by another program: made again" in said, said
    listed = lab.exec("target", "nft", "list", "table", "inet", "portsentinel").stdout
    assert "dormant" not in listed, listed[:200]
    daemon.wait_log("our nftables table was changed by another program")
    source = extra4(28)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")


@pytest.mark.parametrize("replacement", [
    "add table inet portsentinel { flags dormant ; }",
    "add table inet portsentinel\nadd set inet portsentinel never4 { type ipv4_addr ; }\n"
    "add set inet portsentinel trap_tcp { type ipv4_addr ; }",
])
def test_a_table_of_our_name_that_cannot_be_refilled_is_made_anew(lab, start_daemon,
                                                                  replacement):
    """Found by an adversarial try: our table replaced by an empty dormant one,
    or by one whose never-block and trap sets are declared otherwise, failed
    every restore (EINVAL) for good: no ban, no trap, and a status saying all
    was armed. Such a table is deleted and made anew, with every ban."""
    daemon = start_daemon(ATCP)
    banned = extra4(29)
    daemon.cli("block", banned)
    lab.exec("target", "nft", "-f", "-", input="delete table inet portsentinel\n"
             + replacement + "\n", check=True)
    daemon.cli("reconcile")
    daemon.wait_log("firewall restored: table, kernel trap and 1 bans")
    assert banned in daemon.banned()
    assert not can_connect(lab, banned, TARGET4, 80)
    daemon.wait_log("our nftables table could not be refilled")
    source = extra4(28)
    nmap(lab, "-sS", source, TARGET4, "20-25")
    daemon.wait_log(f"attackalert: Host {source} has been blocked via dropped route")
    daemon.stop()  # and a start finds such a table
    lab.exec("target", "nft", "-f", "-", input="delete table inet portsentinel\n"
             + replacement + "\n", check=True)
    daemon.start()
    daemon.wait_log("our nftables table could not be refilled", after_last_start=True)
    daemon.wait_log("PortSentry is now active and listening.", after_last_start=True)
    assert banned in daemon.banned() and source in daemon.banned()


def test_a_restore_that_keeps_failing_is_said_in_the_log_and_the_status(lab, start_daemon):
    """Found by an adversarial try: when the table could not be put back
    (here another program holds a table of our name with the owner flag: no
    one else may change or delete it), every check failed with an opaque
    "reporting failed" line, and `status` still said all was armed. The
    failure is said plainly, `status` shows it, and once the other program
    lets go the table is back with its bans."""
    daemon = start_daemon(ATCP)
    banned = extra4(29)
    daemon.cli("block", banned)
    holder = lab.start("target", "sh", "-c", "{ printf 'delete table inet portsentinel\\n"
                       "add table inet portsentinel { flags owner ; }\\n'; sleep 6; } | nft -i")
    daemon.wait_log("adminalert: ERROR: our nftables table could not be restored")
    status = daemon.cli("status").stdout
    assert "NOT IN FORCE" in status, status
    said = daemon.cli("reconcile").stdout  # not "made again", nor "agree"
    assert "NOT IN FORCE" in said and "made again" not in said, said
    assert "reporting failed" not in daemon.log_text()
    holder.wait(timeout=20)  # it lets go: the table of our name goes with it
    daemon.wait_log("firewall restored: table, kernel trap and 1 bans", timeout=15)
    assert "NOT IN FORCE" not in daemon.cli("status").stdout
    assert banned in daemon.banned()


def test_a_change_made_while_our_table_is_being_restored_is_not_kept(lab, start_daemon):
    """Found by an adversarial try: a foreign rule committed 50 ms after a
    flush (CHECK_DELAY: while the daemon restored the table) was taken into
    the table as installed and never undone. Every restore now takes the table
    as its own only if nothing else was committed meanwhile."""
    daemon = start_daemon(ATCP)
    for attempt in range(3):
        lab.exec("target", "sh", "-c",
                 "nft flush chain inet portsentinel input; sleep 0.05; "
                 "nft insert rule inet portsentinel input ip saddr 198.51.100.0/24 accept "
                 "comment '\"foreign\"'", check=True)
        time.sleep(1.0)
        daemon.cli("reconcile")
        time.sleep(0.5)
        rules = lab.exec("target", "nft", "list", "chain", "inet", "portsentinel",
                         "input").stdout
        assert "foreign" not in rules, (attempt, rules)
