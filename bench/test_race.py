"""The race in quick mode, as a test: every server runs every workload, delivers, and loses nothing.

It checks that the race machinery and every peer still work (the contract, the load client, the pinning, the
table, the chart); the figures of so short a run mean nothing and are not looked at, so nothing here depends on
how fast the machine is. Every peer's library is in the ``test`` extra: nothing is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.race import QUICK, ROOT, SERVERS, WORKLOADS

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
    keys = [f"full-{n}" for n in str(QUICK["n"]).split(",")] + [name for name in WORKLOADS if name != "full"]
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
        assert record["versions"]["websockets"] and record["machine"]["cpus"], where
    for server in SERVERS:
        assert f"| {server} " in race.stdout
    assert picture.stat().st_size > 0
