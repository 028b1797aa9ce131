"""The daemon's rooms without sockets or root: the inbox (the engine's one
owner thread), the worker, the ledger's bookkeeping when the worker's queue
is full, and the control commands' refusals (the Daemon is built, never
started)."""

import ipaddress
import queue
import threading
import time
from pathlib import Path

import pytest

from portsentinel import config as configuration, logs
from portsentinel.daemon import (ADDRESSES_EVERY, ADDRESSES_WATCHED, HOUSEKEEPING_IDLE,
                                 SERVED_EVERY, Daemon)
from portsentinel.daemon.inbox import Inbox
from portsentinel.daemon.worker import Worker
from portsentinel.metrics import Metrics
from portsentinel.store import BanRecord


def make_daemon(tmp_path: Path, extra: str = "") -> Daemon:
    (tmp_path / "ignore").write_text("")
    config = configuration.parse(
        f'STATE_FILE="{tmp_path}/state.db"\nHISTORY_FILE="{tmp_path}/h"\n'
        f'BLOCKED_FILE="{tmp_path}/b"\nIGNORE_FILE="{tmp_path}/ignore"\n' + extra, "test")
    return Daemon(config, "atcp", "audp", logs.Log(to_syslog=False, stream=None))


@pytest.fixture
def daemon(tmp_path: Path):
    d = make_daemon(tmp_path)
    yield d
    d.ctx.store.close()


def test_an_expiry_dropped_on_a_full_queue_is_retried(daemon):
    store, ledger = daemon.ctx.store, daemon.ledger
    store.add_ban(BanRecord("198.51.100.7", 1.0, time.time() - 1))
    daemon.ctx.worker.jobs = queue.Queue(1)
    daemon.ctx.worker.jobs.put(None)  # full
    daemon._housekeeping()
    assert "198.51.100.7" not in ledger.expiring  # not queued, so not pending either
    daemon.ctx.worker.jobs.get()
    daemon._housekeeping()
    assert "198.51.100.7" in ledger.expiring
    daemon.ctx.worker.jobs.get_nowait()()
    assert store.get_ban("198.51.100.7") is None and not ledger.expiring


def test_block_refuses_what_cannot_be_a_source(daemon):
    for address in ("224.0.0.1", "255.255.255.255", "ff02::1", "0.0.0.0", "127.0.0.1",
                    "not an address"):
        reply = daemon.commands.block(address, 60)
        assert not reply["ok"], address
    assert not daemon.ctx.engine.bans()


def test_block_without_a_firewall_action_is_refused(tmp_path):
    daemon = make_daemon(tmp_path, 'BLOCK_NFTABLES="0"\n')
    reply = daemon.commands.block("198.51.100.9", None)
    assert not reply["ok"] and "no block action" in reply["error"]
    assert not daemon.ctx.engine.bans() and daemon.ctx.store.count() == 0


def test_unblock_of_what_is_not_blocked_says_so(daemon):
    daemon.ctx.worker.start()
    reply = daemon.commands.unblock("198.51.100.9")
    assert reply == {"ok": False, "error": "198.51.100.9 is not blocked"}
    assert not daemon.commands.unblock("198.51.100.0/33")["ok"]
    daemon.ctx.worker.stop(meanwhile=lambda: None)


def test_a_ban_whose_every_action_failed_is_forgotten_by_the_engine(tmp_path):
    daemon = make_daemon(tmp_path, 'KILL_ROUTE="/nonexistent/iptables -I INPUT -s $TARGET$ '
                                   '-j DROP"\nBLOCK_NFTABLES="0"\n')
    order = daemon.ctx.engine.block(ipaddress.ip_address("198.51.100.9"), time.time())
    assert daemon.ctx.engine.is_blocked(order.address)
    assert not daemon.ledger.apply(order, "cli", "manual")  # on this (the owner) thread
    assert not daemon.ctx.engine.is_blocked(order.address)  # the next probe tries again
    assert daemon.ctx.store.count() == 0


def test_inbox_runs_other_threads_calls_on_the_owner_thread():
    inbox = Inbox()
    seen = []
    result = {}

    def other():
        result["value"] = inbox.call(lambda: seen.append(threading.get_ident()) or 42)

    thread = threading.Thread(target=other)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        inbox.run_pending()  # the owner's loop
        thread.join(0.01)
    assert result["value"] == 42 and seen == [threading.get_ident()]


