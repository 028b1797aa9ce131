"""The state that survives restarts and crashes: bans, offence counts, an
audit trail of events and the slow-scan test's state, in SQLite (WAL, so a
crash loses at most the last transaction and readers never block the writer).

Each ban row keeps what was done for it (the hosts.deny line, the KILL_ROUTE
command), so `unblock` and expiry can undo exactly that.
"""

from __future__ import annotations

import os
import sqlite3
from operator import attrgetter
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS bans (
    address TEXT PRIMARY KEY,
    since REAL NOT NULL,
    until REAL,                 -- NULL: forever
    port INTEGER, protocol TEXT, mode TEXT,
    reason TEXT NOT NULL,       -- e.g. 'TCP SYN/Normal scan', 'manual'
    origin TEXT NOT NULL,       -- 'local', 'cli', 'kernel', a fleet member's name
    hosts_deny_line TEXT,
    kill_route_command TEXT,
    hosts_deny_file TEXT,       -- where the line went, and the undo of the command, as
    kill_route_undo TEXT,       -- they were at ban time (a reload may change both)
    evidence TEXT               -- its grade: handshake, repeated, single, fleet, manual
);
CREATE INDEX IF NOT EXISTS bans_until ON bans (until);
CREATE TABLE IF NOT EXISTS offenders (
    address TEXT PRIMARY KEY,
    bans INTEGER NOT NULL,
    last REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,         -- block, unblock, expire, alert
    address TEXT NOT NULL,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS blobs (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
MAX_EVENTS = 100_000
_UNKNOWN = object()


class StateCorrupt(Exception):
    """The state file is not a database we can read."""


def open_store(path: Path, log_error) -> "Store":
    """The store; a corrupt file is set aside (kept for a post-mortem) and a
    new one started, with one clear error. The bans in force are still in
    the kernel: reconciliation records them again."""
    try:
        return Store(path)
    except StateCorrupt as err:
        kept = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(kept)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        log_error(f"adminalert: ERROR: the state file is corrupt ({err.__cause__}); kept as "
                  f"{kept}, starting with a new one (bans in the firewall are kept and "
                  "recorded again)")
        return Store(path)


@dataclass
class BanRecord:
    address: str
    since: float
    until: float | None
    port: int | None = None
    protocol: str | None = None
    mode: str | None = None
    reason: str = ""
    origin: str = "local"
    hosts_deny_line: str | None = None
    kill_route_command: str | None = None
    hosts_deny_file: str | None = None
    kill_route_undo: str | None = None
    evidence: str | None = None  # what made it (engine.GRADES); None: not known (found, older)

    def remaining(self, now: float) -> float | None:
        return None if self.until is None else max(0.0, self.until - now)


_COLUMNS = ("address", "since", "until", "port", "protocol", "mode", "reason", "origin",
            "hosts_deny_line", "kill_route_command", "hosts_deny_file", "kill_route_undo",
            "evidence")
_ADDED_COLUMNS = ("hosts_deny_file", "kill_route_undo", "evidence")  # files made before them
_ROW = attrgetter(*_COLUMNS)  # a record's values in column order
_INTO_BANS = f"INTO bans ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.writes = 0  # committed or attempted writes so far
        self._count, self._soonest = None, _UNKNOWN  # known since the last write
        old_umask = os.umask(0o077)  # the database and its -wal/-shm files: root only
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                have = {row[1] for row in self._db.execute("PRAGMA table_info(bans)")}
                for column in _ADDED_COLUMNS:
                    if column not in have:
                        self._db.execute(f"ALTER TABLE bans ADD COLUMN {column} TEXT")
                self._db.execute("SELECT COUNT(*) FROM bans").fetchone()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise
            try:
                self._db.close()
            except (AttributeError, sqlite3.Error):
                pass
            raise StateCorrupt(f"{path} is not a readable state database") from err
        finally:
            os.umask(old_umask)
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if name.exists():
                name.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite ends it itself on some errors (disk full)
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self.writes += 1
                self._count, self._soonest = None, _UNKNOWN

    def _write(self, statements) -> None:
        with self._transaction() as db:
            for sql, args in statements:
                db.execute(sql, args)

    # -- bans ---------------------------------------------------------------
    def add_ban(self, ban: BanRecord, count_offence: bool = True) -> None:
        self.add_bans_logged([(ban, count_offence)])

    def add_bans_logged(self, bans: list[tuple[BanRecord, bool]]) -> None:
        """Bans (each with whether it counts as an offence) with their events,
        in one transaction: what `add_ban` does for each, in this order."""
        with self._transaction() as db:
            db.executemany(f"INSERT OR REPLACE {_INTO_BANS}",
                           [_ROW(b) for b, _ in bans])
            db.executemany("INSERT INTO events (time, kind, address, detail) "
                           "VALUES (?, 'block', ?, ?)", [(b.since, b.address, b.reason)
                                                         for b, _ in bans])
            db.executemany("INSERT INTO offenders (address, bans, last) VALUES (?, 1, ?) "
                           "ON CONFLICT(address) DO UPDATE SET bans = bans + 1, last = ?",
                           [(b.address, b.since, b.since) for b, counted in bans if counted])

    def add_bans(self, bans: list[BanRecord], replace: bool = True) -> None:
        """Many bans in one transaction, no events, no offences; `replace=False`
        (adoption of bans found in the firewall) never overwrites a record
        made meanwhile."""
        with self._transaction() as db:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            db.executemany(f"{verb} {_INTO_BANS}",
                           [_ROW(b) for b in bans])

    def get_ban(self, address: str) -> BanRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM bans WHERE address = ?",
                                   (address,)).fetchone()
        return BanRecord(*row) if row else None

    def remove_ban(self, address: str, kind: str = "unblock", detail: str = "") -> BanRecord | None:
        ban = self.get_ban(address)
        if ban is None:
            return None
        self._write([("DELETE FROM bans WHERE address = ?", (address,)),
                     ("INSERT INTO events (time, kind, address, detail) VALUES (?, ?, ?, ?)",
                      (time.time(), kind, address, detail))])
        return ban

    def count(self) -> int:
        with self._lock:
            if self._count is None:
                self._count = self._db.execute("SELECT COUNT(*) FROM bans").fetchone()[0]
            return self._count

    def evidence_counts(self) -> dict[str, int]:
        """Bans recorded, by grade ("ungraded": found in the firewall, older records)."""
        with self._lock:
            rows = self._db.execute("SELECT evidence, COUNT(*) FROM bans GROUP BY evidence")
            return {grade or "ungraded": n for grade, n in rows.fetchall()}

    def bans(self) -> list[BanRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM bans ORDER BY since").fetchall()
        return [BanRecord(*row) for row in rows]

    def ban_times(self) -> list[tuple[str, float, float | None]]:
        """(address, since, until) of every ban: what a restart needs, fast."""
        with self._lock:
            return self._db.execute("SELECT address, since, until FROM bans").fetchall()

    def next_expiry(self) -> float | None:
        """When the soonest ban ends (epoch seconds), None if none ends."""
        with self._lock:
            if self._soonest is _UNKNOWN:
                self._soonest = self._db.execute("SELECT MIN(until) FROM bans").fetchone()[0]
            return self._soonest

    def expired(self, now: float) -> list[BanRecord]:
        soonest = self.next_expiry()  # known without a query since the last write
        if soonest is None or soonest > now:
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM bans "
                                    "WHERE until IS NOT NULL AND until <= ?", (now,)).fetchall()
        return [BanRecord(*row) for row in rows]

    def pardon(self, address: str) -> None:
        self._write([("DELETE FROM offenders WHERE address = ?", (address,))])

    def soonest_expiring(self, limit: int) -> list[BanRecord]:
        """Automatic bans that end first (manual and permanent ones never)."""
        if limit <= 0:  # SQLite reads LIMIT -1 as no limit at all
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM bans WHERE until IS NOT "
                                    "NULL AND origin != 'cli' ORDER BY until LIMIT ?",
                                    (limit,)).fetchall()
        return [BanRecord(*row) for row in rows]

    # -- offenders, events, blobs -----------------------------------------
    def offences(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT address, bans FROM offenders").fetchall())

    def events(self, limit: int = 50) -> list[tuple]:
        with self._lock:
            return self._db.execute("SELECT time, kind, address, detail FROM events "
                                    "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def prune_events(self) -> None:
        self._write([("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                      (MAX_EVENTS,))])

    def save_blob(self, name: str, value: bytes) -> None:
        self._write([("INSERT OR REPLACE INTO blobs (name, value) VALUES (?, ?)", (name, value))])

    def blob(self, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM blobs WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None
