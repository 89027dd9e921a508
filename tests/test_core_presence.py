"""Presence: full state for a newcomer, coalesced diffs for everyone else."""

from __future__ import annotations

from tests.hub import Hub


def test_newcomer_gets_state_and_others_get_a_diff_after_the_window() -> None:
    hub = Hub(presence_window=0.05)
    alice = hub.join("/presence?user=alice")
    assert alice.json() == [{"event": "presence_state", "users": ["alice"]}]
    hub.advance(0.1)
    alice.json()
    bob = hub.join("/presence?user=bob")
    assert bob.json() == [{"event": "presence_state", "users": ["alice", "bob"]}]
    assert alice.json() == []  # not before the window closes
    hub.advance(0.06)
    assert alice.json() == [{"event": "presence_diff", "joins": ["bob"], "leaves": []}]
    assert bob.json() == []  # its own join is not news to it


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
    assert carol.json() == [{"event": "presence_state", "users": ["alice", "bob", "carol"]},
                            {"event": "presence_diff", "joins": [], "leaves": ["bob"]}]


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