def test_inbox_passes_exceptions_and_runs_inline_once_released():
    inbox = Inbox()
    inbox.release()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(inbox.call(threading.get_ident)))
    thread.start()
    thread.join(5)
    assert seen and seen[0] != threading.get_ident()  # ran in the caller, nobody waited
    with pytest.raises(ZeroDivisionError):
        inbox.call(lambda: 1 / 0)


def test_worker_runs_jobs_in_order_counts_what_does_not_fit_and_survives_errors():
    metrics, errors, done = Metrics(), [], []
    worker = Worker(metrics.dropped, errors.append, size=2)
    assert worker.put(lambda: done.append(1)) and worker.put(lambda: 1 / 0)
    assert not worker.put(lambda: done.append(3))  # full: counted, not waited for
    worker.start()
    worker.put(lambda: done.append(2))
    worker.stop(meanwhile=lambda: None)
    assert done == [1, 2] and "ZeroDivisionError" in errors[0]
    assert metrics.snapshot()["portsentinel_dropped_events_total{reason=report queue full}"] == 1


def test_the_worker_calls_idle_when_its_queue_empties_and_at_stop():
    metrics, errors, done, idle = Metrics(), [], [], []
    worker = Worker(metrics.dropped, errors.append, size=10)
    worker.idle = lambda: idle.append(len(done))
    for i in range(3):
        worker.put(lambda i=i: done.append(i))
    worker.start()
    deadline = time.monotonic() + 5
    while not idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle == [3]  # after the three jobs, not between them
    worker.put(lambda: done.append(3))
    worker.stop(meanwhile=lambda: None)
    assert done == [0, 1, 2, 3] and idle[-1] == 4 and not errors


def test_jobs_that_trickle_in_share_one_idle_turn_a_group_wait():
    """A steady stream of sources (5,000 a second: one kernel log batch each)
    must not cost a state transaction each (issue 18): idle waits GROUP_WAIT
    after the first job it follows, then runs once for all of them."""
    from portsentinel.daemon.worker import GROUP_WAIT

    metrics, errors, done, idle = Metrics(), [], [], []
    worker = Worker(metrics.dropped, errors.append, size=100)
    worker.idle = lambda: idle.append(len(done))
    worker.start()
    for i in range(40):  # 200 ms of jobs 5 ms apart: the queue empties after each
        worker.put(lambda i=i: done.append(i))
        time.sleep(0.005)
    deadline = time.monotonic() + 5
    while (not idle or idle[-1] < 40) and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.stop(meanwhile=lambda: None)
    assert idle[-1] == 40 and not errors  # the last job was followed by idle
    assert len(idle) <= 0.2 / GROUP_WAIT + 3, idle  # not one a job


def test_a_job_queued_quietly_waits_for_a_wake_and_keeps_its_place():
    """A kernel log batch's reports are queued without waking the worker (a
    wake per batch cost more than the reports, issue 18); the owner's loop
    wakes it by WAKE_WAIT, any other job's put wakes it at once, in order."""
    from portsentinel.daemon.worker import GROUP_WAIT, WAKE_COUNT, WAKE_WAIT

    metrics, errors, done = Metrics(), [], []
    worker = Worker(metrics.dropped, errors.append, size=200)
    worker.start()
    time.sleep(0.05)  # asleep, nothing to do
    assert worker.wake_due() is None
    before = time.monotonic()
    worker.put_quietly(lambda: done.append("quiet"))
    time.sleep(0.1)
    assert done == [] and before <= worker.wake_due() - WAKE_WAIT <= time.monotonic()
    worker.wake()
    assert worker.wake_due() is None
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.005)
    assert done == ["quiet"]
    worker.put_quietly(lambda: done.append("quiet 2"))
    worker.put(lambda: done.append("loud"))  # wakes it: both, in order
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert done == ["quiet", "quiet 2", "loud"] and worker.wake_due() is None
    time.sleep(2 * GROUP_WAIT)  # idle has run: asleep again (its timed wait would take some)
    for i in range(WAKE_COUNT):  # a flood's batches: woken once this many wait
        worker.put_quietly(lambda i=i: done.append(i))
    while len(done) < 3 + WAKE_COUNT and time.monotonic() < deadline:
        time.sleep(0.005)
    assert done[3:] == list(range(WAKE_COUNT))
    worker.stop(meanwhile=lambda: None)
    assert not errors


