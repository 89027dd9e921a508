"""The stores against real SQLite files and a real PostgreSQL: batches, paging, schema, reopening."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubbub.backends.store import SCHEMA_VERSION, MemoryStore, PostgresStore, SQLiteStore, Store, StoreError, open_store
from tests.services import DATABASE_URL, drop_schema, postgres_schema, require


def message(i: int, room: str = "r") -> dict[str, object]:
    return {"event": "message", "room": room, "user": "u", "text": f"m{i}", "id": f"{i:012x}000000aaaa", "ts": i}


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """A function that opens the same store again (memory: the same object)."""
    if request.param == "memory":
        memory = MemoryStore()
        yield lambda: memory
    elif request.param == "sqlite":
        yield lambda: SQLiteStore(str(tmp_path / "h.db"))
    else:
        url, schema = postgres_schema(require(DATABASE_URL, 5432, "PostgreSQL"))
        yield lambda: PostgresStore(url)
        drop_schema(DATABASE_URL, schema)


def test_history_pages_with_before_and_survives_reopening(make_store: object) -> None:
    store: Store = make_store()  # type: ignore[operator]
    store.write([("r", message(i)) for i in range(10)] + [("other", message(99, "other"))])
    store.write([("r", message(3))])  # a retried batch: written once
    store.close()
    store = make_store()  # type: ignore[operator]
    newest = store.history("r", 4)
    assert [m["text"] for m in newest] == ["m6", "m7", "m8", "m9"]
    older = store.history("r", 4, before=newest[0]["id"])
    assert [m["text"] for m in older] == ["m2", "m3", "m4", "m5"]
    assert [m["text"] for m in store.history("r", 4, before=older[0]["id"])] == ["m0", "m1"]
    assert store.history("nobody", 5) == []
    store.close()


def test_sqlite_schema_is_created_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    store = open_store(f"sqlite:///{path}")
    store.ping()
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM hubbub_schema").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("UPDATE hubbub_schema SET version = 999")
    with pytest.raises(StoreError, match="999"):
        SQLiteStore(str(path)).ping()


def test_an_unreachable_postgresql_raises_store_error() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
    with pytest.raises(StoreError):
        store.write([("r", message(1))])


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://", "nope"])
def test_unknown_store_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


def test_publish_keys_are_kept_apart_from_the_body_once_per_room_and_user(make_store: object) -> None:
    store: Store = make_store()  # type: ignore[operator]
    keyed = [{**message(i), "key": f"k{i % 2}"} for i in range(1, 4)]  # message 3 repeats message 1's key
    store.write([("r", keyed[0]), ("r", keyed[1]), ("other", {**message(5, "other"), "key": "k1"})])
    store.write([("r", keyed[2]), ("r", {**message(6), "user": "v", "key": "k1"})])
    history = store.history("r", 10)
    assert all("key" not in m for m in history)
    if isinstance(store, MemoryStore):  # the core's PublishKeys keeps it from ever getting a repeat
        assert store.recent_keys(10) == []
        return
    assert [m["text"] for m in history] == ["m1", "m2", "m6"]  # the repeat of (r, u, k1) was not kept
    assert store.recent_keys(10) == [
        ("r", "u", "k1", message(1)["id"], 1), ("r", "u", "k0", message(2)["id"], 2),
        ("other", "u", "k1", message(5)["id"], 5), ("r", "v", "k1", message(6)["id"], 6)]
    assert store.recent_keys(1) == [("r", "v", "k1", message(6)["id"], 6)]
    store.close()
