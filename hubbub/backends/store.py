"""Message stores, where chat history lives, and the ``StoreWorker`` that feeds them in batches.

``--store`` picks one by URL:

- ``memory``: the last messages of each room, in this process; gone on restart.
- ``sqlite:///PATH`` (the default, ``sqlite:///hubbub.db``): a file, through the standard
  library's sqlite3, in WAL mode with ``synchronous=FULL`` so that a commit is on disk.
- ``postgresql://USER@HOST:PORT/DB``: PostgreSQL through psycopg 3 (any libpq URL works,
  ``?options=-csearch_path%3Dmyschema`` included).

Every store keeps history within a ``Retention``: at most ``count`` messages per room and
none older than ``age`` seconds (``parse_retention``; ``open_store`` applies
``DEFAULT_RETENTION``, 1000 messages and 30 days). History that nothing bounds grows until
the disk or the memory is full, so "off" (no limit) must be asked for.

The stores are plain blocking DB-API code; ``StoreWorker`` runs them in one worker thread
(``anyio.to_thread``) so the event loop never waits on a disk or a database; pruning runs
inside the stores' writes, so it is in that thread too. Writes are idempotent (the message
id is the primary key), which makes retrying a batch safe. The schema is created on first
start and versioned in ``hubbub_schema``: ``MIGRATIONS[n]`` takes a database from version n
to n+1, the same statements for SQLite and PostgreSQL.

Two kinds of failure are told apart. ``StoreError`` means the store itself is unwell
(unreachable, disk full): the worker retries, then reports the store down. Any other
exception (``ValueError`` for text no database can hold, or a bug) belongs to the item that
caused it: the worker isolates that item, tells its sender, and goes on with the rest.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio

log = logging.getLogger("hubbub.store")

Message = Mapping[str, Any]
T = TypeVar("T")

SCHEMA_VERSION = 3
MIGRATIONS: list[list[str]] = [
    [  # 0 -> 1: one row per message; the id is time-ordered, so (room, id) pages history
        "CREATE TABLE hubbub_messages ("
        "id TEXT PRIMARY KEY, room TEXT NOT NULL, ts BIGINT NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX hubbub_messages_room_id ON hubbub_messages (room, id)",
    ],
    [  # 1 -> 2: age retention deletes by ts, which would otherwise scan the whole table
        "CREATE INDEX hubbub_messages_ts ON hubbub_messages (ts)",
    ],
    [  # 2 -> 3: a publish's idempotency key, [user, key] as JSON: one row per (room, user, key)
        "ALTER TABLE hubbub_messages ADD COLUMN pkey TEXT",
        "CREATE UNIQUE INDEX hubbub_messages_room_publish_key ON hubbub_messages (room, pkey)",
    ],
]

DEFAULT_RETENTION = "1000,30d"
MEMORY_PER_ROOM = 1000  # what the memory store keeps per room when the retention sets no count


class StoreError(Exception):
    """The store could not do what was asked (unreachable, disk full, ...)."""


# -- retention ------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """How much history a store keeps: at most ``count`` messages per room (the newest) and none
    older than ``age`` seconds (by the message's ``ts``). ``None`` sets no limit of that kind."""

    count: int | None
    age: float | None

    def __post_init__(self) -> None:
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)):
            raise ValueError(f"the count must be a whole number of messages, not {self.count!r}")
        if self.count is not None and self.count < 1:
            raise ValueError("the count must be at least 1 message (or no count: no limit)")
        if self.age is not None and not (math.isfinite(self.age) and self.age > 0):
            raise ValueError("the age must be more than 0 seconds (or no age: no limit)")

    def cutoff_ms(self, now: float) -> int | None:
        """The oldest ``ts`` (Unix milliseconds) still kept at wall-clock time ``now``; None: no age limit."""
        return None if self.age is None else int((now - self.age) * 1000)


UNLIMITED = Retention(None, None)  # "off"; the memory store still keeps at most MEMORY_PER_ROOM per room

