"""Slow and stealthy scans: Threshold Random Walk (Jung, Paxson, Berger,
Balakrishnan, "Fast Portscan Detection Using Sequential Hypothesis Testing",
IEEE S&P 2004). Pure: time is an input.

Each first contact of a source with a port of this host is a Bernoulli trial:
success if a real service listens there, failure if not. A benign host
succeeds with probability theta0, a scanner with theta1. The detector walks
the log-likelihood ratio of "scanner" vs "benign" and declares a scanner when
it crosses ln(P_D / P_F) (Wald's bound, with P_D the wanted detection
probability and P_F the tolerated false-positive probability per benign
host). With the paper's theta0 = 0.8, theta1 = 0.2 and P_D = 0.99,
P_F = 0.01, four failed first contacts in a row decide.

Bounded memory over hours and days:
- "was this (source, port) contacted already?" lives in a keyed Bloom filter of
  fixed size, in two generations that rotate every `memory` seconds (a pair is
  remembered between one and two periods);
- the per-source ratio lives in a fixed-capacity LRU table (oldest forgotten).

Forgetting: the paper's test has no notion of time, but a daemon runs for
months. The log ratio decays towards 0 at ln(P_D/P_F) per `memory` seconds,
so a handful of failed contacts spread over days (a mistyped port now and
then) never adds up, while a scan spread over hours still crosses the bound
(a few more trials at most).

Evasion by interleaving successful connections: only *first* contacts count,
so reconnecting to one service gains nothing, and the ratio never goes below
ln((1 - P_D) / (1 - P_F)), Wald's lower bound: the successes a scanner can
collect (one per distinct real service) buy only a bounded number of extra
failures. A host that reaches the lower bound is not declared benign for
good; it simply starts from that floor.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class TrwParameters:
    theta0: float = 0.8  # P(first contact succeeds | benign)
    theta1: float = 0.2  # P(first contact succeeds | scanner)
    p_detect: float = 0.99
    p_false: float = 0.01
    memory: float = 86400.0  # seconds a contacted pair is remembered (one generation)
    capacity: int = 65536  # sources tracked at once
    bloom_bits: int = 1 << 23  # per generation (1 MiB)
    bloom_hashes: int = 4

    def __post_init__(self):
        if not 0 < self.theta1 < self.theta0 < 1:
            raise ValueError("need 0 < theta1 < theta0 < 1")
        if not 0 < self.p_false < self.p_detect < 1:
            raise ValueError("need 0 < false-positive probability < detection probability < 1")

    @property
    def upper(self) -> float:
        return math.log(self.p_detect / self.p_false)

    @property
    def lower(self) -> float:
        return math.log((1 - self.p_detect) / (1 - self.p_false))

    @property
    def step_success(self) -> float:
        return math.log(self.theta1 / self.theta0)

    @property
    def step_failure(self) -> float:
        return math.log((1 - self.theta1) / (1 - self.theta0))


class RotatingBloom:
    """Two generations of a keyed Bloom filter: fixed memory, old pairs fade."""

    def __init__(self, bits: int, hashes: int, period: float, key: bytes):
        self.bits, self.hashes, self.period, self.key = bits, hashes, period, key
        self.current = bytearray(bits // 8)
        self.previous = bytearray(bits // 8)
        self.started: float | None = None

    def _indexes(self, item: bytes) -> list[int]:
        digest = hashlib.blake2b(item, digest_size=4 * self.hashes, key=self.key).digest()
        return [int.from_bytes(digest[4 * i:4 * i + 4], "little") % self.bits
                for i in range(self.hashes)]

    def _rotate(self, now: float) -> None:
        if self.started is None:
            self.started = now
        elif now - self.started >= self.period:
            fresh = now - self.started >= 2 * self.period
            self.previous = bytearray(len(self.current)) if fresh else self.current
            self.current = bytearray(len(self.current))
            self.started = now

    def add(self, item: bytes, now: float) -> bool:
        """Add; True if it was (probably) there already."""
        self._rotate(now)
        indexes = self._indexes(item)
        seen = all(self.current[i >> 3] >> (i & 7) & 1 for i in indexes) or all(
            self.previous[i >> 3] >> (i & 7) & 1 for i in indexes)
        for i in indexes:
            self.current[i >> 3] |= 1 << (i & 7)
        return seen


class SequentialDetector:
    def __init__(self, parameters: TrwParameters = TrwParameters(), key: bytes | None = None):
        self.p = parameters
        self.key = key or os.urandom(16)
        self.pairs = RotatingBloom(parameters.bloom_bits, parameters.bloom_hashes,
                                   parameters.memory, self.key)
        self.ratios: OrderedDict[bytes, float] = OrderedDict()
        self.failures: dict[bytes, int] = {}
        self.updated: dict[bytes, float] = {}

    def contact(self, source: bytes, port: int, success: bool, now: float) -> int | None:
        """One first-contact trial. Returns the number of failed first
        contacts when this one makes the source a scanner, else None."""
        if self.pairs.add(source + port.to_bytes(2, "big"), now):
            return None  # not a first contact
        ratio = self._decayed(self.ratios.pop(source, 0.0), self.updated.pop(source, now), now)
        failures = self.failures.pop(source, 0)
        if success:
            ratio = max(self.p.lower, ratio + self.p.step_success)
        else:
            ratio += self.p.step_failure
            failures += 1
        if ratio >= self.p.upper:
            return failures  # decided: forget it (the caller bans it)
        self.ratios[source] = ratio
        self.failures[source] = failures
        self.updated[source] = now
        if len(self.ratios) > self.p.capacity:
            old, _ = self.ratios.popitem(last=False)
            self.failures.pop(old, None)
            self.updated.pop(old, None)
        return None

    def _decayed(self, ratio: float, since: float, now: float) -> float:
        fade = max(0.0, now - since) * self.p.upper / self.p.memory
        return max(0.0, ratio - fade) if ratio > 0 else min(0.0, ratio + fade)

    @property
    def tracked(self) -> int:
        return len(self.ratios)

    # -- persistence: the caller stores these bytes (state survives restarts)
    def dump(self) -> dict:
        return {"key": self.key, "current": bytes(self.pairs.current),
                "previous": bytes(self.pairs.previous), "started": self.pairs.started,
                "ratios": [(k, v, self.failures.get(k, 0), self.updated.get(k, 0.0))
                           for k, v in self.ratios.items()]}

    def load(self, data: dict) -> None:
        if len(data["current"]) != len(self.pairs.current):
            return  # another filter size: start afresh
        self.key = self.pairs.key = data["key"]
        self.pairs.current = bytearray(data["current"])
        self.pairs.previous = bytearray(data["previous"])
        self.pairs.started = data["started"]
        self.ratios.clear()
        self.failures.clear()
        self.updated.clear()
        for source, ratio, failures, updated in data["ratios"][-self.p.capacity:]:
            self.ratios[source] = ratio
            self.failures[source] = failures
            self.updated[source] = updated