def test_the_run_loop_wakes_the_worker_for_quiet_jobs(daemon):
    timers = [job for due, job in daemon.loop._timers]
    assert daemon.ctx.worker.wake not in timers  # the loop is set up by run()
    daemon.loop.run = lambda: None
    daemon._shutdown = lambda: None
    daemon.run()
    assert daemon.ctx.worker.wake in [job for due, job in daemon.loop._timers]
    daemon.ctx.worker.stop(meanwhile=lambda: None)


# -- found by review: each fails on the first version of the split ------------
def test_an_expiry_queued_before_a_new_ban_never_lifts_the_new_one(daemon):
    store, ledger, engine = daemon.ctx.store, daemon.ledger, daemon.ctx.engine
    source, now = ipaddress.ip_address("198.51.100.7"), time.time()
    store.add_ban(BanRecord(str(source), now - 100, now - 1))  # over, lift not yet done
    daemon._housekeeping()  # queues the expiry's lift
    job = daemon.ctx.worker.jobs.get_nowait()
    # meanwhile the host scans again: a new ban, stored before the lift runs
    store.add_ban(BanRecord(str(source), now, now + 3600, reason="again"))
    engine.restore(source, now, now + 3600)
    job()
    assert store.get_ban(str(source)).reason == "again"  # kept
    assert engine.is_blocked(source) and not ledger.expiring


def test_a_lift_takes_the_ban_from_the_engine_too(daemon):
    store, engine = daemon.ctx.store, daemon.ctx.engine
    source, now = ipaddress.ip_address("198.51.100.8"), time.time()
    store.add_ban(BanRecord(str(source), now, now + 60))
    engine.restore(source, now, now + 60)
    daemon.ledger.lift(store.get_ban(str(source)), "fleet")
    assert not engine.is_blocked(source) and store.get_ban(str(source)) is None


def test_a_call_that_timed_out_never_runs_later():
    inbox, ran, errors = Inbox(), [], []

    def caller():
        try:
            inbox.call(lambda: ran.append(1), timeout=0.05)
        except TimeoutError as err:
            errors.append(err)

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join(5)
    inbox.run_pending()  # the owner comes back to its inbox only now
    assert errors and not ran


def count_script(tmp_path: Path) -> Path:
    script = tmp_path / "kill_route"
    script.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/ran\n')
    script.chmod(0o755)
    return script


def test_block_of_a_recorded_ban_the_engine_lost_runs_no_action_twice(tmp_path):
    script = count_script(tmp_path)
    daemon = make_daemon(tmp_path, f'BLOCK_NFTABLES="0"\nKILL_ROUTE="{script} $TARGET$"\n'
                                   'KILL_ROUTE_UNDO="/bin/true $TARGET$"\n')
    daemon.ctx.worker.start()
    try:
        assert daemon.commands.block("198.51.100.9", 600)["ok"]
        daemon.ctx.engine.lift(ipaddress.ip_address("198.51.100.9"))  # e.g. its table was full
        again = daemon.commands.block("198.51.100.9", 1200)
        assert again["ok"] and again.get("already")
        assert (tmp_path / "ran").read_text().split() == ["198.51.100.9"]
        assert daemon.ctx.engine.is_blocked(ipaddress.ip_address("198.51.100.9"))
    finally:
        daemon.ctx.worker.stop(meanwhile=lambda: None)


def test_a_fleet_ban_the_worker_cannot_take_is_not_left_in_the_engine(daemon):
    daemon.ctx.worker.jobs = queue.Queue(1)
    daemon.ctx.worker.jobs.put(None)  # full
    daemon.commands.fleet_ban({"address": "198.51.100.20", "origin": "b", "until": None})
    assert not daemon.ctx.engine.is_blocked(ipaddress.ip_address("198.51.100.20"))


def test_a_control_command_that_fails_still_gets_a_reply(daemon):
    daemon.ctx.store.close()  # every state read now fails
    reply = daemon.commands.handle({"command": "list"})
    assert reply["ok"] is False and "see the log" in reply["error"]


