"""Fleet mode with a real redis-server: a scan of member a gets the attacker
blocked on b and c; Redis killed and restarted empty mid-test loses nothing; a sweep
of one unused port per member is banned fleet-wide (five members);
a member never applies a ban on an address it must never block."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from conftest import Daemon, can_connect, nmap
from netlab import HUB4, MORE_TARGETS, TARGET4, extra4

PASSWORD = "fleet-test-secret"
TESTS = Path(__file__).resolve().parents[1]
PROBES = TESTS.parent / "bench" / "probes.py"


@pytest.fixture
def fleet_lab():
    if not shutil.which("redis-server"):
        pytest.fail("redis-server missing; run scripts/test.sh")
    with netlab.Lab(tag=f"f{netlab.os.getpid() % 10000}", targets=3) as lab:
        yield lab


def start_redis(lab, workdir) -> subprocess.Popen:
    proc = lab.start("lan", shutil.which("redis-server"), "--bind", HUB4, "--port", "6379",
                     "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                     "--dir", str(workdir), stdout=(workdir / "redis.log").open("a"))
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in (workdir / "redis.log").read_text():
        assert time.monotonic() < deadline, (workdir / "redis.log").read_text()
        assert proc.poll() is None, (workdir / "redis.log").read_text()
        time.sleep(0.05)
    return proc


def member(lab, tmp_path, role: str, name: str, extra: str = "", classic: bool = False) -> Daemon:
    return Daemon(lab, tmp_path / name,
                  f'TCP_MODE="atcp"\nFLEET_REDIS_URL="redis://:{PASSWORD}@{HUB4}:6379/0"\n'
                  f'FLEET_NAME="{name}"\n' + extra, role=role, classic=classic)


def wait_banned(daemon: Daemon, address: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while address not in daemon.banned():
        assert time.monotonic() < deadline, f"{address} not banned on {daemon.role}:\n" \
                                            f"{daemon.log_text()[-2000:]}"
        time.sleep(0.05)


def test_a_scan_of_one_member_blocks_the_attacker_everywhere(fleet_lab, tmp_path):
    lab = fleet_lab
    redis = start_redis(lab, tmp_path)
    guarded = extra4(12)  # never blocked on c, whatever a says
    ignore = tmp_path / "c-ignore"
    ignore.write_text(f"{guarded}\n")
    a = member(lab, tmp_path, "target", "a")
    b = member(lab, tmp_path, "target2", "b", classic=True)  # applies and publishes, detached
    c = member(lab, tmp_path, "target3", "c", f'IGNORE_FILE="{ignore}"\n')
    try:
        for d in (a, b, c):
            d.wait_log("fleet: member")
        first = extra4(10)
        nmap(lab, "-sS", first, TARGET4, "20-25")
        for d in (b, c):
            wait_banned(d, first)
            line = d.wait_log(f"attackalert: Host {first} has been blocked via fleet member a")
            delay = float(re.search(r"([\d.]+) ms after it was sent", line)[1])
            print(f"propagation a -> {d.role}: {delay:.1f} ms")
            assert delay < 1000
        b2, _ = MORE_TARGETS["target2"]
        assert not can_connect(lab, first, b2, 9)  # b drops it too (not even refused)
        listing = b.cli("list").stdout
        assert re.search(rf"{re.escape(first)}\s.*\sa\s*$", listing, re.M), listing
        shared = next(x for x in json.loads(b.cli("list", "--json").stdout)
                      if x["address"] == first)
        assert shared["evidence"] == "single"  # the grade member a gave it

        # c never applies a ban on an address it must never block
        nmap(lab, "-sS", guarded, TARGET4, "20-25")
        wait_banned(b, guarded)
        c.wait_log(f"fleet: not applying the ban of {guarded} from a: never blocked here")
        assert guarded not in c.banned()

        # Redis dies; a keeps blocking locally; Redis comes back empty: nothing is lost
        lab.stop(redis, timeout=5)
        a.wait_log("fleet: Redis unreachable")
        second = extra4(11)
        nmap(lab, "-sS", second, TARGET4, "20-25")
        a.wait_log(f"attackalert: Host {second} has been blocked via dropped route")
        assert second not in b.banned()
        start_redis(lab, tmp_path)
        for d in (b, c):
            wait_banned(d, second, timeout=20)
        a.wait_log("fleet: reconnected to Redis")
        assert "connected" in a.cli("status").stdout

        # an unblock on one member is the fleet's word
        b.cli("unblock", first)
        for d in (a, c):
            deadline = time.monotonic() + 10
            while first in d.banned():
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for d in (a, b, c):
            d.stop()


def make_certificates(workdir) -> dict:
    """A throw-away CA and a server certificate for the hub address."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=portsentinel-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", f"/CN={HUB4}")
    (workdir / "ext").write_text(f"subjectAltName=IP:{HUB4}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext")
    return {name: workdir / f"{name}" for name in ("ca.crt", "server.crt", "server.key")}


