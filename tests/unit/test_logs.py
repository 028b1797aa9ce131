import io
import ipaddress
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from portsentinel import logs
from portsentinel.engine import FIN, SYN, TCP, UDP, Kind, Probe
from portsentinel.responders import Records, append_line_once

A = ipaddress.ip_address


def probe(kind, proto=TCP, flags=0, src="198.51.100.2", port=111):
    return Probe(A(src), port, proto, kind, 0.0, flags)


@pytest.mark.parametrize("p, line", [
    (probe(Kind.CONNECT), "attackalert: Connect from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.CONNECT, UDP), "attackalert: Connect from host: 198.51.100.2/198.51.100.2 to UDP port: 111"),
    (probe(Kind.SYN), "attackalert: TCP SYN/Normal scan from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.FIN), "attackalert: TCP FIN scan from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.NULL), "attackalert:  TCP NULL scan from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.XMAS), "attackalert: TCP XMAS scan from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.UDP, UDP), "attackalert: UDP scan from host: 198.51.100.2/198.51.100.2 to UDP port: 111"),
    (probe(Kind.OTHER, flags=SYN | FIN),
     "attackalert: Unknown Type: TCP Packet Flags: SYN: 1 FIN: 1 ACK: 0 PSH: 0 URG: 0 RST: 0 "
     "from host: 198.51.100.2/198.51.100.2 to TCP port: 111"),
    (probe(Kind.SYN, src="2001:db8::2"),
     "attackalert: TCP SYN/Normal scan from host: 2001:db8::2/2001:db8::2 to TCP port: 111"),
])
def test_alert_lines_are_portsentry_verbatim(p, line):
    assert logs.alert_line(p) == line


def test_resolved_name_goes_first():
    assert "host: scanner.example/198.51.100.2 to" in logs.alert_line(probe(Kind.SYN), "scanner.example")


def test_block_lines():
    assert logs.route_line("198.51.100.2", "/sbin/iptables -I INPUT -s 198.51.100.2 -j DROP") == (
        'attackalert: Host 198.51.100.2 has been blocked via dropped route using command: '
        '"/sbin/iptables -I INPUT -s 198.51.100.2 -j DROP"')
    assert logs.wrappers_line("198.51.100.2", "ALL: 198.51.100.2 : DENY") == (
        'attackalert: Host 198.51.100.2 has been blocked via wrappers with string: '
        '"ALL: 198.51.100.2 : DENY"')
    assert logs.already_blocked_line("198.51.100.2") == (
        "attackalert: Host: 198.51.100.2 is already blocked. Ignoring")
    assert logs.ignoring_response_line(TCP) == (
        "attackalert: Ignoring TCP response per configuration file setting.")


def test_history_line_format():
    line = logs.history_line(942286729, "192.0.2.12", None, 111, TCP)
    assert re.fullmatch(r"942286729 - \d\d/\d\d/\d{4} \d\d:\d\d:\d\d "
                        r"Host: 192\.0\.2\.12/192\.0\.2\.12 Port: 111 TCP Blocked", line)
    assert line[12:31] == time.strftime("%m/%d/%Y %H:%M:%S", time.localtime(942286729))


def test_records_write_history_and_blocked_per_mode(tmp_path: Path):
    out = io.StringIO()
    records = Records(tmp_path / "h" / "portsentry.history", tmp_path / "portsentry.blocked",
                      logs.Log(to_syslog=False, stream=out))
    records.blocked(1_700_000_000, "198.51.100.2", None, 1, TCP, "atcp")
    records.blocked(1_700_000_001, "2001:db8::2", None, 7, UDP, "audp")
    history = (tmp_path / "h" / "portsentry.history").read_text().splitlines()
    assert len(history) == 2 and history[1].endswith("Host: 2001:db8::2/2001:db8::2 Port: 7 UDP Blocked")
    assert (tmp_path / "portsentry.blocked.atcp").read_text().count("Blocked") == 1
    assert (tmp_path / "portsentry.blocked.audp").read_text().count("Blocked") == 1


def test_unwritable_history_is_logged_not_raised(tmp_path: Path):
    out = io.StringIO()
    blocker = tmp_path / "file"
    blocker.write_text("")
    records = Records(blocker / "history", blocker / "blocked", logs.Log(to_syslog=False, stream=out))
    records.blocked(1, "198.51.100.2", None, 1, TCP, "atcp")
    assert "cannot write" in out.getvalue()


