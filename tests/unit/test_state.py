import socket
from pathlib import Path

import pytest

from portsentinel.command_templates import undo_command
from portsentinel.control import ControlError, ControlServer, request
from portsentinel.responders import remove_line
from portsentinel.store import BanRecord, Store


def test_store_survives_reopen_and_counts_offences(tmp_path: Path):
    store = Store(tmp_path / "s" / "state.db")
    store.add_ban(BanRecord("198.51.100.2", 10.0, 100.0, 22, "tcp", "atcp", "TCP SYN/Normal scan",
                            hosts_deny_line="ALL: 198.51.100.2 : DENY"))
    store.add_ban(BanRecord("198.51.100.2", 200.0, None, 23, "tcp", "atcp", "again"))
    store.add_ban(BanRecord("2001:db8::2", 10.0, 50.0))
    store.close()
    assert (tmp_path / "s" / "state.db").stat().st_mode & 0o777 == 0o600
    store = Store(tmp_path / "s" / "state.db")
    assert store.count() == 2
    assert store.get_ban("198.51.100.2").until is None  # the later ban replaced the first
    assert store.offences() == {"198.51.100.2": 2, "2001:db8::2": 1}
    assert [b.address for b in store.expired(60)] == ["2001:db8::2"]
    removed = store.remove_ban("2001:db8::2", "expire")
    assert removed.until == 50.0 and store.remove_ban("2001:db8::2") is None
    kinds = [e[1] for e in store.events()]
    assert kinds[0] == "expire" and kinds.count("block") == 3


def test_store_bulk_adoption(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    store.add_bans([BanRecord(f"10.0.{i // 256}.{i % 256}", 1.0, None, origin="kernel")
                    for i in range(5000)])
    assert store.count() == 5000


def test_a_group_of_bans_is_stored_as_one_write_a_ban_would_be(tmp_path: Path):
    group = [(BanRecord("198.51.100.2", 10.0, 100.0, 22, "tcp", "atcp", "scan"), True),
             (BanRecord("2001:db8::2", 11.0, None, reason="manual", origin="cli"), True),
             (BanRecord("198.51.100.2", 10.0, 900.0, 22, "tcp", "atcp", "scan"), False),
             (BanRecord("198.51.100.3", 12.0, 50.0), True)]
    one_by_one, grouped = Store(tmp_path / "one.db"), Store(tmp_path / "group.db")
    for ban, counted in group:
        one_by_one.add_ban(ban, counted)
    grouped.add_bans_logged(group)
    assert grouped.bans() == one_by_one.bans() and grouped.get_ban("198.51.100.2").until == 900
    assert grouped.offences() == one_by_one.offences() == {"198.51.100.2": 1, "2001:db8::2": 1,
                                                           "198.51.100.3": 1}
    assert grouped.events() == one_by_one.events()


@pytest.mark.parametrize("command, undo", [
    ("/sbin/iptables -I INPUT -s 198.51.100.2 -j DROP", "/sbin/iptables -D INPUT -s 198.51.100.2 -j DROP"),
    ("/sbin/iptables -I INPUT 1 -s 198.51.100.2 -j DROP", "/sbin/iptables -D INPUT -s 198.51.100.2 -j DROP"),
    ("ip6tables -A INPUT -s 2001:db8::2 -j REJECT", "ip6tables -D INPUT -s 2001:db8::2 -j REJECT"),
    ("/sbin/route add -host 198.51.100.2 reject", "/sbin/route del -host 198.51.100.2 reject"),
    ("ip route add blackhole 198.51.100.2", "ip route del blackhole 198.51.100.2"),
    ("/usr/local/bin/my-ban 198.51.100.2", None),
])
def test_undo_command(command, undo):
    assert undo_command(command) == undo


def test_remove_line_keeps_the_rest_and_the_mode(tmp_path: Path):
    deny = tmp_path / "hosts.deny"
    deny.write_text("# keep\nALL: 198.51.100.2 : DENY\nALL: 198.51.100.22 : DENY\n")
    deny.chmod(0o640)
    assert remove_line(deny, "ALL: 198.51.100.2 : DENY")
    assert deny.read_text() == "# keep\nALL: 198.51.100.22 : DENY\n"
    assert deny.stat().st_mode & 0o777 == 0o640
    assert not remove_line(deny, "ALL: 198.51.100.2 : DENY")
    assert not remove_line(tmp_path / "absent", "x")


def test_control_round_trip_and_stale_socket(tmp_path: Path):
    path = tmp_path / "ctl.sock"
    server = ControlServer(path, lambda req: {"ok": True, "echo": req})
    assert request(path, {"command": "status"}) == {"ok": True, "echo": {"command": "status"}}
    with pytest.raises(OSError, match="another portsentinel"):
        ControlServer(path, lambda req: {})
    server.close()
    assert not path.exists()
    with pytest.raises(ControlError, match="is it running"):
        request(path, {"command": "status"})
    # a crashed daemon leaves its socket file behind, with nobody listening
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    second = ControlServer(path, lambda req: {"ok": True})
    assert request(path, {"command": "x"}) == {"ok": True}
    second.close()


def test_control_rejects_garbage(tmp_path: Path):
    path = tmp_path / "ctl.sock"
    server = ControlServer(path, lambda req: {"ok": True})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"{not json\n")
        assert b'"ok": false' in s.recv(1000)
    server.close()