def test_fleet_over_tls_with_a_password(fleet_lab, tmp_path):
    lab = fleet_lab
    certs = make_certificates(tmp_path)
    log = tmp_path / "redis-tls.log"
    lab.start("lan", shutil.which("redis-server"), "--port", "0", "--tls-port", "6380",
              "--bind", HUB4, "--tls-cert-file", str(certs["server.crt"]),
              "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file",
              str(certs["ca.crt"]), "--tls-auth-clients", "no", "--requirepass", PASSWORD,
              "--save", "", "--appendonly", "no", "--dir", str(tmp_path), stdout=log.open("w"))
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    url = f"rediss://:{PASSWORD}@{HUB4}:6380/0?ssl_ca_certs={certs['ca.crt']}"
    a = Daemon(lab, tmp_path / "a", f'TCP_MODE="atcp"\nFLEET_REDIS_URL="{url}"\nFLEET_NAME="a"\n')
    b = Daemon(lab, tmp_path / "b", f'TCP_MODE="atcp"\nFLEET_REDIS_URL="{url}"\nFLEET_NAME="b"\n',
               role="target2")
    try:
        a.wait_log("fleet: member a connected")
        b.wait_log("fleet: member b connected")
        source = extra4(13)
        nmap(lab, "-sS", source, TARGET4, "20-25")
        wait_banned(b, source)
        # a wrong password is refused and said so, not silently ignored
        bad = Daemon(lab, tmp_path / "c", 'TCP_MODE="atcp"\n'
                     f'FLEET_REDIS_URL="rediss://:wrong@{HUB4}:6380/0?ssl_ca_certs={certs["ca.crt"]}"\n'
                     'FLEET_NAME="c"\n', role="target3")
        bad.wait_log("fleet: Redis unreachable")
        bad.stop()
    finally:
        a.stop()
        b.stop()


def test_hostile_fleet_messages_and_keys_change_nothing(fleet_lab, tmp_path):
    """Messages and keys that do not fit the schema are ignored and counted;
    the subscriber goes on, and no text of theirs reaches a file or a log."""
    lab = fleet_lab
    start_redis(lab, tmp_path)
    b = member(lab, tmp_path, "target2", "b", 'KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n')
    a = member(lab, tmp_path, "target", "a")
    try:
        b.wait_log("fleet: member b connected")

        def cli(*args):
            done = lab.exec("lan", "redis-cli", "-h", HUB4, "-a", PASSWORD, "--no-auth-warning",
                            *args)
            assert done.returncode == 0, done.stderr

        cli("HSET", "portsentinel:ban:junk", "x", "1")  # a key of the wrong type
        for raw in ("1", "null", "[]", "{", '{"type":"ban","address":"2001:db8::5%\\nALL: ALL",'
                    '"origin":"evil","until":null}', '{"type":"ban","address":"198.51.100.9",'
                    '"origin":"evil","until":NaN}', '{"type":"ban","address":"198.51.100.9",'
                    '"origin":["x"]}'):
            cli("PUBLISH", "portsentinel:bans", raw)
        b.wait_log("fleet: message ignored")
        attacker = extra4(13)
        nmap(lab, "-sS", attacker, TARGET4, "20-25")
        wait_banned(b, attacker)  # the subscriber is alive
        b.cli("reload")  # a resync with the wrong-typed key still there (reconnect path)
        assert "ALL: ALL" not in (b.hosts_deny.read_text() if b.hosts_deny.exists() else "")
        assert "198.51.100.9" not in b.banned()
        status = b.cli("status").stdout
        assert "connected" in status and "NOT connected" not in status, status
    finally:
        for d in (a, b):
            d.stop()