_COUNT = re.compile(r"[0-9]+")
_AGE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_retention(text: str) -> Retention:
    """A ``--history-retention`` setting: ``COUNT`` (messages kept per room), ``AGE`` (a number with
    a unit, s, m, h or d: ``30d``, ``12h``, ``3600s``), ``COUNT,AGE`` (both; ``1000,30d``), or ``off``
    (no limit at all: history then grows without bound). ValueError says what is wrong."""
    spec = text.strip().lower()
    if spec == "off":
        return UNLIMITED
    parts = [part.strip() for part in spec.split(",")]
    count_text: str | None = None
    age_text: str | None = None
    if len(parts) == 2:
        count_text, age_text = parts
    elif len(parts) == 1 and _COUNT.fullmatch(spec):
        count_text = spec
    elif len(parts) == 1:
        age_text = spec
    age = _AGE.fullmatch(age_text) if age_text is not None else None
    if len(parts) > 2 or (count_text is not None and not _COUNT.fullmatch(count_text)) or (
        age_text is not None and age is None
    ):
        raise ValueError(
            f"history retention {text!r}: expected COUNT (messages per room: 1000), AGE (a number with "
            "s, m, h or d: 30d), COUNT,AGE (1000,30d) or off"
        )
    try:
        return Retention(
            int(count_text) if count_text is not None else None,
            float(age[1]) * _UNITS[age[2]] if age is not None else None,
        )
    except ValueError as exc:
        raise ValueError(f"history retention {text!r}: {exc}") from None


_DEFAULT = parse_retention(DEFAULT_RETENTION)


# -- the stores -----------------------------------------------------------------


class Store(Protocol):
    """What ``StoreWorker`` needs; every method may block and raise ``StoreError``."""

    blocking: bool  # True: run it in a worker thread
    shared: bool  # True: every instance writes to the same store (so each keeps only its own messages)

    def write(self, messages: Sequence[tuple[str, Message]]) -> None: ...
    def history(
        self, room: str, limit: int, before: str | None = None, after: str | None = None
    ) -> list[Message]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    def recent_keys(self, limit: int) -> list[tuple[str, str, str, str, int]]: ...


def _ts(message: Message) -> Any:
    return message.get("ts", 0)


