"""The race in quick mode, as a test: every server runs every workload, delivers, and loses nothing.

It checks that the race machinery and every peer still work (the contract, the load client, the pinning, the
table, the chart); the figures of so short a run mean nothing and are not looked at, so nothing here depends on
how fast the machine is. Every peer's library is in the ``test`` extra: nothing is skipped.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from wsproto.frame_protocol import FrameProtocol, Opcode

from bench.loadclient import chat_burst, chat_text
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
    keys = [workload.key for workload in workloads(parse_args(["--quick"]))]
    assert {*(f"small-{n}" for n in QUICK["small_n"].split(",")), "small-paced", "handshake", "memory"} <= set(keys)
    expected = {(server, key) for server in SERVERS for key in keys}
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
    for server in SERVERS:
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