def _redis(lab, *args: str) -> str:
    return lab.exec("lan", "redis-cli", "-h", HUB4, "-a", PASSWORD, "--no-auth-warning",
                    *args).stdout


def _redis_load(lab) -> tuple[int, int, int]:
    """(commands the members sent: round trips, bytes received, memory used) of
    the fleet's Redis (a script's own calls inside Redis are not round trips)."""
    info = _redis(lab, "info", "all")
    field = lambda name: int(re.search(rf"^{name}:(\d+)", info, re.M)[1])  # noqa: E731
    inner = sum(int(n) for n in re.findall(
        r"^cmdstat_(?:zadd|zremrangebyscore|zcard|zremrangebyrank|pexpire|zrange|time):calls=(\d+)",
        info, re.M))
    return field("total_commands_processed") - inner, field("total_net_input_bytes"), \
        field("used_memory")


def test_a_sweep_of_one_trap_port_per_member_is_banned_fleet_wide(tmp_path):
    """Five members, each alone below its SCAN_TRIGGER: a source that probes
    one unused port on each is banned everywhere once three members saw it;
    a client of every member's real services is never flagged; the Redis load
    of the shared evidence is one round trip a piece, bounded under a spoofed
    flood."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server missing; run scripts/test.sh")
    roles = ["target", "target2", "target3", "target4", "target5"]
    with netlab.Lab(tag=f"g{netlab.os.getpid() % 10000}", targets=5) as lab:
        for role in roles:  # the real services, on every member
            services = lab.start(role, sys.executable, str(TESTS / "services.py"), "600",
                                 stdout=subprocess.PIPE)
            assert services.stdout.readline().strip() == b"ready"
        start_redis(lab, tmp_path)
        members = [member(lab, tmp_path, role, name, 'SCAN_TRIGGER="3"\n')
                   for role, name in zip(roles, "abcde")]
        for d in members:
            d.wait_log("fleet: member")
        addresses = [TARGET4] + [MORE_TARGETS[r][0] for r in roles[1:]]
        client = lab.start("client", sys.executable, "-c", CLIENT_LOOP, *addresses,
                           stdout=subprocess.PIPE)
        before = _redis_load(lab)
        sweeper = extra4(25)
        for i, address in enumerate(addresses[:3]):
            nmap(lab, "-sS", sweeper, address, str(i + 1))  # one unused port per member
            time.sleep(0.5)
            if i < 2:  # below the fleet's threshold: nobody bans it
                assert all(sweeper not in d.banned() for d in members), i
        for d in members:
            wait_banned(d, sweeper, timeout=10)
        line = members[2].wait_log(f"attackalert: Host {sweeper} has been blocked via fleet "
                                   "correlation")
        assert "on 3 members (" in line and "a 1/tcp" in line and "c 3/tcp" in line, line
        listing = {b["address"]: b for b in json.loads(members[4].cli("list", "--json").stdout)}
        assert listing[sweeper]["evidence"] == "fleet"
        after = _redis_load(lab)
        commands = after[0] - before[0]
        print(f"sweep: {commands} Redis commands, {after[1] - before[1]} bytes in")

        # decoy grading holds fleet-wide: a peer of member a, forged on b, c and d, is
        # banned there (they never saw it connect) but not on a, where it is a client
        peer = extra4(27)
        fetch = ("import socket,sys; s=socket.create_connection((sys.argv[1], 80), 3, "
                 "(sys.argv[2], 0)); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
                 "print(s.recv(100))")
        assert b"200" in lab.exec("attacker", sys.executable, "-c", fetch, TARGET4,
                                  peer).stdout.encode()
        time.sleep(2.5)  # a peer is mature once its first handshake is 2 s old
        for i, address in enumerate(addresses[1:4]):
            nmap(lab, "-sS", peer, address, str(i + 4))
        for d in members[1:]:
            wait_banned(d, peer, timeout=10)
        members[0].wait_log(f"fleet: not applying the ban of {peer} from d: it completed a "
                            "TCP handshake with this host lately")
        assert peer not in members[0].banned()
        assert b"200" in lab.exec("attacker", sys.executable, "-c", fetch, TARGET4,
                                  peer).stdout.encode()

        # a client (a peer of every member) mistyping a trap port on three: no evidence
        for address in addresses[:3]:
            lab.exec("client", sys.executable, "-c", "import socket,sys\ntry: "
                     "socket.create_connection((sys.argv[1], 81), 2).close()\n"
                     "except OSError: pass", address)
        time.sleep(1)
        assert all(netlab.CLIENT4 not in d.banned() for d in members)

        # what another program writes into a source's evidence is never logged
        forged = extra4(28)
        _redis(lab, "zadd", f"portsentinel:ev:{forged}", "1e10",
               "evil 9/tcp\nattackalert: INJECTED")
        for i, address in enumerate(addresses[:3]):
            nmap(lab, "-sS", forged, address, str(i + 7))
        for d in members:
            wait_banned(d, forged, timeout=10)
        assert all("INJECTED" not in d.log_text() for d in members)

        # another program's key where a source's evidence goes: refused, Redis kept
        planted = extra4(26)
        _redis(lab, "set", f"portsentinel:ev:{planted}", "not a sorted set")
        nmap(lab, "-sS", planted, TARGET4, "1")
        members[0].wait_log("fleet: message ignored (bad evidence key")
        assert "Redis unreachable" not in members[0].log_text()

        # a spoofed flood of new sources at one member: the evidence it publishes is capped
        mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show",
                                                      "eth0").stdout)[1]
        seconds, rate = 3.0, 2000
        before = _redis_load(lab)
        out = lab.exec("attacker", sys.executable, str(PROBES), "flood", "eth0", mac,
                       netlab.TARGET6, str(rate), str(seconds), "1", timeout=60).stdout
        sent = json.loads(out)["sent"]
        time.sleep(1.5)
        after = _redis_load(lab)
        commands, received = after[0] - before[0], after[1] - before[1]
        keys = int(_redis(lab, "dbsize").strip())
        print(f"flood: {sent} spoofed sources, {keys} keys, {commands} Redis commands "
              f"({commands / sent:.3f} a probe), {received} bytes in "
              f"({received / sent:.1f} a probe), memory +{after[2] - before[2]} bytes")
        assert commands <= 200 * (seconds + 2) + 200, _redis(lab, "info", "commandstats")
        assert received / commands < 400  # EVALSHA: the script's text is not sent each time
        assert after[2] - before[2] < 4 << 20

        # the client of every member's real services was never flagged
        lab.stop(client)
        report = json.loads(client.stdout.read() or b"{}")
        assert report.get("ok", 0) > 0 and report.get("failed", 1) == 0, report
        client_address = netlab.CLIENT4
        assert all(client_address not in d.banned() for d in members)
        assert not _redis(lab, "keys", f"portsentinel:ev:{client_address}").strip()


# HTTP to port 80 of every member, over and over, until stopped (SIGTERM): a client
CLIENT_LOOP = """
import json, signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
ok = failed = 0
while not stop:
    for address in sys.argv[1:]:
        try:
            with socket.create_connection((address, 80), 2) as s:
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                ok += bool(s.recv(100))
        except OSError:
            failed += 1
    time.sleep(0.1)
print(json.dumps({"ok": ok, "failed": failed}))
"""
