"""The state file under faults: private files, a corrupt file set aside with a
clear error, adoption never overwriting a real record."""

import os
from pathlib import Path

from portsentinel.store import BanRecord, Store, StateCorrupt, open_store


def test_every_state_file_is_private(tmp_path: Path):
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "state.db")
        store.add_ban(BanRecord("198.51.100.2", 1.0, None))
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            path = tmp_path / name
            assert path.exists(), name
            assert path.stat().st_mode & 0o077 == 0, (name, oct(path.stat().st_mode))
        store.close()
    finally:
        os.umask(old)


def test_a_corrupt_state_file_is_set_aside_with_a_clear_error(tmp_path: Path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    said = []
    store = open_store(path, said.append)
    assert store.bans() == []
    kept = list(tmp_path.glob("state.db.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not")
    assert len(said) == 1 and "corrupt" in said[0] and str(kept[0]) in said[0]


def test_a_corrupt_state_is_an_error_not_a_traceback(tmp_path: Path):
    path = tmp_path / "state.db"
    path.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    try:
        Store(path)
    except StateCorrupt as err:
        assert str(path) in str(err)
    else:
        raise AssertionError("a corrupt file was accepted")


def test_adoption_never_overwrites_a_record(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    store.add_ban(BanRecord("198.51.100.2", 1.0, 100.0, reason="from web-2", origin="web-2"))
    store.add_bans([BanRecord("198.51.100.2", 5.0, 50.0, reason="found in the firewall",
                              origin="kernel"),
                    BanRecord("198.51.100.3", 5.0, 50.0, reason="found in the firewall",
                              origin="kernel")], replace=False)
    assert store.get_ban("198.51.100.2").origin == "web-2"
    assert store.get_ban("198.51.100.3").origin == "kernel"


def test_list_of_many_bans_fits_through_the_control_socket(tmp_path: Path):
    """A reply is not a request: `list` of 100,000 bans is several MB."""
    from portsentinel.control import ControlServer, request
    bans = [{"address": f"10.0.{i // 250}.{i % 250}", "reason": "x"} for i in range(100_000)]
    server = ControlServer(tmp_path / "c.sock", lambda message: {"ok": True, "bans": bans})
    try:
        assert len(request(tmp_path / "c.sock", {"command": "list"})["bans"]) == 100_000
    finally:
        server.close()


def test_a_state_file_from_before_the_undo_columns_is_migrated(tmp_path: Path):
    import sqlite3
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript("""CREATE TABLE bans (address TEXT PRIMARY KEY, since REAL NOT NULL,
        until REAL, port INTEGER, protocol TEXT, mode TEXT, reason TEXT NOT NULL,
        origin TEXT NOT NULL, hosts_deny_line TEXT, kill_route_command TEXT);
        INSERT INTO bans VALUES ('198.51.100.2', 1, NULL, 22, 'tcp', 'atcp', 'scan', 'local',
                                 'ALL: 198.51.100.2 : DENY', NULL);""")
    old.commit()
    old.close()
    store = Store(path)
    ban = store.get_ban("198.51.100.2")
    assert ban.hosts_deny_line == "ALL: 198.51.100.2 : DENY" and ban.hosts_deny_file is None
    # and before the evidence grades: none for the old ban, kept for new ones
    assert ban.evidence is None
    store.add_ban(BanRecord("192.0.2.2", 2, None, reason="scan", evidence="handshake"))
    assert Store(path).get_ban("192.0.2.2").evidence == "handshake"
    assert store.evidence_counts() == {"ungraded": 1, "handshake": 1}


def test_no_negative_limit_evicts_everything(tmp_path: Path):
    store = Store(tmp_path / "state.db")
    store.add_bans([BanRecord(f"198.51.100.{i}", 0, 100.0 + i) for i in range(1, 6)])
    assert store.soonest_expiring(-3) == [] and store.soonest_expiring(0) == []


def test_a_full_disk_is_reported_as_such(tmp_path: Path):
    """SQLite ends the transaction itself; its error must not hide behind a failed ROLLBACK."""
    import sqlite3
    store = Store(tmp_path / "state.db")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        store.add_bans_logged([(BanRecord(f"198.51.100.{i}", 1.0, None, reason="x" * 200), True)
                               for i in range(100)])
    except sqlite3.OperationalError as err:
        assert "full" in str(err)
    else:
        raise AssertionError("a full database took the write")
    assert store.count() == 0