def test_what_the_kernel_sensor_logs_is_judged_with_the_kernels_facts(tmp_path):
    from portsentinel.engine import SYN, Kind, Probe, TCP, Verdict

    daemon = make_daemon(tmp_path, 'BLOCK_NFTABLES="0"\nKILL_HOSTS_DENY="ALL: $TARGET$"\n'
                                   f'HOSTS_DENY_FILE="{tmp_path}/deny"\n')
    decisions = []
    daemon.probes.act = decisions.append  # the decision, not its actions

    def logged(what, port, source="198.51.100.30", t=1.0):
        probe = Probe(ipaddress.ip_address(source), port, TCP, Kind.SYN, t + port / 1000, SYN,
                      trap=what not in ("contact", "served"))
        daemon.probes._kernel_logged(what, probe)
        return decisions[-1]

    # first contacts: served ones are successes, so a browsing client never trips the test
    for port in range(3000, 3020):
        assert logged("served", port, "198.51.100.31").verdict is Verdict.PENDING
    # failed first contacts (no trap ports touched): the slow-scan test decides, at once
    verdicts = [logged("contact", port).verdict for port in (2001, 2002, 2003, 2004)]
    assert verdicts[:3] == [Verdict.PENDING] * 3 and verdicts[3] is Verdict.BLOCK
    assert decisions[-1].slow_scan == 4 and not decisions[-1].recheck_after
    # a trap hit the kernel left to us (no kernel ban): judged as unserved, not a reply
    assert logged("hit", 25, "198.51.100.32").verdict is Verdict.BLOCK


def test_a_kernel_log_batch_is_reported_as_one_job_and_each_report_on_its_own(daemon):
    """One queue hand-over for a batch of kernel-logged probes, in order; a
    report that fails loses no other."""
    from portsentinel.engine import TCP, Kind, Probe

    class Sensor:
        kernel_log = True

        def read(self):
            for i in (7, 8, 9):
                yield "ban", Probe(ipaddress.ip_address(f"198.51.100.{i}"), 23, TCP, Kind.SYN,
                                   time.time())

    class Bans:
        def command(self, address, seconds):
            return f"add element {address}"

    reported = []
    daemon.ctx.bans = Bans()
    daemon.alerts.report = lambda decision, *rest: (
        reported.append(str(decision.probe.source)),
        1 / 0 if decision.probe.source.packed[-1] == 8 else None)
    daemon.probes.read(Sensor())
    assert daemon.ctx.worker.jobs.qsize() == 1
    daemon.ctx.worker.jobs.get_nowait()()
    assert reported == ["198.51.100.7", "198.51.100.8", "198.51.100.9"]


def test_housekeeping_slows_down_when_all_is_quiet_but_not_past_a_ban_end(daemon):
    """An idle daemon barely wakes (issue 18); a ban still ends on time. After
    a burst of probes one more turn a second later, then quiet at once: not
    ten wakes a second for a scan that is banned after its first probe."""
    def step() -> float:
        daemon._housekeeping()
        return daemon._housekeeping_at - time.monotonic()

    assert step() == pytest.approx(1.0, abs=0.1)  # just started: something happened
    assert step() == pytest.approx(10.0, abs=0.1)  # nothing since
    daemon.ctx.store.add_ban(BanRecord("198.51.100.8", time.time(), time.time() + 4))
    assert step() == pytest.approx(4.0, abs=0.2)
    daemon.loop.last_event = time.monotonic()  # a probe
    assert step() == pytest.approx(1.0, abs=0.1)
    assert step() == pytest.approx(4.0, abs=0.2)  # quiet again: the ban's end


def test_the_served_ports_are_polled_on_housekeepings_turns_every_ten_seconds(daemon):
    """The kernel learns a served port from its first client's packet; the
    poll (for ports no packet reached yet) shares housekeeping's wake-ups and
    runs once in SERVED_EVERY, not once a second."""
    pushes = []
    daemon.firewall.push_served = lambda: pushes.append(time.monotonic())
    daemon._housekeeping()
    daemon.loop.last_event = time.monotonic()
    daemon._housekeeping()
    assert len(pushes) == 1
    daemon._next_served -= SERVED_EVERY
    daemon._housekeeping()
    assert len(pushes) == 2
    assert SERVED_EVERY <= HOUSEKEEPING_IDLE  # an idle daemon's one wake-up does both


