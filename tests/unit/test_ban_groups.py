"""The ledger writes bans to the state in groups (one transaction for a burst):
a ban not written yet is found, listed and liftable as if it were; a group
the state refuses waits in memory and is retried; offence counts and the
worker's order are as with one transaction a ban. The Daemon is built, never
started."""

import io
import ipaddress
import sqlite3
import time
from pathlib import Path

import pytest

from portsentinel import config as configuration, logs
from portsentinel.daemon import Daemon
from portsentinel.daemon.ledger import FLUSH_EVERY
from portsentinel.engine import KILL_ROUTE, NFTABLES, Verdict
from portsentinel.store import BanRecord, Store

A, B, C = "198.51.100.7", "198.51.100.8", "2001:db8::9"


def make_daemon(tmp_path: Path, extra: str = "") -> Daemon:
    (tmp_path / "ignore").write_text("")
    config = configuration.parse(
        f'STATE_FILE="{tmp_path}/state.db"\nHISTORY_FILE="{tmp_path}/h"\n'
        f'BLOCKED_FILE="{tmp_path}/b"\nIGNORE_FILE="{tmp_path}/ignore"\n' + extra, "test")
    return Daemon(config, "atcp", "audp", logs.Log(to_syslog=False, stream=io.StringIO()))


@pytest.fixture
def daemon(tmp_path: Path):
    d = make_daemon(tmp_path)
    yield d
    d.ctx.store.close()


def ban(address: str, since: float | None = None, until: float | None = None,
        reason: str = "TCP SYN/Normal scan") -> BanRecord:
    since = time.time() if since is None else since
    return BanRecord(address, since, since + 3600 if until is None else until, 22, "tcp",
                     "atcp", reason)


def settle(daemon, record: BanRecord) -> None:
    assert daemon.ledger.settle(record, [NFTABLES], "nft add element inet portsentinel ...")


def lock_state(store: Store) -> sqlite3.Connection:
    """Another program holds the state's write lock; our writes fail at once."""
    store._db.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_ban_not_written_yet_is_found_and_listed(daemon):
    store, ledger = daemon.ctx.store, daemon.ledger
    record = ban(A)
    settle(daemon, record)
    assert store.get_ban(A) is None  # waits for its group
    assert ledger.find(A) is record
    assert [r.address for r in ledger.in_force(time.time())] == [A]
    assert [b["address"] for b in daemon.commands.list_bans()] == [A]
    ledger.flush()
    assert store.get_ban(A) == record and not ledger.pending


def test_a_pending_ban_wins_over_an_older_stored_one(daemon):
    store, ledger = daemon.ctx.store, daemon.ledger
    now = time.time()
    old = BanRecord(A, now - 100, now - 1, reason="before")
    store.add_ban(old)  # over, its lift not done yet
    settle(daemon, ban(A, now, reason="again"))
    assert ledger.find(A).reason == "again"
    assert [r.reason for r in ledger.in_force()] == ["again"]
    ledger.lift(old, "expire")  # chosen before the new ban: leaves it alone
    assert ledger.find(A).reason == "again"
    # an admin's block sees the pending ban as the ban in force: only its time changes
    daemon.ctx.worker.idle = lambda: None  # pending throughout the command
    daemon.ctx.worker.start()
    try:
        reply = daemon.commands.block(A, 7200)
    finally:
        daemon.ctx.worker.stop(meanwhile=lambda: None)
    assert reply["ok"] and reply["already"] and ledger.pending
    ledger.flush()
    assert store.get_ban(A).reason == "again" and store.get_ban(A).until == reply["until"]


def test_a_ban_lifted_before_its_group_is_written_stays_lifted(daemon):
    store, ledger = daemon.ctx.store, daemon.ledger
    record = ban(A)
    settle(daemon, record)
    settle(daemon, ban(B))
    ledger.lift(record, "expire")
    ledger.flush()
    assert store.get_ban(A) is None and ledger.find(A) is None
    assert [r.address for r in ledger.in_force()] == [B]
    assert store.offences() == {A: 1, B: 1}  # as if written at once: the ban counts
    assert [e[1] for e in store.events() if e[2] == A] == ["expire", "block"]


def test_offence_counts_of_a_group_are_those_of_one_write_a_ban(daemon):
    store, ledger, engine = daemon.ctx.store, daemon.ledger, daemon.ctx.engine
    now = time.time()
    for address in (A, B, C):
        settle(daemon, ban(address, now))
    engine.restore(ipaddress.ip_address(A), now, now + 3600)
    order = engine.block(ipaddress.ip_address(A), now, 600)
    assert order.verdict is Verdict.ALREADY_BLOCKED
    ledger.set_time(order)  # a new end is no new offence
    ledger.flush()
    assert store.offences() == {A: 1, B: 1, C: 1}
    assert store.get_ban(A).until == order.until
    assert [e[1] for e in store.events()].count("block") == 4
    settle(daemon, ban(A, now + 10))  # banned again later
    ledger.flush()
    assert store.offences()[A] == 2