class MemoryStore:
    """The newest messages of every room, oldest first, within ``retention`` (at most
    ``MEMORY_PER_ROOM`` per room when it sets no count, so memory stays bounded); gone on restart.

    Messages past the retention's age leave a room when it is written or read, and every room
    in a sweep at most every ``min(60 s, age / 10)`` (on a write or a read); a room left empty
    is forgotten, and a sweep that frees most messages compacts what is left, so a spam of
    short-lived rooms gives its memory back. ``clock`` is the wall clock the age is measured
    by (``time.time``; a test moves its own).
    """

    blocking = False
    shared = False

    def __init__(self, *, retention: Retention = UNLIMITED, clock: Callable[[], float] = time.time) -> None:
        self.retention = retention
        self.per_room = retention.count if retention.count is not None else MEMORY_PER_ROOM
        self._rooms: dict[str, deque[Message]] = {}  # never holds an empty room
        self._ids: set[str] = set()
        self._clock = clock
        self._sweep_every = min(60.0, retention.age / 10) if retention.age is not None else math.inf
        self._swept = -math.inf

    def add(self, room: str, message: Message) -> None:
        self.write([(room, message)])

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        """Keep a batch (a loop pass's messages): the clock is read and the age checked once for all."""
        cutoff = self._cutoff()
        rooms, ids, per_room = self._rooms, self._ids, self.per_room
        for room, message in messages:  # once per message: _ts inline
            message_id = message["id"]
            if message_id in ids or (cutoff is not None and message.get("ts", 0) < cutoff):
                continue  # a repeat, or already older than we keep
            kept = rooms.get(room)
            if kept is None:
                kept = rooms[room] = deque(maxlen=per_room)
            else:
                oldest = kept[0]
                if cutoff is not None and oldest.get("ts", 0) < cutoff:
                    self._expire(kept, cutoff)  # at least the oldest goes: no longer full
                elif len(kept) == per_room:
                    ids.discard(oldest["id"])  # the deque drops it as the new one comes in
            kept.append(message if "key" not in message else _unkeyed(message))
            ids.add(message_id)

    def history(
        self, room: str, limit: int, before: str | None = None, after: str | None = None
    ) -> list[Message]:
        """Up to ``limit`` messages, oldest first: the newest older than id ``before`` (or the newest of
        all); with ``after``, the oldest newer than id ``after`` (and older than ``before``, if given)."""
        cutoff = self._cutoff()
        kept = self._rooms.get(room)
        if kept is None:
            return []
        if cutoff is not None:
            self._expire(kept, cutoff)
            if not kept:
                del self._rooms[room]
                return []
        picked: list[Message] = []
        for message in (kept if after is not None else reversed(kept)):
            message_id = message["id"]
            if (
                (before is not None and message_id >= before)
                or (after is not None and message_id <= after)
                or (cutoff is not None and _ts(message) < cutoff)
            ):
                continue  # (a message from another instance may be older than one stored before it)
            picked.append(message)
            if len(picked) == limit:
                break
        if after is None:
            picked.reverse()
            return picked
        return sorted(picked, key=lambda m: m["id"])  # what came from other instances may be out of order

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass

    def recent_keys(self, limit: int) -> list[tuple[str, str, str, str, int]]:
        """Nothing outlives the process here: ``PublishKeys`` in the core already holds them."""
        return []

    def _cutoff(self) -> int | None:
        """The oldest ``ts`` kept now (None: no age limit), sweeping every room first when one is due."""
        if self.retention.age is None:
            return None
        now = self._clock()
        cutoff = int((now - self.retention.age) * 1000)
        if not self._swept <= now < self._swept + self._sweep_every:  # due (or the clock went back)
            self._swept = now
            ids_before = len(self._ids)
            for room in [room for room, kept in self._rooms.items() if _ts(kept[0]) < cutoff]:
                kept = self._rooms[room]
                self._expire(kept, cutoff)
                if not kept:
                    del self._rooms[room]
            if len(self._ids) < ids_before / 2:  # a dict or set never shrinks by itself: copies fit what is left
                self._rooms = dict(self._rooms)
                self._ids = set(self._ids)
        return cutoff

    def _expire(self, kept: deque[Message], cutoff: int) -> None:
        while kept and _ts(kept[0]) < cutoff:
            self._ids.discard(kept.popleft()["id"])


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _storable(*texts: str) -> None:
    """Refuse (ValueError) text that no database can hold: a lone surrogate (no UTF-8 for it) or NUL
    (PostgreSQL text cannot hold it), before any transaction begins. Checked in the store, not only
    at the edge, so that such an item is the item's failure and never passes for an outage."""
    for text in texts:
        if "\x00" in text:
            raise ValueError(f"the store cannot keep text holding NUL: {text[:80]!r}")
        text.encode()  # UnicodeEncodeError, a ValueError, for a lone surrogate


def _row(room: str, message: Message) -> tuple[str, str, int, str, str | None]:
    """A message as (id, room, ts, body, pkey). The body is strict JSON (NaN or Infinity is refused, as
    no other JSON reader takes them) and UTF-8 rather than \\u-escaped (smaller, and a lone surrogate,
    which an escape would hide, is refused). A ``"key"`` (the publisher's idempotency key) is not in
    the body: it is ``pkey``, ``[user, key]`` as JSON, unique per room."""
    key = message.get("key")
    pkey = None
    if key is not None:
        pkey = _dumps([message.get("user"), key])
        message = _unkeyed(message)
    body = _dumps(message)
    message_id = message["id"]
    _storable(message_id, room, body, *((pkey,) if pkey is not None else ()))
    return (message_id, room, int(_ts(message)), body, pkey)


def _unkeyed(message: Message) -> Message:
    return {name: value for name, value in message.items() if name != "key"}


def _keys_of(rows: Iterable[tuple[str, str, str, Any]]) -> list[tuple[str, str, str, str, int]]:
    """(room, pkey, id, ts) rows, newest first, as (room, user, key, id, ts), oldest first."""
    out = []
    for room, pkey, message_id, ts in rows:
        try:
            user, key = json.loads(pkey)
        except (ValueError, TypeError):
            continue
        if isinstance(user, str) and isinstance(key, str):
            out.append((room, user, key, message_id, int(ts)))
    out.reverse()
    return out