def test_addresses_from_the_state_parse_as_the_slow_way_does():
    import ipaddress
    import random

    from portsentinel.addrset import canonical, from_stored

    rng = random.Random(7)
    texts = ["198.51.100.7", "2001:db8::1", "::ffff:198.51.100.9", "::", "0.0.0.0",
             "fe80::1%eth0", "not an address"]
    texts += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(500)]
    texts += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(500)]
    for text in texts:
        try:
            expected = canonical(text)
        except ValueError:
            with pytest.raises(ValueError):
                from_stored(text)
            continue
        assert from_stored(text) == expected and type(from_stored(text)) is type(expected)


def test_the_store_asks_sqlite_for_expiries_and_the_count_only_after_a_write(tmp_path: Path):
    """Housekeeping asks for expired bans and the count on every turn; with
    nothing written since, the answers are known without a query (an idle
    daemon's wake-up stays cheap), and every write makes them fresh."""
    store = Store(tmp_path / "state.db")
    store.add_bans([BanRecord("198.51.100.1", 0, 100.0), BanRecord("198.51.100.2", 0, None)])
    queries = []
    store._db.set_trace_callback(queries.append)
    assert store.expired(50.0) == [] and store.count() == 2
    asked = len(queries)
    for _ in range(3):
        assert store.expired(99.0) == [] and store.count() == 2 and store.next_expiry() == 100.0
    assert len(queries) == asked
    assert [r.address for r in store.expired(100.0)] == ["198.51.100.1"]
    store.add_ban(BanRecord("198.51.100.3", 0, 20.0))
    assert [r.address for r in store.expired(50.0)] == ["198.51.100.3"] and store.count() == 3
    store.remove_ban("198.51.100.3", "expire")
    assert store.expired(50.0) == [] and store.count() == 2 and store.next_expiry() == 100.0
    writes = store.writes
    store.prune_events()
    assert store.writes == writes + 1


def test_unblock_offline_undoes_what_each_recorded_ban_did(tmp_path: Path):
    """The package removed while the daemon was stopped: its bans are lifted
    from the state file (here a hosts.deny line), and it is refused while a
    daemon answers on the control socket."""
    import subprocess
    import sys
    deny = tmp_path / "hosts.deny"
    deny.write_text("sshd: 10.0.0.1\nALL: 192.0.2.7 : DENY\nALL: [2001:db8::7] : DENY\n")
    conf = tmp_path / "p.conf"
    conf.write_text(f'STATE_FILE="{tmp_path}/state.db"\nCONTROL_SOCKET="{tmp_path}/s.sock"\n'
                    'BLOCK_NFTABLES="0"\nKILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n')
    store = Store(tmp_path / "state.db")
    for address, line in (("192.0.2.7", "ALL: 192.0.2.7 : DENY"),
                          ("2001:db8::7", "ALL: [2001:db8::7] : DENY")):
        store.add_ban(BanRecord(address, 1, None, reason="scan", hosts_deny_line=line,
                                hosts_deny_file=str(deny)))
    store.close()
    cli = [sys.executable, "-m", "portsentinel.cli", "unblock", "--offline", "-c", str(conf)]
    done = subprocess.run([*cli, "192.0.2.0/24"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "unblocked: 192.0.2.7" in done.stdout
    assert deny.read_text() == "sshd: 10.0.0.1\nALL: [2001:db8::7] : DENY\n"
    assert Store(tmp_path / "state.db").get_ban("192.0.2.7") is None
    assert Store(tmp_path / "state.db").get_ban("2001:db8::7") is not None
    server = ControlServer(tmp_path / "s.sock", lambda message: {"ok": True})
    try:
        refused = subprocess.run([*cli, "::/0"], capture_output=True, text=True)
        assert refused.returncode == 1 and "the daemon is running" in refused.stderr
    finally:
        server.close()
