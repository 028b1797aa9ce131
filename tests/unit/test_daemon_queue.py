"""The daemon's bookkeeping when its report queue is full (no sockets: the
Daemon object is built, never started)."""

import ipaddress
import queue
import time
from pathlib import Path

import pytest

from portsentinel import config as configuration, logs
from portsentinel.daemon import Daemon
from portsentinel.store import BanRecord


@pytest.fixture
def daemon(tmp_path: Path):
    (tmp_path / "ignore").write_text("")
    config = configuration.parse(
        f'STATE_FILE="{tmp_path}/state.db"\nHISTORY_FILE="{tmp_path}/h"\n'
        f'BLOCKED_FILE="{tmp_path}/b"\nIGNORE_FILE="{tmp_path}/ignore"\n', "test")
    log = logs.Log(to_syslog=False, stream=None)
    d = Daemon(config, "atcp", "audp", log)
    yield d
    d.store.close()


def test_an_expiry_dropped_on_a_full_queue_is_retried(daemon):
    daemon.store.add_ban(BanRecord("198.51.100.7", 1.0, time.time() - 1))
    daemon.reports = queue.Queue(1)
    daemon.reports.put(None)  # full
    daemon._housekeeping(False)
    assert "198.51.100.7" not in daemon._expiring  # not queued, so not pending either
    daemon.reports.get()
    daemon._housekeeping(False)
    job = daemon.reports.get_nowait()
    job()
    assert daemon.store.get_ban("198.51.100.7") is None


def test_block_refuses_what_cannot_be_a_source_and_unblock_pardons(daemon):
    for address in ("224.0.0.1", "255.255.255.255", "ff02::1", "0.0.0.0"):
        reply = daemon.block(address, 60)
        assert not reply["ok"], address  # multicast, broadcast; 0.0.0.0 is never blocked
    reply = daemon.block("198.51.100.9", None)  # no firewall action configured here
    assert not reply["ok"] and "no block action" in reply["error"]
    source = ipaddress.ip_address("198.51.100.9")
    daemon.engine.ban(source, 1.0)
    daemon.engine.pardon(source)  # an admin's unblock: the next ban is a first one
    assert daemon.engine.ban(source, 2.0) == daemon.engine.policy.ban_seconds(0)
