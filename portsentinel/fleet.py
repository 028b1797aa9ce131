"""Fleet mode: one scan seen anywhere blocks it everywhere, through Redis.

Every ban a member makes itself is written as a key `<prefix>:ban:<address>`
(JSON: address, reason, origin member, since, until) whose Redis TTL is the
ban's remaining time, and announced on the channel `<prefix>:bans`. Members
subscribe and apply each other's bans within milliseconds (through their own
never-block set: nobody bans its own gateway because a peer said so); a member
that starts or reconnects reads every key, so it catches up. An unblock is
announced too and lifts the ban everywhere.

Redis going away is not fatal: the member works locally, says so once, keeps
what it could not publish, and retries with backoff. On every (re)connection
it republishes all its own bans in force, so even a Redis that came back
empty is rebuilt from the members.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Callable

import redis

BACKOFF = (0.5, 1, 2, 5)


def _ttl_ms(message: dict, now: float) -> int | None:
    until = message.get("until")
    return None if until is None else max(1, int((until - now) * 1000))


class Fleet:
    def __init__(self, url: str, member: str, prefix: str,
                 apply: Callable[[dict], None], lift: Callable[[dict], None],
                 local_bans: Callable[[], list[dict]], log, log_error):
        self.url, self.member, self.prefix = url, member, prefix
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

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=3,
                                    health_check_interval=15)

    def _publisher(self) -> None:
        client = self._client()
        while not self.stopping.is_set():
            message = self.outgoing.get()
            if message is None:
                return
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
            raw = client.get(key)
            if raw is not None:
                self._receive(raw, resync=True)

    def _receive(self, raw, resync: bool = False) -> None:
        try:
            message = json.loads(raw)
            if message.get("origin") == self.member:
                return
            if message.get("type") == "unban":
                self.lift(message)
            elif message.get("type", "ban") == "ban":
                self.apply({**message, "resync": resync})
        except (ValueError, KeyError, TypeError) as err:
            self.log_error(f"adminalert: ERROR: fleet: bad message ignored: {err}")
