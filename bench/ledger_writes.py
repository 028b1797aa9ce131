"""The worker's part of a ban (BanLedger.settle: the state, the history and
blocked files), side by side in one run:

    .venv/bin/python bench/ledger_writes.py [--bans 5000] [--rounds 5] [--against main]

Each contender settles the same burst of bans, on a fresh state file in a
temporary directory, then writes what is left as the worker does when its
queue empties; microseconds a ban, the median of the rounds (contenders
take turns, so they share the machine's ups and downs). Contenders:
  REV                   the code at git revision --against (git archive)
  this tree             a burst, as the worker sees one
  this tree, one by one the queue empty after every ban (no burst)
Each round runs in its own process. Nothing is written outside the temporary
directory; no root, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settle_burst(bans: int, one_by_one: bool) -> dict:
    """One round, in this process: µs a ban."""
    import io
    import ipaddress
    import time

    import portsentinel
    from portsentinel import config as configuration, logs
    from portsentinel.daemon import Daemon
    from portsentinel.engine import NFTABLES
    from portsentinel.store import BanRecord

    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "ignore").write_text("")
        config = configuration.parse(
            f'STATE_FILE="{work}/state.db"\nHISTORY_FILE="{work}/h"\n'
            f'BLOCKED_FILE="{work}/b"\nIGNORE_FILE="{work}/ignore"\n', "bench")
        daemon = Daemon(config, "atcp", "audp", logs.Log(to_syslog=False, stream=io.StringIO()))
        ledger, now = daemon.ledger, time.time()
        records = [BanRecord(str(ipaddress.IPv6Address((0x20010DB8 << 96) + (5 << 64) + i)),
                             now, now + 3600, 1000 + i % 1000, "tcp", "atcp",
                             "TCP SYN/Normal scan") for i in range(bans)]
        idle = getattr(ledger, "flush", lambda: None)  # the worker's hook; none before it
        started = time.perf_counter()
        for record in records:
            ledger.settle(record, [NFTABLES], "nft add element inet portsentinel ban6 {...}")
            if one_by_one:
                idle()
        idle()
        elapsed = time.perf_counter() - started
        stored = daemon.ctx.store.count()
        daemon.ctx.store.close()
    assert stored == bans, (stored, bans)
    return {"us_per_ban": 1e6 * elapsed / bans, "code": portsentinel.__file__}


def run_round(tree: Path, bans: int, one_by_one: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # ahead of the editable install
    args = [sys.executable, __file__, "--round", str(bans)] + (["--one-by-one"] if one_by_one
                                                                 else [])
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True,
                         timeout=120).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bans", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--round", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-by-one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        print(json.dumps(settle_burst(args.round, args.one_by_one)))
        return
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against,
                                  "portsentinel"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        contenders = [(args.against, Path(old), False), ("this tree", ROOT, False),
                      ("this tree, one by one", ROOT, True)]
        results: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        for _ in range(args.rounds):
            for name, tree, one_by_one in contenders:
                result = run_round(tree, args.bans, one_by_one)
                assert result["code"].startswith(str(tree)), result  # the code meant
                results[name].append(result["us_per_ban"])
    base = statistics.median(results[args.against])
    print(f"{args.bans} bans a round, {args.rounds} rounds; median (min-max) us a ban")
    for name, values in results.items():
        print(f"  {name:24} {statistics.median(values):7.1f} ({min(values):.1f}-"
              f"{max(values):.1f})  {base / statistics.median(values):.1f}x")


if __name__ == "__main__":
    main()
