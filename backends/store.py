"""Message stores, where chat history lives, and the ``StoreWorker`` that feeds them in batches.

``--store`` picks one by URL:

- ``memory``: the last ``per_room`` messages of each room, in this process; gone on restart.
- ``sqlite:///PATH`` (the default, ``sqlite:///hubbub.db``): a file, through the standard
  library's sqlite3, in WAL mode with ``synchronous=FULL`` so that a commit is on disk.
- ``postgresql://USER@HOST:PORT/DB``: PostgreSQL through psycopg 3 (any libpq URL works,
  ``?options=-csearch_path%3Dmyschema`` included).

The stores are plain blocking DB-API code; ``StoreWorker`` runs them in one worker thread
(``anyio.to_thread``) so the event loop never waits on a disk or a database. Writes are
idempotent (the message id is the primary key), which makes retrying a batch safe. The
schema is created on first start and versioned in ``hubbub_schema``: ``MIGRATIONS[n]``
takes a database from version n to n+1.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio

log = logging.getLogger("hubbub.store")

Message = Mapping[str, Any]

SCHEMA_VERSION = 1
MIGRATIONS: list[list[str]] = [
    [  # 0 -> 1: one row per message; the id is time-ordered, so (room, id) pages history
        "CREATE TABLE hubbub_messages ("
        "id TEXT PRIMARY KEY, room TEXT NOT NULL, ts BIGINT NOT NULL, body TEXT NOT NULL)",
        "CREATE INDEX hubbub_messages_room_id ON hubbub_messages (room, id)",
    ],
]


class StoreError(Exception):
    """The store could not do what was asked (unreachable, disk full, ...)."""


class Store(Protocol):
    """What ``StoreWorker`` needs; every method may block and raise ``StoreError``."""

    blocking: bool  # True: run it in a worker thread
    shared: bool  # True: every instance writes to the same store (so each keeps only its own messages)

    def write(self, messages: Sequence[tuple[str, Message]]) -> None: ...
    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class MemoryStore:
    """The last ``per_room`` messages of every room, oldest first; gone on restart."""

    blocking = False
    shared = False

    def __init__(self, per_room: int = 1000) -> None:
        self.per_room = per_room
        self._rooms: dict[str, deque[Message]] = {}
        self._ids: set[str] = set()

    def add(self, room: str, message: Message) -> None:
        if message["id"] in self._ids:
            return
        log = self._rooms.get(room)
        if log is None:
            log = self._rooms[room] = deque(maxlen=self.per_room)
        if len(log) == log.maxlen:
            self._ids.discard(log[0]["id"])
        log.append(message)
        self._ids.add(message["id"])

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        for room, message in messages:
            self.add(room, message)

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        """Up to ``limit`` messages older than id ``before`` (or the newest), oldest first."""
        log = self._rooms.get(room, ())
        picked: list[Message] = []
        for message in reversed(log):
            if before is not None and message["id"] >= before:
                continue
            picked.append(message)
            if len(picked) == limit:
                break
        picked.reverse()
        return picked

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def _row(room: str, message: Message) -> tuple[str, str, int, str]:
    return (message["id"], room, int(message.get("ts", 0)), json.dumps(message, separators=(",", ":")))


class SQLiteStore:
    """A SQLite file; one connection, used from one worker thread at a time."""

    blocking = True
    shared = False

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                self._migrate(db)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite {self.path}: {exc}") from exc
            self._db = db
        return self._db

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS hubbub_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM hubbub_schema").fetchone()
            version = row[0] if row else 0
            if row is None:
                db.execute("INSERT INTO hubbub_schema VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreError(f"the database has schema version {version}; this hubbub knows {SCHEMA_VERSION}")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement)
            db.execute("UPDATE hubbub_schema SET version = ?", (SCHEMA_VERSION,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        db = self._connect()
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO hubbub_messages VALUES (?, ?, ?, ?)", [_row(*m) for m in messages])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT body FROM hubbub_messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (room, before if before is not None else "\uffff", limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        return [json.loads(body) for (body,) in reversed(rows)]

    def ping(self) -> None:
        try:
            self._connect().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class PostgresStore:
    """PostgreSQL through psycopg 3's blocking API in the worker thread (so trio works too).

    One connection, opened lazily and opened again after any failure: a database that
    goes away and comes back costs the batches in between, never the server.
    """

    blocking = True
    shared = True

    def __init__(self, url: str, connect_timeout: float = 3.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._db: Any = None

    def _connect(self) -> Any:
        import psycopg  # only for --store postgresql://

        if self._db is None or self._db.closed:
            try:
                db = psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)), autocommit=False)
                with db.transaction():
                    # two instances starting at once must not both migrate
                    db.execute("SELECT pg_advisory_xact_lock(7402091)")
                    db.execute("CREATE TABLE IF NOT EXISTS hubbub_schema (version INTEGER NOT NULL)")
                    row = db.execute("SELECT version FROM hubbub_schema").fetchone()
                    version = row[0] if row else 0
                    if row is None:
                        db.execute("INSERT INTO hubbub_schema VALUES (0)")
                    if version > SCHEMA_VERSION:
                        raise StoreError(f"schema version {version} is newer than this hubbub's {SCHEMA_VERSION}")
                    for statements in MIGRATIONS[version:]:
                        for statement in statements:
                            db.execute(statement)
                    db.execute("UPDATE hubbub_schema SET version = %s", (SCHEMA_VERSION,))
            except psycopg.Error as exc:
                raise StoreError(f"postgresql: {exc}".strip()) from exc
            self._db = db
        return self._db

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        import psycopg

        db = self._connect()
        try:
            with db.transaction():
                return fn(db)
        except psycopg.Error as exc:
            if db.closed or db.broken:
                self._db = None
            raise StoreError(f"postgresql: {exc}".strip()) from exc

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        rows = [_row(*m) for m in messages]

        def insert(db: Any) -> None:
            with db.cursor() as cur:
                cur.executemany(
                    "INSERT INTO hubbub_messages (id, room, ts, body) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    rows,
                )

        self._run(insert)

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        def select(db: Any) -> list[Any]:
            if before is None:
                sql = "SELECT body FROM hubbub_messages WHERE room = %s ORDER BY id DESC LIMIT %s"
                return db.execute(sql, (room, limit)).fetchall()
            sql = "SELECT body FROM hubbub_messages WHERE room = %s AND id < %s ORDER BY id DESC LIMIT %s"
            return db.execute(sql, (room, before, limit)).fetchall()

        return [json.loads(body) for (body,) in reversed(self._run(select))]

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def open_store(url: str) -> Store:
    """The store a ``--store`` URL names."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
        if path.startswith("/"):
            path = path[1:]  # sqlite:///hubbub.db is relative, sqlite:////var/x.db absolute
        if not path:
            raise ValueError("--store sqlite:///PATH needs a path")
        return SQLiteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"unknown --store {url!r}: expected memory, sqlite:///PATH or postgresql://...")


