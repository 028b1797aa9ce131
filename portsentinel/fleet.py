"""Fleet mode: one scan seen anywhere blocks it everywhere, through Redis.

Every ban a member makes itself is written as a key `<prefix>:ban:<address>`
(JSON: address, reason, origin member, since, until) whose Redis TTL is the
ban's remaining time, and announced on the channel `<prefix>:bans`. Members
subscribe and apply each other's bans within milliseconds (through their own
never-block set: nobody bans its own gateway because a peer said so); a member
that starts or reconnects reads every key, so it catches up. An unblock is
announced too and lifts the ban everywhere.

Partial evidence is shared too (FLEET_SCAN_TRIGGER): a trap hit that did not
ban here (below SCAN_TRIGGER) is added to `<prefix>:ev:<address>`, a sorted
set of "member port/protocol" entries scored by Redis's clock (members' clocks
may differ), at most EVIDENCE_CAP
entries, expiring FLEET_SCAN_WINDOW after the last one (one Lua script, one
round trip). When its entries name FLEET_SCAN_TRIGGER distinct members within
the window, the member whose evidence crossed the line bans the source like a
ban of its own (evidence grade `fleet`), once (`<prefix>:ev:<address>:fired`),
and shares it. Each member publishes each (source, port) once a window and at
most EVIDENCE_RATE a second: a spoofed flood costs Redis a bounded load.

Redis going away is not fatal: the member works locally, says so once, keeps
what it could not publish, and retries with backoff. On every (re)connection
it republishes all its own bans in force, so even a Redis that came back
empty is rebuilt from the members.
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from typing import Callable

import redis

from .addrset import canonical
from .engine import GRADES

BACKOFF = (0.5, 1, 2, 5)
MEMBER = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_TEXT = 200
MAX_MESSAGE = 4096
REJECTION_LOG_EVERY = 1.0


class BadMessage(ValueError):
    """A fleet message that does not fit the schema; `reason` names the rule."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