def test_hosts_deny_append_is_idempotent(tmp_path: Path):
    deny = tmp_path / "hosts.deny"
    deny.write_text("# existing\nALL: 192.0.2.9 : DENY")  # no final newline
    assert append_line_once(deny, "ALL: 198.51.100.2 : DENY")
    assert not append_line_once(deny, "ALL: 198.51.100.2 : DENY")
    assert deny.read_text() == "# existing\nALL: 192.0.2.9 : DENY\nALL: 198.51.100.2 : DENY\n"


def test_fail2ban_stock_filter_matches_history(tmp_path: Path):
    if not shutil.which("fail2ban-regex"):
        pytest.fail("fail2ban missing; run scripts/test.sh")
    records = Records(tmp_path / "portsentry.history", tmp_path / "portsentry.blocked",
                      logs.Log(to_syslog=False, stream=io.StringIO()))
    now = time.time()
    records.blocked(now, "198.51.100.2", None, 1, TCP, "atcp")
    records.blocked(now, "2001:db8::2", None, 53, UDP, "audp")
    done = subprocess.run(["fail2ban-regex", str(tmp_path / "portsentry.history"),
                           "/etc/fail2ban/filter.d/portsentry.conf"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Failregex: 2 total", done.stdout), done.stdout


def test_repeat_lines_are_limited_overall_and_summarised():
    from portsentinel.logs import LineBudget
    budget = LineBudget(per_second=20, burst=20)
    taken = sum(budget.take(100.0 + i / 10_000) for i in range(10_000))  # 10,000 in 1 s
    assert 38 <= taken <= 41  # the burst, then 20 a second
    assert budget.summary() == (f"attackalert: {10_000 - taken} more probes from blocked hosts "
                                "were not logged (repeat lines are limited to 20/s overall)")
    assert budget.summary() is None
    assert budget.take(200.0)  # refilled a while later


def test_address_text_is_what_ipaddress_writes():
    import ipaddress
    import random

    from portsentinel.addrset import text

    rng = random.Random(11)
    samples = ["::", "::1", "::ffff:198.51.100.7", "::198.51.100.7", "::102:304", "2001:db8::",
               "2001:db8:0:0:1:0:0:1", "2001:0:0:1::1", "fe80::1", "::ffff:0:0", "64:ff9b::1"]
    samples += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(2000)]
    # sparse ones: zero groups (so zero runs) of every length and place
    for _ in range(5000):
        groups = [0 if rng.random() < 0.6 else rng.getrandbits(16) for _ in range(8)]
        samples.append(str(ipaddress.IPv6Address(int("".join(f"{g:04x}" for g in groups), 16))))
    for sample in samples + ["198.51.100.7", "0.0.0.0"]:
        address = ipaddress.ip_address(sample)
        assert text(address) == str(address), sample


def test_records_of_one_job_are_written_once_a_file_in_order(tmp_path: Path, monkeypatch):
    """A kernel log batch's bans (issue 18: capacity): one write a file at the
    end of the job, not an open/write/close per line; the lines as written
    one by one would be."""
    records = Records(tmp_path / "history", tmp_path / "blocked",
                      logs.Log(to_syslog=False, stream=io.StringIO()))
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    with records.grouped():
        for i in range(5):
            records.blocked(1_700_000_000 + i, f"198.51.100.{i}", None, i, TCP, "atcp")
        assert not (tmp_path / "history").exists()
    assert len(writes) == 2
    history = (tmp_path / "history").read_text().splitlines()
    assert [line.split()[0] for line in history] == [str(1_700_000_000 + i) for i in range(5)]
    assert (tmp_path / "blocked.atcp").read_text().splitlines() == history
    records.blocked(1, "198.51.100.9", None, 1, TCP, "atcp")  # outside a job: at once
    assert len(writes) == 4


def test_log_lines_of_one_job_are_flushed_once_and_other_threads_are_not_held():
    out = io.StringIO()
    flushes = []
    out.flush = lambda: flushes.append(out.getvalue().count("\n"))
    log = logs.Log(to_syslog=False, stream=out)
    with log.grouped():
        log("attackalert: one")
        log("attackalert: two")
        other = threading.Thread(target=log, args=("adminalert: from another thread",))
        other.start()
        other.join()
        assert out.getvalue().count("\n") == 1  # the other thread's line, at once
    assert flushes == [1, 3]
    assert [line.split(": ", 1)[1] for line in out.getvalue().splitlines()] == [
        "adminalert: from another thread", "attackalert: one", "attackalert: two"]