class StoreWorker:
    """Writes ``Stored`` messages in batches and answers history, off the event loop.

    One loop does everything in order: take every write queued so far as one batch,
    commit it, report the acks; then answer the history reads queued before the batch
    was taken (so a read sees every message stored before it was asked for). A batch
    that fails is retried with backoff for up to ``retry_for`` seconds, then given up
    (its senders hear ``unavailable``). ``on_status`` reports the store up or down.
    A store that never blocks (``MemoryStore``) is written and read inline, in the same
    order, while nothing is queued before it.
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
        self._writes: list[tuple[str, Message, Any]] = []
        self._reads: list[tuple[int, str, int, str | None]] = []
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._limiter = anyio.CapacityLimiter(1)

    # -- what the shell calls ---------------------------------------------------

    def write(self, room: str, message: Message, ack: Any) -> None:
        if not self.store.blocking and not self._writes and self.up:
            # A store that never blocks (memory) commits here and now: no batch, no task switch.
            started = time.perf_counter()
            try:
                self.store.write([(room, message)])
            except StoreError:
                pass  # the loop below retries it like any failed batch
            else:
                self.observe("write", time.perf_counter() - started)
                if ack is not None:
                    self.on_stored([ack])
                return
        self._writes.append((room, message, ack))
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    def read(self, conn_id: int, room: str, limit: int, before: str | None) -> None:
        if not self.store.blocking and not self._writes and not self._reads and self.up:
            started = time.perf_counter()
            try:
                messages = self.store.history(room, limit, before)
            except StoreError:
                pass
            else:
                self.observe("read", time.perf_counter() - started)
                self.on_history(conn_id, room, messages)
                return
        self._reads.append((conn_id, room, limit, before))
        self._wake.set()

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

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.store.blocking:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _commit(self, batch: list[tuple[str, Message, Any]]) -> None:
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
                        self.on_lost(acks, "the message store is unreachable: this message was not kept")
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.observe("write", time.perf_counter() - started)
            self._set_up(True)
            if acks:
                self.on_stored(acks)
            return

    async def _answer(self, conn_id: int, room: str, limit: int, before: str | None) -> None:
        started = time.perf_counter()
        try:
            messages = await self._call(self.store.history, room, limit, before)
        except StoreError as exc:
            self._set_up(False, str(exc))
            self.on_history_failed(conn_id, "the message store is unreachable: no history now")
            return
        self.observe("read", time.perf_counter() - started)
        self.on_history(conn_id, room, messages)

    def _set_up(self, up: bool, why: str = "") -> None:
        if up != self.up:
            self.up = up
            if up:
                log.warning("store: reachable again")
            else:
                log.warning("store: unreachable: %s", why)
            self.on_status(up)
