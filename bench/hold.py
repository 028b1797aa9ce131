"""The first-contact hold (issue 16), side by side in one run:

    sudo .venv/bin/python bench/hold.py [--runs 20]     # prints the tables
    sudo .venv/bin/python bench/run.py --hold-only      # the same, from run.py

Contenders, each started fresh for every run in the same lab:
  PortSentry 1.2      Debian's binary, -atcp/-audp, KILL_ROUTE iptables (bench/run.py)
  hold off            portsentinel with FIRST_CONTACT_HOLD="0" (the defaults before)
  hold on (default)   portsentinel's defaults: a stranger's first SYN waits 20 ms

1. What each scan learns, over repeated runs: the real ports that sent the
   scanner a SYN-ACK, counted at the target (nft counters in the output
   hook), so a scan can stop after a few seconds (everything that decides
   this happens in its first milliseconds).
2. The price for a new client: the first connection's time from a fresh
   address each, median and p99 (hold off and on).
3. A busy server: new client sources a second, each first SYN held; the
   daemon's CPU (cgroup, forks included) and what was held, late or unheld.
All traffic stays in the lab's namespaces (198.51.100.0/24, 2001:db8::/64).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the lab's contenders and helpers)
from run import (ATTACKER4, ATTACKER6, PROBES, REAL_TCP, TARGET4, TARGET6, CpuGroup,  # noqa: E402
                 Portsentinel, Portsentry12, netlab, table)

SCANS = [  # (name, argv after the tool, IPv6?)
    ("nmap -sS", ["-sS"], False),
    ("nmap -sT", ["-sT"], False),
    ("nmap -sS -T5", ["-sS", "-T5"], False),
    ("nmap -sS -T5 -p-", ["-sS", "-T5", "-p-"], False),
    ("IPv6 nmap -sS", ["-sS"], True),
    ("IPv6 nmap -sT", ["-sT"], True),
    ("masscan 100,000/s all ports", None, False),
]
SCAN_SECONDS = 3  # nmap's host timeout; masscan's whole run is ~0.7 s + 1 s wait


def revealed_install(lab, source: str) -> None:
    """A counter per real port: SYN-ACKs from it to the scanner."""
    match = "ip6 daddr" if ":" in source else "ip daddr"
    rules = "\n".join(f"{match} {source} tcp sport {p} tcp flags & (syn | ack) == syn | ack "
                      f"counter name r{p}" for p in sorted(REAL_TCP))
    counters = "\n".join(f"counter r{p} {{}}" for p in sorted(REAL_TCP))
    lab.exec("target", "nft", "delete", "table", "inet", "benchhold")
    done = lab.exec("target", "nft", "-f", "-", input=f"""