class _Pruning:
    """When a SQL store trims rooms to ``count`` rows and deletes rows past ``age``: cheaply, not
    a DELETE per write.

    A room is trimmed once it has grown by ``max(1, count // 10)`` rows since its last trim, so
    it holds at most ``count * 1.1`` rows (a store shared by N instances: each counts its own
    writes, so up to ``count`` plus N tenths). A room this store has not seen yet is trimmed at
    its first write, as it may hold anything. Only the ``tracked`` most recently written rooms
    are counted; the others are forgotten, and so trimmed at their next write: room spam cannot
    grow this map either. The age delete runs at most once a minute and takes at most
    ``expire_rows`` rows at a time (if there were more, it is due again at the next write), so
    no single write carries a huge delete.
    """

    def __init__(self, retention: Retention, tracked: int = 100_000, expire_rows: int = 10_000) -> None:
        self.retention = retention
        self.step = max(1, retention.count // 10) if retention.count is not None else 0
        self.tracked = tracked
        self.expire_rows = expire_rows
        self._grown: dict[str, int] = {}  # room -> rows written since its last trim, least recent first
        self._expired_at = -math.inf  # time.monotonic() of the last complete age delete

    def trims_due(self, rooms: Iterable[str]) -> list[tuple[str, str, int]]:
        """The parameters of the trims due in the write of a batch holding rows of these rooms (and
        the rooms' counts updated): (room, room, offset of the oldest row kept)."""
        count = self.retention.count
        if count is None:
            return []
        grown = self._grown
        due = []
        for room, rows in Counter(rooms).items():
            before = grown.pop(room, None)  # popped and put back: the dict stays in order of last write
            if before is None or before + rows >= self.step:
                due.append((room, room, count - 1))
                grown[room] = 0
            else:
                grown[room] = before + rows
        if len(grown) > self.tracked:
            self._grown = dict(list(grown.items())[len(grown) // 2 :])  # forget the least recent half at once
        return due

    def cutoff_due(self) -> int | None:
        """The ``ts`` to delete rows older than if the age delete is due now, else None."""
        if time.monotonic() - self._expired_at < 60.0:
            return None
        return self.retention.cutoff_ms(time.time())

    def expired(self, rows: int) -> None:
        """The age delete committed, deleting ``rows``; fewer than ``expire_rows``: none are left."""
        if rows < self.expire_rows:
            self._expired_at = time.monotonic()

    def forget(self) -> None:
        """A write failed, and with it the trims it carried: every room is trimmed at its next write."""
        self._grown.clear()


def _migrate(db: Any, param: str) -> None:
    """Bring the schema to ``SCHEMA_VERSION`` (``MIGRATIONS[version:]``, the same SQL for SQLite and
    PostgreSQL). ``db`` is a connection with ``execute(sql, params)``; ``param`` its placeholder.
    The caller holds the transaction, one that keeps any other migrator out (SQLite: BEGIN
    IMMEDIATE; PostgreSQL: an advisory lock), and commits it."""
    db.execute("CREATE TABLE IF NOT EXISTS hubbub_schema (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM hubbub_schema").fetchone()
    version = row[0] if row is not None else 0
    if row is None:
        db.execute("INSERT INTO hubbub_schema VALUES (0)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"the database has schema version {version}; this hubbub knows up to {SCHEMA_VERSION}")
    for statements in MIGRATIONS[version:]:
        for statement in statements:
            db.execute(statement)
    if version < SCHEMA_VERSION:
        db.execute(f"UPDATE hubbub_schema SET version = {param}", (SCHEMA_VERSION,))


class _SQLStore:
    """What the SQLite and PostgreSQL stores share: writing with retention and paging history, in
    the SQL both speak. A subclass names its placeholder (``param``) and its insert that ignores a
    repeated id (``insert``), and runs a function in a transaction (``_run``), raising
    ``StoreError`` for the database's failures and ValueError for data it refuses."""

    blocking = True
    param: str
    insert: str

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self._pruning = _Pruning(retention)
        p = self.param
        # keep the newest `count` of a room: delete what is older than its count-th newest
        self._trim = (
            f"DELETE FROM hubbub_messages WHERE room = {p} AND id < "
            f"(SELECT id FROM hubbub_messages WHERE room = {p} ORDER BY id DESC LIMIT 1 OFFSET {p})"
        )
        self._expire = (
            f"DELETE FROM hubbub_messages WHERE id IN (SELECT id FROM hubbub_messages WHERE ts < {p} LIMIT {p})"
        )

    def _run(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        """Insert the batch and, in the same transaction (one commit, one fsync), trim the rooms and
        delete the expired rows that are due."""
        rows = [_row(room, message) for room, message in messages]
        trim = self._pruning.trims_due(row[1] for row in rows)
        cutoff = self._pruning.cutoff_due()

        def insert(cur: Any) -> int:
            cur.executemany(self.insert, rows)
            if trim:
                cur.executemany(self._trim, trim)
            if cutoff is None:
                return 0
            cur.execute(self._expire, (cutoff, self._pruning.expire_rows))
            return cur.rowcount

        try:
            expired = self._run(insert)
        except BaseException:
            self._pruning.forget()
            raise
        if cutoff is not None:
            self._pruning.expired(expired)

    def history(
        self, room: str, limit: int, before: str | None = None, after: str | None = None
    ) -> list[Message]:
        """Up to ``limit`` messages, oldest first: the newest older than id ``before`` (or the newest of
        all); with ``after``, the oldest newer than id ``after`` (and older than ``before``, if given).
        None past the retention's age, even before the age delete has removed them."""
        _storable(room, *(bound for bound in (before, after) if bound is not None))
        p = self.param
        sql = f"SELECT body FROM hubbub_messages WHERE room = {p}"
        params: list[Any] = [room]
        if before is not None:
            sql += f" AND id < {p}"
            params.append(before)
        if after is not None:
            sql += f" AND id > {p}"
            params.append(after)
        cutoff = self.retention.cutoff_ms(time.time())
        if cutoff is not None:
            sql += f" AND ts >= {p}"
            params.append(cutoff)
        sql += f" ORDER BY id {'ASC' if after is not None else 'DESC'} LIMIT {p}"
        params.append(limit)
        rows = self._run(lambda cur: cur.execute(sql, params).fetchall())
        if after is None:
            rows.reverse()
        return [json.loads(body) for (body,) in rows]

    def ping(self) -> None:
        self._run(lambda cur: cur.execute("SELECT 1").fetchone())

    def recent_keys(self, limit: int) -> list[tuple[str, str, str, str, int]]:
        """The newest ``limit`` stored publish keys as (room, user, key, id, ts), oldest first: what a
        restarted server remembers, so that a publish re-sent after it is not delivered twice."""
        p = self.param
        sql = f"SELECT room, pkey, id, ts FROM hubbub_messages WHERE pkey IS NOT NULL ORDER BY id DESC LIMIT {p}"
        return _keys_of(self._run(lambda cur: cur.execute(sql, (limit,)).fetchall()))


class SQLiteStore(_SQLStore):
    """A SQLite file; one connection, used from one worker thread at a time."""

    shared = False
    param = "?"
    insert = "INSERT OR IGNORE INTO hubbub_messages (id, room, ts, body, pkey) VALUES (?, ?, ?, ?, ?)"

    def __init__(self, path: str, *, retention: Retention = UNLIMITED) -> None:
        super().__init__(retention)
        self.path = path
        self._db: Any = None  # a sqlite3.Connection, opened on first use

    def _connect(self) -> Any:
        import sqlite3  # here, not at the top: a server on another store never loads it (about 1.4 MB)

        if self._db is None:
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite {self.path}: {exc}") from exc
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("BEGIN IMMEDIATE")  # two processes opening one file must not both migrate
                try:
                    _migrate(db, self.param)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except BaseException as exc:
                db.close()
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"sqlite {self.path}: {exc}") from exc
                raise
            self._db = db
        return self._db

    def _run(self, fn: Callable[[Any], T]) -> T:
        import sqlite3

        db = self._connect()
        try:
            db.execute("BEGIN")
            try:
                result = fn(db.cursor())
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.DataError as exc:  # this data (too big, ...), not the file
            raise ValueError(f"sqlite {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        return result

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class PostgresStore(_SQLStore):
    """PostgreSQL through psycopg 3's blocking API in the worker thread (so trio works too).

    One connection, opened lazily and opened again after any failure: a database that
    goes away and comes back costs the batches in between, never the server.
    """

    shared = True
    param = "%s"
    # any conflict: a repeated id, or a repeated (room, pkey) that raced past the core's PublishKeys
    insert = "INSERT INTO hubbub_messages (id, room, ts, body, pkey) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"

    def __init__(self, url: str, connect_timeout: float = 3.0, *, retention: Retention = UNLIMITED) -> None:
        super().__init__(retention)
        self.url = url
        self.connect_timeout = connect_timeout
        self._db: Any = None

    def _connect(self) -> Any:
        import psycopg  # only for --store postgresql://

        if self._db is None or self._db.closed:
            try:
                db = psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)), autocommit=False)
            except psycopg.Error as exc:
                raise StoreError(f"postgresql: {exc}".strip()) from exc
            try:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(7402091)")  # two instances starting at once
                    _migrate(db, self.param)
            except BaseException as exc:
                db.close()
                if isinstance(exc, psycopg.Error):
                    raise StoreError(f"postgresql: {exc}".strip()) from exc
                raise
            self._db = db
        return self._db

    def _run(self, fn: Callable[[Any], T]) -> T:
        import psycopg

        db = self._connect()
        try:
            with db.transaction(), db.cursor() as cur:
                return fn(cur)
        except psycopg.DataError as exc:  # this data (out of range, ...), not the database
            raise ValueError(f"postgresql: {exc}".strip()) from exc
        except psycopg.Error as exc:
            if db.closed or db.broken:
                self._db = None
            raise StoreError(f"postgresql: {exc}".strip()) from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def open_store(url: str, retention: Retention = _DEFAULT) -> Store:
    """The store a ``--store`` URL names, keeping history within ``retention``."""
    if url == "memory":
        return MemoryStore(retention=retention)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///hubbub.db is relative, sqlite:////var/x.db absolute
        if not path:
            raise ValueError("--store sqlite:///PATH needs a path")
        return SQLiteStore(path, retention=retention)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, retention=retention)
    raise ValueError(f"unknown --store {url!r}: expected memory, sqlite:///PATH or postgresql://...")


# -- the worker -----------------------------------------------------------------

UNREACHABLE_WRITE = "the message store is unreachable: this message was not kept"
REFUSED_WRITE = "the message store could not keep this message: it was delivered but not kept"
UNREACHABLE_READ = "the message store is unreachable: no history now"
FAILED_READ = "the message store could not answer this history request"

Item = tuple[str, Message, Any]  # (room, message, ack) of a queued write


def _message_id(item: Item) -> Any:
    message = item[1]
    return message.get("id") if isinstance(message, Mapping) else None


class StoreWorker:
    """Writes ``Stored`` messages in batches and answers history, off the event loop.

    One loop does everything in order: take every write queued so far as one batch,
    commit it, report the acks; then answer the history reads queued before the batch
    was taken (so a read sees every message stored before it was asked for). A batch
    that fails with ``StoreError`` is retried with backoff for up to ``retry_for`` seconds,
    then given up (its senders hear ``unavailable``). ``on_status`` reports the store up or
    down. A store that never blocks (``MemoryStore``) is written and read inline, in the
    same order, while nothing is queued before it.

    One bad item never stops the loop (nor, inline, raises into the shell). A batch that fails
    with any other exception holds a poison item, not an outage: it is written again in halves,
    and halves of those, until every good message is committed and acked and only the
    failing ones are reported lost (one log line per batch). A history read failing so is
    answered ``on_history_failed``. A callback (or ``observe``) that raises is logged and
    skipped. Each of these counts one in ``failures``.
    """

    def __init__(
        self,
        store: Store,
        *,
        on_stored: Callable[[list[Any]], None],
        on_lost: Callable[[list[Any], str], None],
        on_history: Callable[[int, str, list[Message]], None],
        on_history_failed: Callable[[int, str], None],
        on_status: Callable[[bool], None],
        max_batch: int = 1000,
        retry_for: float = 5.0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.on_lost = on_lost
        self.on_history = on_history
        self.on_history_failed = on_history_failed
        self.on_status = on_status
        self.max_batch = max_batch
        self.retry_for = retry_for
        self.observe = observe or (lambda op, seconds: None)
        self.up = True
        self.failures = 0  # items the store failed on for a reason of their own, and callbacks that raised
        self._writes: list[Item] = []
        self._reads: list[tuple[Any, str, int, str | None, str | None]] = []
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._limiter = anyio.CapacityLimiter(1)

    # -- what the shell calls ---------------------------------------------------

    def write_many(self, items: list[Item]) -> None:
        """A loop pass's messages, (room, message, ack) each: one batch, one commit, one call of
        ``on_stored`` with their acks (inline for a store that never blocks)."""
        if not self.store.blocking and not self._writes and self.up:
            started = time.perf_counter()
            try:
                self.store.write([(room, message) for room, message, _ in items])
            except StoreError:
                pass  # queued below: the loop retries it like any failed batch
            except Exception:  # one of them is poison: take them one at a time, the loop's way
                for room, message, ack in items:
                    self.write(room, message, ack)
                return
            else:
                self._notify(self.observe, "write", time.perf_counter() - started)
                acks = [ack for _, _, ack in items if ack is not None]
                if acks:
                    self._notify(self.on_stored, acks)
                return
        self._writes.extend(items)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def write(self, room: str, message: Message, ack: Any) -> None:
        if not self.store.blocking and not self._writes and self.up:
            # A store that never blocks (memory) commits here and now: no batch, no task switch.
            started = time.perf_counter()
            try:
                self.store.write([(room, message)])
            except StoreError:
                pass  # queued below: the loop retries it like any failed batch
            except Exception as exc:
                self._refused([((room, message, ack), exc)], 1)
                return
            else:
                self._notify(self.observe, "write", time.perf_counter() - started)
                if ack is not None:
                    self._notify(self.on_stored, [ack])
                return
        self._writes.append((room, message, ack))
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def read(self, request: Any, room: str, limit: int, before: str | None, after: str | None = None) -> None:
        """Read a page of ``room``'s history (see ``Store.history``) and answer ``on_history(request, room,
        messages)`` or ``on_history_failed(request, detail)``; ``request`` is the caller's, handed back."""
        if not self.store.blocking and not self._writes and not self._reads and self.up:
            started = time.perf_counter()
            try:
                messages = self._history(room, limit, before, after)
            except StoreError:
                pass  # queued below, answered by the loop
            except Exception as exc:
                self._read_failed(request, room, exc)
                return
            else:
                self._notify(self.observe, "read", time.perf_counter() - started)
                self._notify(self.on_history, request, room, messages)
                return
        self._reads.append((request, room, limit, before, after))
        self._wake.set()

    def _history(self, room: str, limit: int, before: str | None, after: str | None) -> list[Message]:
        """The store's page (``after`` passed only when given: a store of before's time takes three)."""
        if after is None:
            return self.store.history(room, limit, before)
        return self.store.history(room, limit, before, after)

    async def drain(self) -> None:
        """Wait until every write queued so far has been committed or given up."""
        if self._writes:
            await self._idle.wait()

    async def check(self) -> bool:
        """Ping the store (the health probe); reports a change of state."""
        try:
            await self._call(self.store.ping)
        except StoreError as exc:
            self._set_up(False, str(exc))
            return False
        except Exception as exc:  # a failure the store does not name: down too, and logged
            self.failures += 1
            log.error("store: the ping failed unexpectedly", exc_info=exc)
            self._set_up(False, repr(exc))
            return False
        self._set_up(True)
        return True

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._writes or self._reads:
                reads, self._reads = self._reads, []
                while self._writes:
                    batch, self._writes = self._writes[: self.max_batch], self._writes[self.max_batch :]
                    await self._commit(batch)
                for read in reads:
                    await self._answer(*read)
            self._idle.set()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.store.blocking:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _commit(self, batch: list[Item]) -> None:
        try:
            await self._store(batch)
        except Exception as exc:  # not an outage (that is StoreError): something in the batch the store cannot take
            refused: list[tuple[Item, BaseException]] = []
            await self._isolate(batch, exc, refused)
            if refused:
                self._refused(refused, len(batch))
            else:  # it did not happen again: no item to blame
                log.warning("store: a batch of %d messages failed (%r), then was written in parts", len(batch), exc)

    async def _store(self, batch: list[Item]) -> bool:
        """Write ``batch``, retrying ``StoreError`` with backoff for up to ``retry_for`` seconds, and tell
        its senders: stored (True) or, given up, lost (False). Any other exception is the batch's own
        and propagates, its senders not told."""
        rows = [(room, message) for room, message, _ in batch]
        acks = [ack for _, _, ack in batch if ack is not None]
        give_up = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                await self._call(self.store.write, rows)
            except StoreError as exc:
                self._set_up(False, str(exc))
                if time.monotonic() + delay > give_up:
                    log.warning("store: gave up on %d messages: %s", len(rows), exc)
                    if acks:
                        self._notify(self.on_lost, acks, UNREACHABLE_WRITE)
                    return False
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self._notify(self.observe, "write", time.perf_counter() - started)
            self._set_up(True)
            if acks:
                self._notify(self.on_stored, acks)
            return True

    async def _isolate(self, part: list[Item], exc: BaseException, refused: list[tuple[Item, BaseException]]) -> bool:
        """Write what can be written of ``part``, which failed with ``exc``, halving it around the items
        that fail (they go to ``refused``): about 2 log2(n) writes per bad item, where one write per
        message would cost a commit (an fsync) each. False: the store became unreachable meanwhile,
        and the senders of the rest of ``part`` were told so."""
        if len(part) == 1:
            refused.append((part[0], exc))
            return True
        middle = len(part) // 2
        halves = (part[:middle], part[middle:])
        for i, half in enumerate(halves):
            try:
                ok = await self._store(half)
            except Exception as half_exc:
                ok = await self._isolate(half, half_exc, refused)
            if not ok:
                acks = [ack for later in halves[i + 1 :] for _, _, ack in later if ack is not None]
                if acks:
                    self._notify(self.on_lost, acks, UNREACHABLE_WRITE)
                return False
        return True

    def _refused(self, refused: list[tuple[Item, BaseException]], batch_size: int) -> None:
        """The store failed on these messages for a reason of their own: count them, log once (with
        the first one's traceback) and tell their senders."""
        self.failures += len(refused)
        ids = ", ".join(repr(_message_id(item)) for item, _ in refused[:5]) + (", ..." if len(refused) > 5 else "")
        first = refused[0][1]
        log.error("store: could not keep %d of %d messages (%s): %r", len(refused), batch_size, ids, first,
                  exc_info=first)
        acks = [ack for (_, _, ack), _ in refused if ack is not None]
        if acks:
            self._notify(self.on_lost, acks, REFUSED_WRITE)

    async def _answer(self, request: Any, room: str, limit: int, before: str | None, after: str | None) -> None:
        started = time.perf_counter()
        try:
            messages = await self._call(self._history, room, limit, before, after)
        except StoreError as exc:
            self._set_up(False, str(exc))
            self._notify(self.on_history_failed, request, UNREACHABLE_READ)
            return
        except Exception as exc:
            self._read_failed(request, room, exc)
            return
        self._notify(self.observe, "read", time.perf_counter() - started)
        self._notify(self.on_history, request, room, messages)

    def _read_failed(self, request: Any, room: str, exc: BaseException) -> None:
        self.failures += 1
        log.error("store: a history read of room %r failed: %r", room, exc, exc_info=exc)
        self._notify(self.on_history_failed, request, FAILED_READ)

    def _notify(self, callback: Callable[..., Any], *args: Any) -> None:
        """Call one of the shell's callbacks; one that raises is logged and counted, and we go on."""
        try:
            callback(*args)
        except Exception:
            self.failures += 1
            log.exception("store: the callback %s raised", getattr(callback, "__name__", repr(callback)))

    def _set_up(self, up: bool, why: str = "") -> None:
        if up != self.up:
            self.up = up
            if up:
                log.warning("store: reachable again")
            else:
                log.warning("store: unreachable: %s", why)
            self._notify(self.on_status, up)