def read_message(raw, now: float, max_seconds: float) -> dict:
    """One fleet message, validated against the schema and rebuilt from the
    parsed values only (nothing of the raw text reaches a log line, a file or
    a command):
    {type: ban|unban, address: canonical IP (no scope), origin: member name,
     since/until/sent: finite times, until within max_seconds from now (or
     None: forever), reason: at most 200 printable characters, port, protocol}.
    Raises BadMessage."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_MESSAGE:
            raise BadMessage("too large", f"{len(raw)} bytes")
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise BadMessage("not UTF-8") from None
    try:
        message = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, TypeError) as err:
        raise BadMessage("not JSON", str(err)[:80]) from None
    if not isinstance(message, dict):
        raise BadMessage("not an object", type(message).__name__)
    kind = message.get("type", "ban")
    if kind not in ("ban", "unban"):
        raise BadMessage("unknown type")
    address = message.get("address")
    if not isinstance(address, str) or "%" in address:
        raise BadMessage("bad address")
    try:
        ip = canonical(address)
    except ValueError:
        raise BadMessage("bad address") from None
    origin = message.get("origin")
    if not isinstance(origin, str) or not MEMBER.match(origin):
        raise BadMessage("bad origin")
    clean = {"type": kind, "address": str(ip), "origin": origin}
    if kind == "unban":
        return clean
    until = _time(message, "until", optional=True)
    if until is not None:
        if until <= now:
            raise BadMessage("expired")
        until = min(until, now + max_seconds) if max_seconds > 0 else until
    clean.update(until=until, since=_time(message, "since", optional=True),
                 sent=_time(message, "sent", optional=True),
                 reason=_text(message.get("reason")) or "fleet",
                 port=_port(message.get("port")),
                 protocol=message.get("protocol") if message.get("protocol") in ("tcp", "udp")
                 else None,
                 evidence=message.get("evidence") if message.get("evidence") in GRADES
                 else None)
    return clean


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _time(message: dict, key: str, optional: bool) -> float | None:
    value = message.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not 0 <= value < 1e11:
        raise BadMessage(f"bad {key}")
    return float(value)


def _text(value) -> str:
    if not isinstance(value, str):
        return ""
    kept = "".join(c for c in value if not unicodedata.category(c).startswith("C"))
    return kept.strip()[:MAX_TEXT]


def _port(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        return None
    return value


def _ttl_ms(message: dict, now: float) -> int | None:
    until = message.get("until")
    return None if until is None else max(1, int((until - now) * 1000))


EVIDENCE_CAP = 64  # entries per source in Redis: its memory is bounded whatever the fleet
EVIDENCE_RATE = 200  # evidence a member publishes a second at most (a spoofed flood)
EVIDENCE_SEEN = 65536  # (source, port) pairs published lately, remembered to publish each once
# ARGV: entry ("member port/protocol"), window s, trigger, cap. Returns the
# entries when this one makes `trigger` distinct members (once a window), else false.
EVIDENCE_SCRIPT = """
local key, window = KEYS[1], tonumber(ARGV[2])
local trigger, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call('ZADD', key, now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', key, '(' .. (now + 60), '+inf')  -- from the future: not ours
local n = redis.call('ZCARD', key)
if n > cap then redis.call('ZREMRANGEBYRANK', key, 0, n - cap - 1) end
local ttl = math.floor(window * 1000)
redis.call('PEXPIRE', key, ttl)
local entries, valid = redis.call('ZRANGE', key, 0, -1), {}
local seen, distinct = {}, 0
for _, entry in ipairs(entries) do  -- only what members write counts (and is returned)
  local member, port = string.match(entry, '^([%w_.-]+) (%d+)/%a+$')
  if member and #entry <= 80 and tonumber(port) <= 65535 then
    table.insert(valid, entry)
    if not seen[member] then seen[member] = true; distinct = distinct + 1 end
  end
end
entries = valid
if distinct >= trigger and redis.call('SET', key .. ':fired', '1', 'NX', 'PX', ttl) then
  return entries
end
return false
"""


class Fleet:
    def __init__(self, url: str, member: str, prefix: str,
                 apply: Callable[[dict], None], lift: Callable[[dict], None],
                 local_bans: Callable[[], list[dict]], log, log_error,
                 max_seconds: float = 0, rejected: Callable[[str], None] = lambda reason: None,
                 scan_trigger: int = 0, scan_window: float = 600.0,
                 correlated: Callable[[str, list[str]], bool] = lambda address, entries: True):
        self.url, self.member, self.prefix = url, member, prefix
        self.scan_trigger, self.scan_window, self.correlated = scan_trigger, scan_window, correlated
        self._evidence_seen: OrderedDict = OrderedDict()  # (address, port, protocol) -> time
        self._evidence_tokens, self._evidence_at = float(EVIDENCE_RATE), 0.0
        self.evidence_sent = self.evidence_dropped = 0
        self._script = None  # the evidence script, registered with the publisher's client
        self.max_seconds, self.rejected = max_seconds, rejected
        self._rejection_logged = float("-inf")
        self.channel = f"{prefix}:bans"
        self.apply, self.lift, self.local_bans = apply, lift, local_bans
        self.log, self.log_error = log, log_error
        self.outgoing: queue.Queue = queue.Queue()
        self.backlog: dict[str, dict] = {}  # address -> message not yet published
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self._threads = [threading.Thread(target=self._subscriber, name="fleet-in", daemon=True),
                         threading.Thread(target=self._publisher, name="fleet-out", daemon=True)]

    def start(self) -> "Fleet":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.outgoing.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    # -- outgoing ---------------------------------------------------------------
    def announce_ban(self, ban: dict) -> None:
        self.outgoing.put({**ban, "type": "ban", "origin": self.member})

    def announce_unban(self, address: str) -> None:
        self.outgoing.put({"type": "unban", "address": address, "origin": self.member})

    def report_evidence(self, address: str, port: int, protocol: str, now: float) -> bool:
        """Owner thread: a first contact with an unused port, for fleet-wide
        correlation; each (source, port) once a window, at most EVIDENCE_RATE
        a second, nothing while Redis is away. False: not sent."""
        if not self.scan_trigger or not self.connected.is_set():
            return False
        pair = (address, port, protocol)
        last = self._evidence_seen.get(pair)
        if last is not None and now - last < self.scan_window:
            return False
        self._evidence_tokens = min(float(EVIDENCE_RATE), self._evidence_tokens
                                    + max(0.0, now - self._evidence_at) * EVIDENCE_RATE)
        self._evidence_at = now
        if self._evidence_tokens < 1:
            self.evidence_dropped += 1
            return False
        self._evidence_tokens -= 1
        self._evidence_seen[pair] = now
        self._evidence_seen.move_to_end(pair)
        if len(self._evidence_seen) > EVIDENCE_SEEN:
            self._evidence_seen.popitem(last=False)
        self.outgoing.put({"type": "evidence", "address": address,
                           "entry": f"{self.member} {port}/{protocol}"})
        return True

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=3,
                                    health_check_interval=15)

    def _publisher(self) -> None:
        client = self._client()
        while not self.stopping.is_set():
            message = self.outgoing.get()
            if message is None:
                return
            if message["type"] == "evidence":
                if self.connected.is_set():
                    self._evidence(client, message)
                continue
            if message["type"] != "flush":
                self.backlog[message["address"]] = message
            if self.connected.is_set():
                self._flush(client)

    def _flush(self, client: redis.Redis) -> None:
        """Publish the backlog; what fails stays for the next connection."""
        for address, message in list(self.backlog.items()):
            now = time.time()
            key = f"{self.prefix}:ban:{address}"
            try:
                with client.pipeline() as pipe:
                    if message["type"] == "ban":
                        ttl = _ttl_ms(message, now)
                        if ttl is not None and message["until"] <= now:
                            self.backlog.pop(address, None)
                            continue  # expired while we waited
                        pipe.set(key, json.dumps(message), px=ttl)
                    else:
                        pipe.delete(key)
                    pipe.publish(self.channel, json.dumps({**message, "sent": now}))
                    pipe.execute()
                if self.backlog.get(address) is message:
                    del self.backlog[address]
            except (redis.RedisError, OSError):
                self.connected.clear()  # the subscriber notices and reconnects
                return

    def _evidence(self, client: redis.Redis, message: dict) -> None:
        """One piece of evidence in Redis; a correlation it completes is ours to ban."""
        address = message["address"]
        if self._script is None:  # EVALSHA: the script's text crosses once, not each time
            self._script = client.register_script(EVIDENCE_SCRIPT)
        try:
            entries = self._script(keys=[f"{self.prefix}:ev:{address}"],
                                   args=[message["entry"], self.scan_window,
                                         self.scan_trigger, EVIDENCE_CAP], client=client)
            self.evidence_sent += 1
        except redis.ResponseError as err:  # e.g. another program's key there, not a set
            self._reject(BadMessage("bad evidence key", f"{address}: {err}"[:120]))
            return
        except (redis.RedisError, OSError):
            self.connected.clear()
            return
        if entries and not self.correlated(address, [e.decode() if isinstance(e, bytes)
                                                     else str(e) for e in entries]):
            try:  # not banned here (rate limit, log only, a peer): the next member may
                client.delete(f"{self.prefix}:ev:{address}:fired")
            except (redis.RedisError, OSError):
                self.connected.clear()

    # -- incoming ---------------------------------------------------------------
    def _subscriber(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                client = self._client()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._resync(client)
                if attempt:
                    self.log("adminalert: fleet: reconnected to Redis; bans resynchronised")
                else:
                    self.log(f"adminalert: fleet: member {self.member} connected to Redis")
                attempt = 0
                self.connected.set()
                self.outgoing.put({"type": "flush", "address": ""})  # wake the publisher
                while not self.stopping.is_set() and self.connected.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._receive(message["data"])
                pubsub.close()
            except (redis.RedisError, OSError) as err:
                if self.connected.is_set() or attempt == 0:
                    self.log_error(f"adminalert: ERROR: fleet: Redis unreachable ({err}); "
                                   "working locally and retrying")
                self.connected.clear()
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                attempt += 1
                self.stopping.wait(delay)

    def _resync(self, client: redis.Redis) -> None:
        """Republish our own bans in force; apply everyone else's."""
        now = time.time()
        for ban in self.local_bans():
            if ban.get("until") is None or ban["until"] > now:
                self.backlog.setdefault(ban["address"], {**ban, "type": "ban",
                                                         "origin": self.member})
        for key in client.scan_iter(match=f"{self.prefix}:ban:*", count=1000):
            try:
                raw = client.get(key)
            except redis.ResponseError as err:  # e.g. a key of another type: skip it
                self._reject(BadMessage("bad key", f"{_printable(key)}: {err}"))
                continue
            if raw is not None:
                self._receive(raw, resync=True)

    def _receive(self, raw, resync: bool = False) -> None:
        """Apply one message; whatever it holds, the subscriber goes on."""
        try:
            message = read_message(raw, time.time(), self.max_seconds)
            if message["origin"] == self.member:
                return
            if message["type"] == "unban":
                self.lift(message)
            else:
                self.apply({**message, "resync": resync})
        except BadMessage as err:
            self._reject(err)
        except Exception as err:  # a bug must not silence the fleet either
            self._reject(BadMessage("not applied", repr(err)[:120]))

    def _reject(self, err: BadMessage) -> None:
        self.rejected(err.reason)
        now = time.monotonic()
        if now - self._rejection_logged >= REJECTION_LOG_EVERY:
            self._rejection_logged = now
            self.log_error(f"adminalert: ERROR: fleet: message ignored ({_printable(str(err))}); "
                           "further ones are counted in portsentinel_fleet_rejected_total")


def _printable(value) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)[:120]
