"""Slow-scan detection (the sequential test) on generated event streams:
attempts to detect and false positives. Pure simulation, no network, fixed
seeds; writes the "Slow scans" section of docs/benchmarks.md.

    .venv/bin/python bench/trw.py
"""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from portsentinel.trw import SequentialDetector, TrwParameters  # noqa: E402

SERVED = [22, 80, 443, 8080]
POPULAR = [80, 23, 443, 21, 22, 25, 3389, 110, 445, 139, 143, 53, 135, 3306, 8080, 1723,
           111, 995, 993, 5900]  # nmap moves these to the front
START, END = "<!-- slow-scans -->", "<!-- /slow-scans -->"


def scan(order: list[int], gap: float, interleave: bool, seed: int) -> tuple[int, int, float] | None:
    """(failed contacts, probes, seconds) until detection, or None."""
    detector = SequentialDetector(TrwParameters(bloom_bits=1 << 16), key=seed.to_bytes(16, "big"))
    t = 0.0
    for n, port in enumerate(order, 1):
        if interleave:  # evasion: touch every real service before each probe
            for served in SERVED:
                t += 0.001
                detector.contact(b"scanner", served, True, t)
        t += gap
        found = detector.contact(b"scanner", port, port in SERVED, t)
        if found:
            return found, n, t
    return None


def scanner_rows(runs: int) -> list[list[str]]:
    rows = []
    styles = [
        ("random ports 1-65535", lambda r: r.sample(range(1, 65536), 200), 0.001, False),
        ("nmap order (popular first)", lambda r: r.sample(POPULAR, len(POPULAR))
         + r.sample(range(1024, 65536), 200), 0.001, False),
        ("above 1024 only, one probe / 15 min (-T1 pace)", lambda r: r.sample(range(1025, 65536), 200),
         900.0, False),
        ("above 1024 only, one probe / 2 h", lambda r: r.sample(range(1025, 65536), 200), 7200.0, False),
        ("interleaving all 4 real services (evasion)", lambda r: r.sample(range(1025, 65536), 200),
         1.0, True),
    ]
    for name, ports, gap, interleave in styles:
        results = [scan(ports(random.Random(seed)), gap, interleave, seed) for seed in range(runs)]
        found = [r for r in results if r]
        failures = [f for f, _, _ in found]
        probes = [p for _, p, _ in found]
        hours = [t / 3600 for _, _, t in found]
        rows.append([name, f"{len(found)}/{runs}", f"{statistics.median(failures):.0f}",
                     f"{max(failures)}", f"{statistics.median(probes):.0f}",
                     f"{statistics.median(hours):.2f}"])
    return rows


def benign_rows(clients: int) -> list[list[str]]:
    rows = []
    for rate in (0.0, 0.005, 0.01, 0.02):
        flagged = 0
        for c in range(clients):
            detector = SequentialDetector(TrwParameters(bloom_bits=1 << 16), key=b"k" * 16)
            rng = random.Random(c)
            for step in range(7 * 200):
                port = rng.choice(SERVED) if rng.random() >= rate else rng.randrange(1025, 65536)
                t = (step // 200) * 86400 + (step % 200) * 400.0
                if detector.contact(b"client", port, port in SERVED, t):
                    flagged += 1
                    break
        rows.append([f"{rate:.1%}", f"{flagged / clients:.1%}", f"{flagged / clients / 7:.2%}"])
    return rows


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def section(runs: int = 300, clients: int = 500) -> str:
    p = TrwParameters()
    return f"""{START}
## Slow scans: the sequential test

`bench/trw.py`: the detector (`portsentinel/trw.py`) on generated first-contact
streams, time as input; defaults θ0 = {p.theta0}, θ1 = {p.theta1}, P_D = {p.p_detect}, P_F = {p.p_false},
`SLOW_SCAN_MEMORY` = 24 h. The host serves TCP {", ".join(map(str, SERVED))}; a probe to
any other port is a failed first contact. {runs} scanners per row.

{table(["scanner", "detected", "median failed contacts", "max failed contacts",
        "median probes", "median hours"], scanner_rows(runs))}

Legitimate clients: a week each, 200 connections a day to the real services;
with the given probability a connection goes to a random closed port instead
(a mistake). Share of {clients} clients flagged:

{table(["mistakes per connection", "flagged per client-week", "per client-day"],
       benign_rows(clients))}

A client that only uses the real services is never flagged. Occasional mistakes
are forgiven because the evidence decays over `SLOW_SCAN_MEMORY`; several
mistyped ports within a few hours look, to any first-contact test, like a slow
scan. Raise `SLOW_SCAN_MEMORY` to catch slower scans, lower it (or
`SLOW_SCAN_FALSE_POSITIVE`) to forgive more. Memory: two 1 MiB Bloom generations
plus a 65,536-source table, whatever the traffic.
{END}
"""


def main() -> None:
    out = ROOT / "docs/benchmarks.md"
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    new = section()
    if START in text:
        before, rest = text.split(START, 1)
        text = before + new + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + new
    out.write_text(text)
    print(new)


if __name__ == "__main__":
    main()