def test_addresses_are_polled_every_30_s_without_route_events_else_every_5_min(daemon):
    daemon._housekeeping()
    assert daemon._next_addresses - time.monotonic() == pytest.approx(ADDRESSES_EVERY, abs=1)
    daemon.route_watch = object()  # rtnetlink tells of every change (or of lost ones)
    daemon._next_addresses = 0.0
    daemon._housekeeping()
    assert daemon._next_addresses - time.monotonic() == pytest.approx(ADDRESSES_WATCHED, abs=1)


class GroupedBans:
    """A firewall that records its transactions (NftBans' interface)."""

    def __init__(self, refuse: str = ""):
        self.transactions: list[list[str]] = []
        self.refuse = refuse

    def command(self, address, seconds):
        return f"add element {address}"

    def _check(self, addresses):
        from portsentinel.nft import SetFull
        if self.refuse in addresses:
            raise SetFull("the ban set is full")

    def ban(self, address, seconds=0, replace=False):
        self._check([str(address)])
        self.transactions.append([str(address)])
        return self.command(address, seconds)

    def ban_each(self, pairs):
        addresses = [str(a) for a, _ in pairs]
        self._check(addresses)
        self.transactions.append(addresses)
        return [self.command(a, s) for a, s in pairs]


def trap_hits(*last_bytes):
    from portsentinel.engine import TCP, Kind, Probe

    class Sensor:
        kernel_log = True

        def read(self):
            for i in last_bytes:
                yield "hit", Probe(ipaddress.ip_address(f"198.51.100.{i}"), 23, TCP, Kind.SYN,
                                   time.time(), trap=True)
    return Sensor()


def test_the_bans_of_a_kernel_log_batch_are_one_transaction_in_groups(daemon):
    """Userspace bans (KERNEL_TRAP="0") from one kernel log batch go to the
    firewall together, BAN_GROUP at most (issue 18: a transaction per ban was
    the packet thread's biggest cost); each report still has its own result,
    in order."""
    from portsentinel.daemon.probes import BAN_GROUP

    daemon.ctx.bans = bans = GroupedBans()
    reported = []
    daemon.alerts.report = lambda decision, nft_result, *rest: reported.append(
        (str(decision.probe.source), nft_result))
    sources = list(range(1, BAN_GROUP + 4))
    daemon.probes.read(trap_hits(*sources))
    assert [len(t) for t in bans.transactions] == [BAN_GROUP, 3]
    daemon.ctx.worker.jobs.get_nowait()()
    assert reported == [(f"198.51.100.{i}", f"add element 198.51.100.{i}") for i in sources]


def test_a_refused_group_is_banned_one_by_one_so_each_gets_its_own_result(daemon):
    from portsentinel.nft import SetFull

    daemon.ctx.bans = bans = GroupedBans(refuse="198.51.100.2")
    reported = {}
    daemon.alerts.report = lambda decision, nft_result, *rest: reported.__setitem__(
        str(decision.probe.source), nft_result)
    daemon.probes.read(trap_hits(1, 2, 3))
    daemon.ctx.worker.jobs.get_nowait()()
    assert bans.transactions == [["198.51.100.1"], ["198.51.100.3"]]
    assert isinstance(reported.pop("198.51.100.2"), SetFull) and daemon.ledger.set_full
    assert reported == {a: f"add element {a}" for a in ("198.51.100.1", "198.51.100.3")}


def test_a_busy_kernel_log_lets_the_next_batch_gather_a_lone_hit_does_not_wait(daemon,
                                                                               monkeypatch):
    """Under a flood a run-loop wake cost more than a source's handling
    (issue 18: 150 -> 100 us a source at 5,000 a second): after a batch of
    two reports or more the loop waits COALESCE before it reads again. A
    lone scan's first probe is a batch of one: no wait before its ban."""
    import portsentinel.daemon.probes as probes
    slept = []
    monkeypatch.setattr(probes.time, "sleep", slept.append)
    daemon.ctx.bans = GroupedBans()
    daemon.alerts.report = lambda *args: None
    daemon.probes.read(trap_hits(1))
    assert slept == [] and daemon.ctx.bans.transactions == [["198.51.100.1"]]
    daemon.probes.read(trap_hits(2, 3))
    assert slept == [probes.COALESCE]
