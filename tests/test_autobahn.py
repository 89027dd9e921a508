"""The Autobahn TestSuite against /echo, through the kosoku runner: all 517 cases, compression included.

The real server runs as a child process, configured for the suite:

- ``--rate-limit 0``: the 12.x/13.x cases each echo 1000 messages back to back, far past the
  per-connection rate limit (100/s by default), which would answer with ``rate_limited`` errors
  and close 1008. The suite tests the protocol, not our policy.
- ``--ping-interval 0``: no keepalive pings. kosoku 0.1.0 marks a 12.x case FAILED when the
  server sends a ping in the middle of it; with pings off no interval can fall inside the run.
- ``--compression-min-size 0``: every echo on a permessage-deflate connection is compressed.
  kosoku 0.1.0 hands an uncompressed message on a deflate connection to the case as ``str``,
  and the 12.x/13.x cases then fail with "Strings must be encoded before hashing" (ERROR);
  RFC 7692 allows such messages, so this works around the runner, not the server.
- ``--compression-level 1``: any level is conformant, and on the suite's text corpora level 1
  takes a fifth of the server CPU of zlib's default 6 (the level is the server's own choice;
  nothing is negotiated about it).

Speed: the 216 compression cases echo 1000 messages each and take nearly all of the run. Both
sides are CPU-bound and single-threaded (the server is one process; kosoku runs every case's
Python code, compression included, under one GIL), so ``WORKERS`` kosoku processes, each with
its own server, take cases from one shared queue, ``LANES`` cases at a time each. No case is
left out: the test asserts that all 517 ran. (Worker processes also keep kosoku 0.1.0's
occasional SIGABRT at interpreter exit, after its results are in, out of the pytest process.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from typing import NamedTuple

import pytest
from kosoku import FailureError, run_fuzzingclient
from kosoku.cases import CASES

from tests.servers import spawn_server

ALL_CASES = 517
WORKERS = 2
LANES = 2
SERVER_ARGS = (
    *("--rate-limit", "0", "--ping-interval", "0"),
    *("--compression-min-size", "0", "--compression-level", "1"),
    *("--log-level", "warning"),
)


class Outcome(NamedTuple):
    """What the test needs of a kosoku ``CaseResult`` (which cannot cross a process boundary)."""

    case_id: str
    behavior: str
    behavior_close: str
    passed: bool
    result: str
    result_close: str


def run_worker(url: str, todo: queue.Queue[str]) -> list[Outcome]:
    """In a worker process: run cases from ``todo`` against ``url``, ``LANES`` at a time, until none are left."""
    outcomes: list[Outcome] = []

    async def lane() -> None:
        while True:
            try:
                case_id = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results = await run_fuzzingclient(url, cases=[case_id])
            except FailureError as failure:  # the case did not pass: its result says why
                results = failure.results
            outcomes.extend(
                Outcome(r.case_id, r.behavior.value, r.behavior_close.value, r.passed, r.result, r.result_close)
                for r in results
            )

    async def lanes() -> None:
        await asyncio.gather(*(lane() for _ in range(LANES)))

    asyncio.run(lanes())
    return outcomes


def test_autobahn_testsuite_passes_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    case_ids = list(CASES)
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        urls = [stack.enter_context(spawn_server(*SERVER_ARGS)).url + "/echo" for _ in range(WORKERS)]
        todo = stack.enter_context(context.Manager()).Queue()
        for case_id in case_ids:
            todo.put(case_id)
        pool = stack.enter_context(ProcessPoolExecutor(WORKERS, mp_context=context))
        started = time.monotonic()
        results = [r for outcomes in pool.map(run_worker, urls, [todo] * WORKERS) for r in outcomes]
        elapsed = time.monotonic() - started

    behaviors = Counter(r.behavior for r in results)
    closes = Counter(r.behavior_close for r in results)
    summary = (
        f"autobahn (kosoku): {len(results)} cases in {elapsed:.0f}s "
        f"({WORKERS} workers x {LANES} lanes); "
        f"behavior {dict(sorted(behaviors.items()))}; close {dict(sorted(closes.items()))}"
    )
    with capsys.disabled():
        print("\n" + summary)

    not_passed = "\n".join(
        f"  {r.case_id}: {r.behavior} / {r.behavior_close}: {r.result} | {r.result_close}"
        for r in sorted(results, key=lambda r: [int(p) for p in r.case_id.split(".")])
        if not r.passed
    )
    assert len(results) == ALL_CASES and {r.case_id for r in results} == set(case_ids), summary
    assert behaviors["FAILED"] == 0 and behaviors["UNIMPLEMENTED"] == 0, f"{summary}\n{not_passed}"
    assert not not_passed, f"{summary}\n{not_passed}"
