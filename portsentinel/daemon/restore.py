"""At start, the engine and the firewall are brought in line with the state
(after a restart or a crash); the slow-scan test's state is kept across
restarts."""

from __future__ import annotations

import base64
import json
import time

from .. import logs
from ..addrset import from_stored
from .context import Context
from .firewall import Firewall
from .ledger import BanLedger

SLOW_SCANS = "sequential"  # the state's blob


def restore(ctx: Context, ledger: BanLedger, firewall: Firewall) -> None:
    """Expired bans lifted; every stored ban back in the engine and
    re-asserted in the nftables set with the time it has left (one batch;
    bans already there are left as they are). Bans found only in our sets
    are adopted on the worker, off the start-up path. Compatibility commands
    are not run again (that would duplicate their rules, 1.2's bug)."""
    started = time.perf_counter()
    now = time.time()
    expired = ctx.store.expired(now)
    for record in expired:
        ledger.lift(record, "expire")
    load_slow_scans(ctx)
    rows = ctx.store.ban_times()
    bans = [(from_stored(a), since, until) for a, since, until in rows]
    ctx.engine.restore_many(bans)
    ctx.engine.restore_offences({from_stored(a): n for a, n in ctx.store.offences().items()})
    if ctx.bans is not None:
        ctx.bans.elements.add_each((ip, 0 if until is None else max(0.0, until - now))
                                   for ip, _, until in bans)
        known = {a for a, _, _ in rows}
        ctx.worker.put(lambda: firewall.adopt(known))
    ctx.metrics.active_bans.set(len(rows))
    if rows or expired:
        ctx.log(f"adminalert: restored {len(rows)} bans (re-asserted in the firewall), "
                f"lifted {len(expired)} expired, in {time.perf_counter() - started:.2f} s",
                logs.INFO)


def load_slow_scans(ctx: Context) -> None:
    blob = ctx.store.blob(SLOW_SCANS)
    if blob is None or ctx.engine.sequential is None:
        return
    try:
        ctx.engine.sequential.load(decode(blob))
    except (ValueError, KeyError, TypeError) as err:
        ctx.log.error(f"adminalert: ERROR: slow-scan state not restored: {err}")


def slow_scans(ctx: Context) -> bytes | None:
    """Owner thread: the slow-scan state to store, or None when it is off."""
    if ctx.engine.sequential is None:
        return None
    return encode(ctx.engine.sequential.dump())


def encode(state: dict) -> bytes:
    def value(v):
        if isinstance(v, (bytes, bytearray)):
            return {"b64": base64.b64encode(v).decode()}
        if isinstance(v, (list, tuple)):
            return [value(item) for item in v]
        return v
    return json.dumps({k: value(v) for k, v in state.items()}).encode()


def decode(blob: bytes) -> dict:
    def value(v):
        if isinstance(v, dict) and "b64" in v:
            return base64.b64decode(v["b64"])
        if isinstance(v, list):
            return [value(item) for item in v]
        return v
    return {k: value(v) for k, v in json.loads(blob).items()}
