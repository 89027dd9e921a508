"""The race in quick mode, as a test: every server runs every workload it speaks, delivers, loses nothing.

It checks that the race machinery and every peer still work (the contract, the load client, the pinning, the
table, the chart); the figures of so short a run mean nothing and are not looked at, so nothing here depends on
how fast the machine is. Every peer's library is in the ``test`` extra: nothing is skipped.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from wsproto.frame_protocol import FrameProtocol, Opcode

from bench.loadclient import chat_burst, chat_text, memberships
from bench.race import QUICK, ROOT, SERVERS, parse_args, workloads
from bench.report import columns

HANG_GUARD = 600  # seconds; the race bounds every run itself, this only stops a wedged test


def test_quick_race_every_server_delivers_everything(tmp_path: Path) -> None:
    results, picture = tmp_path / "race.jsonl", tmp_path / "race.png"
    race = subprocess.run(
        [sys.executable, "-m", "bench.race", "--quick", "--results", str(results), "--chart", str(picture)],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert race.returncode == 0, race.stdout + race.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    ran = {(record["server"], record["workload"]) for record in records}
    chosen = workloads(parse_args(["--quick"]))
    keys = [workload.key for workload in chosen]
    assert {*(f"small-{n}" for n in QUICK["small_n"].split(",")), "small-paced", "handshake", "memory",
            "multi"} <= set(keys)
    expected = {(server, w.key) for server in SERVERS for w in chosen if w.runs_on(server)}
    assert ("hubbub", "multi") in expected and ("limit", "multi") not in expected  # /ws: hubbub only
    assert ran == expected
    for record in records:
        where = f"{record['server']} {record['workload']}"
        assert record["failure"] is None, where
        result = record["result"]
        assert result["ok"], where
        assert result["unexpected_closes"] == 0, where
        if "received" in result:  # the workloads that send messages
            assert result["deliveries"] > 0, where
            assert result["received"] == result["expected"] > 0, where
            assert result["lost"] == 0, where
            assert result["inbound_per_s"] > 0 and result["server_us_per_inbound"] is not None, where
        if record["workload"] == "memory":
            assert result["server_peak_rss_kb"] >= result["rss_full_kb"] > 0, where
        assert record["versions"]["websockets"] and record["machine"]["cpus"], where
    multi = next(record["result"] for record in records if record["workload"] == "multi")
    assert multi["sockets"] * multi["rooms_per_socket"] == QUICK["rooms"] * QUICK["room_size"]
    assert "hubbub multi/rooms server CPU per delivery" in race.stdout  # the ratio against the 1.15x target
    for server in SERVERS:
        if server != "hubbub":
            assert f"{server} skips multi" in race.stderr
        assert f"| {server} " in race.stdout
    for key in keys:
        for column in columns(key):
            assert f" {column} |" in race.stdout, column
    assert picture.stat().st_size > 0


def test_chat_burst_is_masked_chat_frames() -> None:
    """The full-speed sender's bursts: one masked text frame per message, in order, each with its own key."""
    first = random.randrange(10**6)
    burst = chat_burst(first, first + 32)
    parser = FrameProtocol(client=False, extensions=[])  # a server's side: it unmasks, and refuses unmasked frames
    parser.receive_bytes(burst)
    frames = list(parser.received_frames())
    assert [frame.opcode for frame in frames] == [Opcode.TEXT] * 32
    assert [json.loads(frame.payload) for frame in frames] == [
        {"event": "message", "text": chat_text(seq).decode()} for seq in range(first, first + 32)
    ]
    keys = {burst[at + 2 : at + 6] for at in range(0, len(burst), len(burst) // 32)}
    assert len(keys) > 1  # a fresh key per frame, not one per burst


def test_multi_room_memberships_are_balanced_and_mixed() -> None:
    """Each socket in its own rooms, each room with exactly its members, and not one fixed set of rooms."""
    for rooms, members, per_client in ((100, 50, 10), (QUICK["rooms"], QUICK["room_size"], QUICK["rooms_per_socket"])):
        clients = memberships(rooms, members, per_client)
        assert len(clients) == rooms * members // per_client
        assert all(len(set(joined)) == per_client for joined in clients)
        assert set(Counter(room for joined in clients for room in joined).values()) == {members}
        assert len({frozenset(joined) for joined in clients}) > rooms // per_client  # not mere partitions