def test_a_burst_is_written_every_group_and_when_the_worker_is_idle(daemon):
    store, worker = daemon.ctx.store, daemon.ctx.worker
    for i in range(FLUSH_EVERY + 1):
        settle(daemon, ban(str(ipaddress.ip_address(0x0A000000 + i))))
    assert store.count() == FLUSH_EVERY and len(daemon.ledger.pending) == 1
    worker.start()
    try:
        worker.put(lambda: settle(daemon, ban(A)))
        deadline = time.monotonic() + 5
        while store.count() < FLUSH_EVERY + 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # no stop, no more jobs: the empty queue writes it
        assert store.count() == FLUSH_EVERY + 2
    finally:
        worker.stop(meanwhile=lambda: None)


def test_a_group_the_state_refuses_is_kept_listed_and_retried(daemon):
    store, ledger = daemon.ctx.store, daemon.ledger
    said = []
    daemon.ctx.report_error = said.append
    for address in (A, B, C):
        settle(daemon, ban(address))
    other = lock_state(store)
    ledger.flush()
    assert set(ledger.unsaved) == {A, B, C} and not ledger.pending
    assert {r.address for r in ledger.in_force()} == {A, B, C}
    assert len(said) == 1 and "kept in memory" in said[0] and "locked" in said[0]
    dropped = "portsentinel_dropped_events_total{reason=state write failed}"
    assert daemon.ctx.metrics.snapshot()[dropped] == 3
    ledger.retry()  # still locked: nothing said or counted twice
    assert len(said) == 1 and daemon.ctx.metrics.snapshot()[dropped] == 3
    ledger.lift(ledger.find(C), "unblock")  # liftable while unwritten
    other.rollback()
    ledger.retry()
    assert not ledger.unsaved and {r.address for r in store.bans()} == {A, B}
    assert store.offences() == {A: 1, B: 1}


def test_an_unblock_queued_after_a_ban_lifts_it_and_its_offence_is_pardoned(tmp_path):
    script = tmp_path / "kill_route"
    script.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/$2\n')
    script.chmod(0o755)
    daemon = make_daemon(tmp_path, f'BLOCK_NFTABLES="0"\nKILL_ROUTE="{script} $TARGET$ ran"\n'
                                   f'KILL_ROUTE_UNDO="{script} $TARGET$ undone"\n')
    daemon.ctx.worker.start()
    try:
        assert daemon.commands.block(A, 600)["ok"]
        assert daemon.commands.unblock(A)["unblocked"] == [A]
    finally:
        daemon.ctx.worker.stop(meanwhile=lambda: None)
    assert (tmp_path / "undone").read_text().split() == [A]
    store = daemon.ctx.store
    assert store.get_ban(A) is None and daemon.ledger.find(A) is None
    assert store.offences() == {}  # an admin's unblock pardons, after the ban was counted


def test_an_unblock_of_a_ban_the_engine_alone_knew_undoes_its_pending_record(tmp_path):
    """The ban was mid-report when the command listed the bans: by the time the
    lift runs on the worker its record, pending, says what to undo."""
    script = tmp_path / "kill_route"
    script.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/$2\n')
    script.chmod(0o755)
    daemon = make_daemon(tmp_path, f'BLOCK_NFTABLES="0"\nKILL_ROUTE="{script} $TARGET$ ran"\n'
                                   f'KILL_ROUTE_UNDO="{script} $TARGET$ undone"\n')
    order = daemon.ctx.engine.block(ipaddress.ip_address(A), time.time(), 600)
    assert order.actions == (KILL_ROUTE,)
    record = BanRecord(A, order.since, order.until)  # what the engine holds
    assert daemon.ledger.apply(order, "cli", "manual") and daemon.ledger.pending
    network = ipaddress.ip_network(A)
    assert daemon.commands._lift_all(A, network, [record])["unblocked"] == [A]
    assert (tmp_path / "undone").read_text().split() == [A]
    daemon.ledger.flush()
    assert daemon.ctx.store.get_ban(A) is None


def test_reconciliation_writes_what_is_pending_first(daemon):
    class Sets:  # our nftables sets, holding the pending ban
        def intact(self):
            return True

        def banned_counted(self):
            return {A: (3600.0, 12, 960)}

        def holds(self, address):
            return True

    daemon.ctx.bans = Sets()
    daemon.firewall.bypass.find = lambda: []  # no bridge here
    settle(daemon, ban(A))
    assert daemon.firewall.reconcile() == {"kernel_only": [], "state_only": [],
                                           "table_restored": False,
                                           "bypass": {"bridges": [], "bans_getting_through": {}}}
    assert daemon.ctx.store.get_ban(A).reason == "TCP SYN/Normal scan"  # not "found"


def test_shutdown_writes_what_is_pending(tmp_path):
    daemon = make_daemon(tmp_path)
    settle(daemon, ban(A))
    daemon._shutdown()
    assert Store(tmp_path / "state.db").get_ban(A) is not None