table inet benchhold {{
  {counters}
  chain out {{
    type filter hook output priority 100; policy accept;
    {rules}
  }}
}}
""")
    assert done.returncode == 0, done.stderr


def revealed_read(lab) -> int:
    out = json.loads(lab.exec("target", "nft", "-j", "list", "counters", "table", "inet",
                              "benchhold").stdout)
    return sum(1 for item in out["nftables"] if "counter" in item
               and item["counter"]["packets"] > 0)


def scan_once(lab, contender, argv, v6: bool, mac: str) -> tuple[int, bool]:
    """(real ports revealed, source banned)."""
    source = ATTACKER6 if v6 else ATTACKER4
    target = TARGET6 if v6 else TARGET4
    contender.start()
    revealed_install(lab, source)
    if argv is None:
        # bounded: masscan has been seen to hang in its wait against a blocking target
        lab.exec("attacker", "timeout", "-s", "KILL", "15", "masscan", target, "-p0-65535",
                 "--rate", "100000", "--wait", "1", "-e", "eth0", "--router-mac", mac,
                 "--adapter-ip", source, timeout=60)
    else:
        timing = [] if any(a.startswith("-T") for a in argv) else ["-T4"]
        lab.exec("attacker", "nmap", *(["-6"] if v6 else []), *timing, *argv, "-Pn", "-n",
                 "--host-timeout", f"{SCAN_SECONDS}s", "-e", "eth0", "-S", source, target,
                 timeout=60)
    found, detected = revealed_read(lab), contender.blocked(source)
    contender.stop()
    return found, detected


def leaks(lab, contenders, runs: int, mac: str, only: str = "") -> list[list]:
    rows = []
    for name, argv, v6 in SCANS:
        if only not in name:
            continue
        for contender in contenders:
            results = [scan_once(lab, contender, argv, v6, mac) for _ in range(runs)]
            shown = [found for found, _ in results]
            row = [name, contender.name, str(runs), str(sum(1 for r in shown if r)),
                   str(sum(shown)), str(max(shown)),
                   str(sum(1 for _, detected in results if not detected))]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def first_connections(lab, contender, count: int) -> list[float]:
    """Seconds of a first connect to port 80, each from an address never seen."""
    addresses = [f"2001:db8::7:{i:x}" for i in range(count)]
    for address in addresses:
        lab.exec("client", "ip", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    contender.start()
    code = ("import socket,sys,time,json\nout=[]\n"
            "for a in sys.argv[2:]:\n t=time.monotonic()\n"
            " socket.create_connection((sys.argv[1], 80), 5, (a, 0)).close()\n"
            " out.append(time.monotonic()-t)\n time.sleep(0.01)\nprint(json.dumps(out))\n")
    try:
        done = lab.exec("client", sys.executable, "-c", code, TARGET6, *addresses, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    finally:
        contender.stop()
        for address in addresses:
            lab.exec("client", "ip", "addr", "del", f"{address}/64", "dev", "eth0")


def latency_rows(lab, contenders, count: int) -> list[list]:
    rows = []
    for contender in contenders:
        times = sorted(first_connections(lab, contender, count))
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        rows.append([contender.name, str(len(times)), f"{statistics.median(times) * 1000:.1f}",
                     f"{p99 * 1000:.1f}", f"{times[-1] * 1000:.1f}"])
        print(json.dumps(rows[-1]), flush=True)
    return rows


def busy(lab, contender, rate: int, seconds: float, mac: str) -> list:
    """`rate` new sources a second (a SYN each, to a served port, from distinct
    addresses in 2001:db8::1:0:0/96, routed back through the attacker)."""
    lab.exec("target", "ip", "-6", "route", "replace", "2001:db8::1:0:0/96", "via", ATTACKER6)
    contender.start()
    group = CpuGroup("hold-busy", contender.pids())
    t0 = time.monotonic()
    out = lab.exec("attacker", sys.executable, str(PROBES), "flood", "eth0", mac, TARGET6,
                   str(rate), str(seconds), "80", timeout=seconds + 60).stdout
    time.sleep(0.5)
    wall = time.monotonic() - t0
    cpu = group.used()
    group.close()
    status = contender.status()
    contender.stop()
    lab.exec("target", "ip", "-6", "route", "del", "2001:db8::1:0:0/96")
    counts = {k: int(v) for k, v in re.findall(r"(portsentinel_\w+)_total (\d+)", status)}
    row = [contender.name, str(rate), str(json.loads(out)["sent"]),
           str(counts.get("portsentinel_first_contacts_held", 0)),
           str(counts.get("portsentinel_first_contacts_held_late", 0)),
           str(counts.get("portsentinel_first_contacts_unheld", 0)), f"{100 * cpu / wall:.0f}"]
    print(json.dumps(row), flush=True)
    return row


class WithStatus(Portsentinel):
    def status(self) -> str:
        return self.lab.exec("target", str(run.PORTSENTINEL), "status", "--socket",
                             str(self.work / "ps.sock")).stdout


def measure(lab, work: Path, runs: int, clients: int, rates: list[int], only: str = "") -> str:
    """Every table of this script, in `lab` (with tests/services.py running)."""
    if not shutil.which("masscan") and "masscan" in " ".join(n for n, _, _ in SCANS if only in n):
        sys.exit("masscan is missing: apt-get install masscan")
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    off = WithStatus(lab, work, True, 'FIRST_CONTACT_HOLD="0"\n')
    off.name = "hold off (the defaults before)"
    on = WithStatus(lab, work, True)
    on.name = "hold on (defaults, 20 ms)"
    leak_rows = leaks(lab, [Portsentry12(lab, work), off, on], runs, mac, only) if runs else []
    latency = latency_rows(lab, [off, on], clients)
    load = [busy(lab, on, rate, 5.0, mac) for rate in rates]
    return "\n\n".join([
        table(["scan", "contender", "runs", "runs revealing a real port",
               "real ports revealed in all", "most in one run", "runs not detected"], leak_rows),
        table(["contender", "first connections", "median ms", "p99 ms", "max ms"], latency),
        table(["contender", "new sources/s", "SYNs sent", "held", "released late",
               "passed unheld", "daemon CPU % of a core"], load)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20,
                        help="runs per scan and contender (0: only the price)")
    parser.add_argument("--clients", type=int, default=200, help="first connections measured")
    parser.add_argument("--rates", default="2000,4000", help="new sources a second")
    parser.add_argument("--scans", default="", metavar="TEXT",
                        help="only the scans whose name holds TEXT (e.g. masscan)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it builds network namespaces)")
    with netlab.Lab("bn") as lab, tempfile.TemporaryDirectory() as tmp:
        services = lab.start("target", sys.executable, str(run.ROOT / "tests/services.py"),
                             "7200", stdout=subprocess.PIPE)
        assert services.stdout.readline().strip() == b"ready"
        print(measure(lab, Path(tmp), args.runs, args.clients,
                      [int(r) for r in args.rates.split(",")], args.scans))


if __name__ == "__main__":
    main()
