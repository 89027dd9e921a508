"""Presence: full state for a newcomer, coalesced diffs for everyone else."""

from __future__ import annotations

import pytest

from hubbub import core
from tests.hub import Hub


def test_newcomer_gets_state_and_others_get_a_diff_at_the_end_of_the_window() -> None:
    hub = Hub(presence_window=0.05)
    alice = hub.join("/presence?user=alice")
    assert alice.json() == []  # its state comes when the window closes, with everyone who joined in it
    hub.advance(0.06)
    assert alice.json() == [{"event": "presence_state", "users": ["alice"]}]
    bob = hub.join("/presence?user=bob")
    hub.advance(0.01)
    assert alice.json() == [] and bob.json() == []
    hub.advance(0.05)
    assert alice.json() == [{"event": "presence_diff", "joins": ["bob"], "leaves": []}]
    assert bob.json() == [{"event": "presence_state", "users": ["alice", "bob"]}]  # no diff: the state has it


def test_joins_and_leaves_within_one_window_coalesce() -> None:
    hub = Hub(presence_window=0.05)
    alice = hub.join("/presence?user=alice")
    hub.advance(0.1)
    alice.json()
    bob = hub.join("/presence?user=bob")
    carol = hub.join("/presence?user=carol")
    bob.close()
    hub.advance(0.06)
    assert alice.json() == [{"event": "presence_diff", "joins": ["carol"], "leaves": []}]
    assert carol.json() == [{"event": "presence_state", "users": ["alice", "carol"]}]
    assert bob.json() == []  # gone before the window closed


def test_a_second_connection_of_a_present_user_gets_the_state_too() -> None:
    hub = Hub(presence_window=0.05)
    first = hub.join("/presence?user=dana")
    hub.advance(0.06)
    first.json()
    second = hub.join("/presence?user=dana")  # not news to anyone, but it needs the state
    hub.advance(0.06)
    assert second.json() == [{"event": "presence_state", "users": ["dana"]}]
    assert first.json() == []


def test_a_reconnect_storm_costs_one_state_and_one_diff_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub(presence_window=0.05)
    old = [hub.join(f"/presence?user=old{i}") for i in range(50)]
    hub.advance(0.06)
    storm = [hub.join(f"/presence?user=new{i}") for i in range(2000)]
    encoded: list[str] = []
    real = core.text_message
    monkeypatch.setattr(core, "text_message", lambda payload, config: encoded.append(payload["event"]) or real(
        payload, config))
    hub.advance(0.06)
    assert sorted(encoded) == ["presence_diff", "presence_state"]
    users = sorted([f"old{i}" for i in range(50)] + [f"new{i}" for i in range(2000)])
    assert storm[0].json() == storm[-1].json() == [{"event": "presence_state", "users": users}]
    expected_diff = {"event": "presence_diff", "joins": sorted(f"new{i}" for i in range(2000)), "leaves": []}
    assert all(peer.json()[-1] == expected_diff for peer in old)


def test_user_with_two_connections_stays_until_the_last_closes() -> None:
    hub = Hub()
    watcher = hub.join("/presence?user=watcher")
    one = hub.join("/presence?user=dana")
    two = hub.join("/presence?user=dana")
    hub.advance(0.1)
    watcher.json()
    one.close()
    hub.advance(0.1)
    assert watcher.json() == []
    assert hub.server.presence("presence") == ["dana", "watcher"]
    two.feed(b"")  # vanishes without a close frame
    hub.advance(0.1)
    assert watcher.json() == [{"event": "presence_diff", "joins": [], "leaves": ["dana"]}]
    assert hub.server.presence("presence") == ["watcher"]


def test_list_returns_the_current_state() -> None:
    hub = Hub()
    alice = hub.join("/presence?user=alice")
    hub.join("/presence?user=bob")
    alice.json()
    alice.send_json({"event": "list"})
    assert alice.json() == [{"event": "presence_state", "users": ["alice", "bob"]}]


def test_rooms_and_presence_entries_do_not_leak() -> None:
    hub = Hub()
    peers = [hub.join(f"/presence?user=u{i}") for i in range(20)]
    peers += [hub.join(f"/chat/r{i}?user=u{i}") for i in range(20)]
    for peer in peers:
        peer.feed(b"")
    hub.advance(1)
    assert hub.server.rooms == {}
    assert hub.server.connections == {}
    assert hub.server.open_count == 0
