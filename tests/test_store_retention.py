"""History retention, in every store: count per room, age, room spam, the 1 -> 2 migration, the setting's format.

Against real SQLite files and the real PostgreSQL (tests/services.py: skipped on a developer's
machine without it, a failure with CI=true); row counts are read directly from the database,
not through the store under test.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hubbub.backends.store import (
    DEFAULT_RETENTION,
    MEMORY_PER_ROOM,
    SCHEMA_VERSION,
    MemoryStore,
    PostgresStore,
    Retention,
    SQLiteStore,
    Store,
    open_store,
    parse_retention,
)
from tests.services import DATABASE_URL, drop_schema, postgres_schema, require

HOUR_MS = 3_600_000


def message(i: int, room: str = "r", ts: int | None = None) -> dict[str, object]:
    """Message ``i``: ids in the order of ``i``, ``ts`` now unless given (Unix milliseconds)."""
    return {
        "event": "message", "room": room, "user": "u", "text": f"m{i}", "id": f"{i:012x}000000aaaa",
        "ts": int(time.time() * 1000) if ts is None else ts,
    }


@dataclass
class Database:
    """A SQL store's database: open a store on it, and read its rows behind the store's back."""

    kind: str
    open: Callable[[Retention], Store]
    rows: Callable[[str], list[str]]  # the ids of one room's rows, oldest first
    execute: Callable[[str], list[tuple[object, ...]]]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path / "h.db"

        def run_sqlite(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
            with sqlite3.connect(path) as db:
                return db.execute(sql, params).fetchall()

        yield Database(
            kind="sqlite",
            open=lambda retention: SQLiteStore(str(path), retention=retention),
            rows=lambda room: [r[0] for r in run_sqlite(  # type: ignore[misc]
                "SELECT id FROM hubbub_messages WHERE room = ? ORDER BY id", (room,))],
            execute=run_sqlite,
        )
    else:
        import psycopg

        url, schema = postgres_schema(require(DATABASE_URL, 5432, "PostgreSQL"))
        reader = psycopg.connect(url, autocommit=True)

        def run_pg(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
            cur = reader.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description is not None else []

        yield Database(
            kind="postgresql",
            open=lambda retention: PostgresStore(url, retention=retention),
            rows=lambda room: [r[0] for r in run_pg(  # type: ignore[misc]
                "SELECT id FROM hubbub_messages WHERE room = ? ORDER BY id", (room,))],
            execute=run_pg,
        )
        reader.close()
        drop_schema(DATABASE_URL, schema)


# -- the setting ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1000", Retention(1000, None)),
    ("30d", Retention(None, 30 * 86400.0)),
    ("12h", Retention(None, 12 * 3600.0)),
    ("3600s", Retention(None, 3600.0)),
    ("90m", Retention(None, 5400.0)),
    ("1.5h", Retention(None, 5400.0)),
    ("1000,30d", Retention(1000, 30 * 86400.0)),
    (" 500 , 7D ", Retention(500, 7 * 86400.0)),
    ("off", Retention(None, None)),
    ("OFF", Retention(None, None)),
])
def test_parse_retention_accepts(text: str, expected: Retention) -> None:
    assert parse_retention(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "expected COUNT"), ("1000,", "expected COUNT"), (",30d", "expected COUNT"), ("30d,1000", "expected COUNT"),
    ("1000,30", "expected COUNT"), ("30", None), ("30x", "expected COUNT"), ("1e3", "expected COUNT"),
    ("-5", "expected COUNT"), ("1,2,3", "expected COUNT"), ("none", "expected COUNT"), ("0", "at least 1"),
    ("0s", "more than 0"), ("0,1d", "at least 1"),
])
def test_parse_retention_refuses(text: str, why: str | None) -> None:
    if why is None:  # "30" is a count of 30 messages, not 30 seconds
        assert parse_retention(text) == Retention(30, None)
        return
    with pytest.raises(ValueError, match=why) as refused:
        parse_retention(text)
    assert repr(text) in str(refused.value)  # the message names what was given


def test_open_store_applies_the_default_retention(tmp_path: Path) -> None:
    assert DEFAULT_RETENTION == "1000,30d"
    default = Retention(1000, 30 * 86400.0)
    assert open_store("memory").retention == default  # type: ignore[attr-defined]
    assert open_store(f"sqlite:///{tmp_path / 'h.db'}").retention == default  # type: ignore[attr-defined]
    assert open_store("memory", Retention(5, None)).retention == Retention(5, None)  # type: ignore[attr-defined]
    assert MemoryStore().per_room == MEMORY_PER_ROOM  # no count: the memory store stays bounded all the same


# -- count ----------------------------------------------------------------------


def test_count_retention_keeps_the_newest_of_each_room(database: Database) -> None:
    store = database.open(Retention(100, None))
    store.write([("other", message(i, "other")) for i in range(10)])
    sizes = itertools.cycle([1, 3, 17, 50, 1, 1, 7])  # batches of every size, as the worker makes them
    written = 0
    while written < 5000:
        size = min(next(sizes), 5000 - written)
        store.write([("r", message(i)) for i in range(written, written + size)])
        written += size
        assert len(database.rows("r")) <= 110  # never more than count + a tenth, after any batch
    ids = database.rows("r")
    assert 100 <= len(ids) <= 110
    assert ids == [message(i)["id"] for i in range(5000 - len(ids), 5000)]  # the newest ones
    history = store.history("r", 500)
    assert [m["text"] for m in history] == [f"m{i}" for i in range(5000 - len(ids), 5000)]
    assert len(database.rows("other")) == 10  # per room: the small room lost nothing
    store.close()

    # reopened, a store knows nothing of a room's size: the room is trimmed at its first write
    store = database.open(Retention(100, None))
    store.write([("r", message(5000))])
    assert database.rows("r") == [message(i)["id"] for i in range(4901, 5001)]
    store.close()


def test_memory_store_count_retention() -> None:
    store = MemoryStore(retention=Retention(100, None))
    for i in range(5000):
        store.write([("r", message(i))])
    assert [m["text"] for m in store.history("r", 500)] == [f"m{i}" for i in range(4900, 5000)]
    assert len(store._ids) == 100


def test_the_rooms_a_sql_store_counts_are_bounded(database: Database) -> None:
    """Room spam cannot grow what a SQL store remembers of its rooms; a room it forgot is trimmed
    at its next write, so forgetting never lets a room grow past its count."""
    store = database.open(Retention(100, None))  # trimmed every 10 rows
    store._pruning.tracked = 10  # type: ignore[attr-defined]
    store.write([("big", message(i, "big")) for i in range(105)])  # first seen: trimmed at once
    store.write([("big", message(i, "big")) for i in range(105, 110)])  # grown by 5: not yet
    assert len(database.rows("big")) == 105
    for i in range(50):
        store.write([(f"spam{i}", message(1000 + i, f"spam{i}"))])
        assert len(store._pruning._grown) <= 10  # type: ignore[attr-defined]
    store.write([("big", message(110, "big"))])  # forgotten: trimmed
    assert database.rows("big") == [message(i)["id"] for i in range(11, 111)]
    store.close()


# -- age ------------------------------------------------------------------------


def test_age_retention_deletes_old_messages(database: Database) -> None:
    now = int(time.time() * 1000)
    store = database.open(Retention(100, 3600.0))
    old = [("r", message(i, ts=now - 2 * HOUR_MS)) for i in range(10)]
    fresh = [("r", message(i)) for i in range(10, 20)]
    store.write(old + fresh)  # the first write runs the age delete
    assert database.rows("r") == [message(i)["id"] for i in range(10, 20)]

    store.write([("r", message(i, ts=now - 2 * HOUR_MS)) for i in range(20, 30)])
    assert len(database.rows("r")) == 20  # the age delete runs at most once a minute, but history never shows them
    assert [m["text"] for m in store.history("r", 100)] == [f"m{i}" for i in range(10, 20)]

    store._pruning._expired_at -= 61  # type: ignore[attr-defined]  # a minute later
    store.write([("r", message(30))])
    assert database.rows("r") == [message(i)["id"] for i in range(10, 20)] + [message(30)["id"]]
    store.close()


def test_a_big_age_delete_is_spread_over_writes(database: Database) -> None:
    now = int(time.time() * 1000)
    store = database.open(Retention(None, 3600.0))
    store._pruning.expire_rows = 5  # type: ignore[attr-defined]
    seeder = database.open(Retention(None, None))
    seeder.write([("r", message(i, ts=now - 2 * HOUR_MS)) for i in range(12)])
    seeder.close()
    for i, left in ((100, 7), (101, 2), (102, 0)):  # 5 old rows a write, until none is left
        store.write([("r", message(i))])
        assert len(database.rows("r")) == left + (i - 99)
    store.write([("r", message(103))])  # then at most once a minute again
    assert len(database.rows("r")) == 4
    store.close()


def test_memory_store_age_retention() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(retention=Retention(None, 3600.0), clock=lambda: clock[0])
    now = int(clock[0] * 1000)
    store.write([("r", message(0, ts=now - 2 * HOUR_MS)), ("r", message(1, ts=now))])
    assert [m["text"] for m in store.history("r", 10)] == ["m1"]  # already too old to keep
    clock[0] += 1800
    store.write([("r", message(2, ts=now + 1800_000))])
    clock[0] += 1801
    assert [m["text"] for m in store.history("r", 10)] == ["m2"]
    clock[0] += 1800
    assert store.history("r", 10) == []
    assert store._rooms == {} and store._ids == set()


def test_memory_store_room_spam_is_given_back_after_aging_out() -> None:
    clock = [1_800_000_000.0]
    store = MemoryStore(retention=Retention(1000, 600.0), clock=lambda: clock[0])
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            store.write([(f"spam-{i}", message(i, f"spam-{i}", ts=int(clock[0] * 1000)))])
        spammed = tracemalloc.get_traced_memory()[0] - baseline
        assert len(store._rooms) == 20_000
        clock[0] += 601
        assert store.history("another", 10) == []  # any read (or write) sweeps every room once one is due
        left = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert store._rooms == {} and store._ids == set()
    assert spammed > 5_000_000 and left < 50_000, (spammed, left)  # ~25 MB held, all of it given back


# -- the migration --------------------------------------------------------------

VERSION_1 = [  # the schema as hubbub 0.1 created it, written out here so the test pins it
    "CREATE TABLE hubbub_schema (version INTEGER NOT NULL)",
    "INSERT INTO hubbub_schema VALUES (1)",
    "CREATE TABLE hubbub_messages (id TEXT PRIMARY KEY, room TEXT NOT NULL, ts BIGINT NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX hubbub_messages_room_id ON hubbub_messages (room, id)",
]


def test_migration_from_version_1(database: Database) -> None:
    for statement in VERSION_1:
        database.execute(statement)
    body = '{"event":"message","room":"r","user":"u","text":"from v1","id":"000000000001000000aaaa","ts":%d}'
    ts = int(time.time() * 1000)
    database.execute(
        f"INSERT INTO hubbub_messages VALUES ('000000000001000000aaaa', 'r', {ts}, '{body % ts}')"
    )
    store = database.open(Retention(100, 3600.0))
    store.write([("r", message(2))])
    assert [m["text"] for m in store.history("r", 10)] == ["from v1", "m2"]
    store.close()
    assert database.execute("SELECT version FROM hubbub_schema") == [(SCHEMA_VERSION,)] == [(3,)]
    if database.kind == "sqlite":
        indexes = database.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'hubbub_messages'")
        plan = database.execute("EXPLAIN QUERY PLAN DELETE FROM hubbub_messages WHERE ts < 5")
        assert "hubbub_messages_ts" in str(plan)  # the age delete searches the index, it does not scan
    else:
        indexes = database.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'hubbub_messages' "
                                   "AND schemaname = current_schema()")
    assert "hubbub_messages_ts" in {name for (name,) in indexes}
    # and opening again migrates nothing
    store = database.open(Retention(100, 3600.0))
    assert [m["text"] for m in store.history("r", 10)] == ["from v1", "m2"]
    store.close()
