"""The broadcast race: hubbub and other Python WebSocket servers, side by side, on the same fan-out workloads.

    python -m bench.race                  # every server, every workload, N=1000 and 5000, 3 rounds
    python -m bench.race --quick          # CI: every server, small rooms, one round, short windows
    python -m bench.race --servers hubbub,limit --workloads full --n 1000 --rounds 5
    python -m bench.race --servers hubbub,limit --workloads small,small-paced --small-n 3 --rounds 5
    python -m bench.race --servers hubbub --workloads rooms,multi --rounds 3   # one socket in 10 rooms

Every server speaks one contract (summed up in bench/peers/_common.py): the same routes and the same message,
built and serialised once per message. Each (round, server, workload) gets a fresh server process, pinned to one core
(``taskset -c``, when taskset exists and two CPUs are allowed), and a fresh load client process
(``bench.loadclient``) pinned to another, with the same parameters for every server. Rounds interleave (round
1 runs every server, then round 2...; each round starts one server further down the list), so slow drift in a
shared machine's load spreads over all servers instead of landing on one.

Workloads, with their default sizes (the load client, bench/loadclient.py, says how each figure is measured):

- ``full``: one room of N, one sender, as fast as a window of W messages allows; deliveries/s and server CPU
  microseconds per delivery (user and sys, from /proc/PID/stat over exactly the measurement window).
- ``small``: 8 rooms of N (3 and 20: keys ``small-3`` and ``small-20``), one sender in each, as fast as its own
  window of W allows; inbound messages/s (what the senders sent and the server fanned out, counted by what the
  receivers got) and server CPU per inbound message, besides deliveries/s. Most real rooms are small: there the
  cost per message read, not per recipient written, decides.
- ``rooms``: 100 rooms of 50, the first 5 members of each sending 2 messages/s; CPU per delivery, p50/p99 latency.
- ``multi``: the ``rooms`` workload (the same rooms, members, senders and rate, so the same deliveries/s) on
  hubbub's ``/ws`` protocol, each socket in 10 of the rooms (500 sockets, not 5000), messages spread over them;
  CPU per delivery beside ``rooms``'s, p50/p99 latency. hubbub only: no peer speaks /ws, so the race skips it for
  them (a line on stderr, no record).
- ``small-paced``: 200 rooms of 5, every member sending 2 messages/s; CPU per inbound message, p50/p99 latency.
- ``latency``: one room of 5000, one sender at 5 messages/s; p50/p99/max delivery latency.
- ``handshake``: 10,000 upgrades, 64 in flight; seconds.
- ``memory``: server RSS with 10,000 idle connections minus its RSS when empty, per connection; and its peak
  RSS (VmHWM from /proc/PID/status), with all 10,000 open.

Output: one JSON line per run appended to ``--results`` (with the machine, Python and library versions), a
Markdown table of medians over rounds with ratios to ``limit`` (the per-message-write floor every Python
server is measured against), a PNG chart of the full-speed figures. The exit status is 1 when any run lost or
duplicated a delivery, saw an unexpected close, or failed outright.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LISTENING = re.compile(r"listening on (ws://[^\s:]+:\d+)")

SERVERS: dict[str, list[str]] = {
    "hubbub": ["server.py", "--host", HOST, "--port", "0", "--store", "memory", "--rate-limit", "0",
               "--ping-interval", "0", "--max-connections", "30000", "--log-level", "warning"],
    "websockets_broadcast": ["-m", "bench.peers.websockets_broadcast", "--host", HOST, "--port", "0"],
    "websockets_loop": ["-m", "bench.peers.websockets_loop", "--host", HOST, "--port", "0"],
    "aiohttp": ["-m", "bench.peers.aiohttp_server", "--host", HOST, "--port", "0"],
    "picows": ["-m", "bench.peers.picows_server", "--host", HOST, "--port", "0"],
    "socketify": ["-m", "bench.peers.socketify_server", "--host", HOST, "--port", "0"],
    "limit": ["-m", "bench.peers.limit_server", "--host", HOST, "--port", "0"],
}
# Every race client connects from 127.0.0.1: hubbub's per-address connection limit (0 turns it off) would refuse
# most of them. A server ignores an environment variable it does not know.
ENVIRONMENT: dict[str, dict[str, str]] = {"hubbub": {"HUBBUB_MAX_CONNECTIONS_PER_ADDRESS": "0"}}
WORKLOADS = ("full", "small", "rooms", "multi", "small-paced", "latency", "handshake", "memory")
# Workloads only some servers speak: ``multi`` is on hubbub's /ws protocol (one socket, many rooms), which no peer
# has; the race skips it for the others (no run, no record, a line on stderr) rather than failing them.
ONLY: dict[str, frozenset[str]] = {"multi": frozenset({"hubbub"})}
LIBRARIES = ("websockets", "aiohttp", "picows", "socketify", "uvloop", "wsproto", "anyio", "matplotlib")
STOP_GRACE = 5.0  # seconds a server has to exit after SIGTERM (the contract asks for 2)

# Parameters of a full race and of --quick; an option given on the command line wins over both.
FULL = {
    "rounds": 3, "n": "1000,5000", "window": 64, "warmup": 1.0, "measure": 5.0, "drain": 15.0, "in_flight": 64,
    "small_n": "3,20", "small_rooms": 8,
    "rooms": 100, "room_size": 50, "senders": 5, "rate": 2.0, "rooms_per_socket": 10,
    "small_paced_rooms": 200, "small_paced_size": 5, "small_paced_rate": 2.0,
    "fanout": 5000, "fanout_rate": 5.0, "handshakes": 10000, "idle": 10000, "settle": 1.0,
}
QUICK = FULL | {
    "rounds": 1, "n": "100", "warmup": 0.1, "measure": 0.3, "drain": 5.0,
    "small_n": "3", "small_rooms": 4,
    "rooms": 10, "room_size": 10, "senders": 2, "rate": 10.0, "rooms_per_socket": 5,
    "small_paced_rooms": 20, "small_paced_size": 5, "small_paced_rate": 10.0,
    "fanout": 200, "fanout_rate": 20.0, "handshakes": 200, "idle": 200, "settle": 0.2,
}


@dataclass(frozen=True)
class Workload:
    """One column group of the race: a name, the load client's arguments, and how long it may take."""

    key: str  # "full-1000", "small-3", "rooms", "multi", "small-paced", "latency", "handshake", "memory"
    argv: tuple[str, ...]
    timeout: float

    def runs_on(self, server: str) -> bool:
        return server in ONLY.get(self.key, (server,))


def workloads(args: argparse.Namespace) -> list[Workload]:
    """The selected workloads, with the load client's command line for each."""
    timed = ("--warmup", str(args.warmup), "--measure", str(args.measure), "--drain", str(args.drain))
    timed_s = args.warmup + args.measure + args.drain
    chosen: list[Workload] = []
    for name in args.workloads:
        if name == "full":
            chosen += [Workload(f"full-{n}", ("full", "--n", str(n), "--window", str(args.window), *timed),
                                60 + n / 50 + timed_s) for n in args.n]
        elif name == "small":
            chosen += [Workload(f"small-{n}", ("full", "--rooms", str(args.small_rooms), "--n", str(n),
                                               "--window", str(args.window), *timed),
                                60 + args.small_rooms * n / 50 + timed_s) for n in args.small_n]
        elif name == "rooms":
            members = args.rooms * args.room_size
            chosen.append(Workload("rooms", (
                "paced", "--rooms", str(args.rooms), "--members", str(args.room_size),
                "--senders", str(args.senders), "--rate", str(args.rate), *timed), 60 + members / 50 + timed_s))
        elif name == "multi":  # the rooms workload's rooms, members, senders and rate, on /ws sockets in many rooms
            members = args.rooms * args.room_size
            chosen.append(Workload("multi", (
                "multi", "--rooms", str(args.rooms), "--members", str(args.room_size),
                "--per-client", str(args.rooms_per_socket), "--senders", str(args.senders), "--rate", str(args.rate),
                *timed), 60 + members / 50 + timed_s))
        elif name == "small-paced":
            members = args.small_paced_rooms * args.small_paced_size
            chosen.append(Workload("small-paced", (
                "paced", "--rooms", str(args.small_paced_rooms), "--members", str(args.small_paced_size),
                "--senders", str(args.small_paced_size), "--rate", str(args.small_paced_rate), *timed),
                60 + members / 50 + timed_s))
        elif name == "latency":
            chosen.append(Workload("latency", (
                "paced", "--rooms", "1", "--members", str(args.fanout), "--senders", "1",
                "--rate", str(args.fanout_rate), *timed), 60 + args.fanout / 50 + timed_s))
        elif name == "handshake":
            chosen.append(Workload("handshake", ("handshake", "--count", str(args.handshakes)),
                                   60 + args.handshakes / 50))
        elif name == "memory":
            chosen.append(Workload("memory", ("memory", "--count", str(args.idle), "--settle", str(args.settle)),
                                   60 + args.idle / 50 + 2 * args.settle))
    return chosen


def pinning() -> tuple[int, int] | None:
    """(server CPU, client CPU): the first two CPUs this process may use, when taskset exists and there are two."""
    allowed = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(allowed) < 2:
        return None
    return allowed[0], allowed[1]


def pinned(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


@dataclass
class Server:
    """A server process under test: where it listens and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    stop_s: float | None = None  # seconds from SIGTERM to exit
    killed: bool = False  # it did not exit within the grace period: SIGKILL

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def server_process(name: str, cpu: int | None, logdir: Path, timeout: float = 30.0) -> Iterator[Server]:
    """Start server ``name`` (pinned to ``cpu``), wait for its listening line, and SIGTERM it afterwards.

    Its stdout and stderr go to a file, not a pipe: a server that logs a lot must never block on a full pipe.
    """
    log = logdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*pinned(cpu), sys.executable, *SERVERS[name]], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **ENVIRONMENT.get(name, {})},
        )
    server = Server(name, process, "", log)
    try:
        deadline = time.monotonic() + timeout
        while not (found := LISTENING.search(log.read_text(errors="replace"))):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode} before listening:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} printed no listening line in {timeout} s:\n{server.log_tail()}")
            time.sleep(0.02)
        server.url = found.group(1)
        yield server
    finally:
        if process.poll() is None:
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                server.killed = True
                process.kill()
                process.wait()
            server.stop_s = round(time.monotonic() - started, 3)


def run_once(name: str, workload: Workload, pins: tuple[int, int] | None, in_flight: int,
             logdir: Path) -> dict[str, Any]:
    """One server process, one load client process, one workload: the client's figures and what went wrong."""
    server_cpu, client_cpu = pins if pins else (None, None)
    record: dict[str, Any] = {"server": name, "workload": workload.key, "failure": None}
    try:
        with server_process(name, server_cpu, logdir) as server:
            command = [*pinned(client_cpu), sys.executable, "-m", "bench.loadclient", "--url", server.url,
                       "--pid", str(server.process.pid), "--in-flight", str(in_flight), *workload.argv]
            record["failure"] = run_client(command, workload.timeout, record)
            if server.process.poll() is not None:
                record["failure"] = f"the server exited with {server.process.returncode} during the run"
    except RuntimeError as exc:  # it never started listening
        record["failure"] = str(exc)
        return record
    record |= {"server_exit": server.process.returncode, "server_stop_s": server.stop_s,
               "server_killed": server.killed}
    if record["failure"] or "Traceback" in server.log.read_text(errors="replace"):
        record["server_log"] = server.log_tail()
    return record


def run_client(command: list[str], timeout: float, record: dict[str, Any]) -> str | None:
    """Run the load client; put its result (and any stderr) in ``record``; what failed, or None."""
    try:
        client = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the load client did not finish in {timeout:.0f} s"
    if client.stderr.strip():
        record["client_stderr"] = client.stderr[-2000:]
    try:
        record["result"] = result = json.loads(client.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return f"the load client exited {client.returncode} without a result"
    if not result["ok"]:
        return failure_of(result)
    if result.get("received") == 0 or result.get("deliveries") == 0:
        return "nothing was delivered" + (" in the measurement window" if result.get("received") else "")
    return None


def failure_of(result: dict[str, Any]) -> str:
    """What made the client call a run failed, in one line."""
    parts = []
    for key in ("lost", "extra", "out_of_order", "misrouted", "unexpected_closes"):
        if result.get(key):
            parts.append(f"{key.replace('_', ' ')} {result[key]}")
    if result.get("unexpected_close_reasons"):
        parts.append(", ".join(f"{why} x{count}" for why, count in result["unexpected_close_reasons"].items()))
    parts += result.get("errors", [])
    return "; ".join(parts) or "failed"


def environment() -> dict[str, Any]:
    """The machine, Python and library versions, written into every result line."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    versions: dict[str, str | None] = {}
    for library in LIBRARIES:
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            versions[library] = None
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "hubbub", "server.py"],
                           capture_output=True, text=True).stdout.strip()
    versions["hubbub"] = f"{commit}{'+dirty' if dirty else ''}" if commit else None
    return {
        "machine": {"platform": platform.platform(), "cpu": model, "cpus": os.cpu_count(),
                    "allowed_cpus": len(os.sched_getaffinity(0))},
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.race", description=__doc__.split("\n\n")[0],
        epilog="Defaults are those of a full race; --quick changes them (shown in brackets) unless given.",
    )

    def option(flag: str, kind: type, what: str) -> None:
        key = flag[2:].replace("-", "_")
        parser.add_argument(flag, type=kind, default=None, help=f"{what} (default {FULL[key]} [{QUICK[key]}])")

    parser.add_argument("--quick", action="store_true", help="the CI race: small rooms, one round, short windows")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated, from: " + ", ".join(WORKLOADS))
    option("--n", str, "full speed: room sizes, comma-separated")
    option("--rounds", int, "rounds; every server runs every workload once per round")
    option("--window", int, "full speed: messages in flight to the slowest receiver")
    option("--warmup", float, "seconds of sending before each measurement window")
    option("--measure", float, "seconds of each measurement window")
    option("--drain", float, "seconds allowed for the last deliveries to arrive")
    option("--in-flight", int, "handshakes at a time while connecting")
    option("--small-n", str, "small workload: room sizes, comma-separated")
    option("--small-rooms", int, "small workload: rooms in parallel, each with one sender and its own window")
    option("--rooms", int, "rooms workload: rooms")
    option("--room-size", int, "rooms workload: members per room")
    option("--senders", int, "rooms workload: senders per room")
    option("--rate", float, "rooms workload: messages/s per sender")
    option("--rooms-per-socket", int, "multi workload (the rooms workload on hubbub's /ws): rooms each socket joins")
    option("--small-paced-rooms", int, "small-paced workload: rooms")
    option("--small-paced-size", int, "small-paced workload: members per room, every one a sender")
    option("--small-paced-rate", float, "small-paced workload: messages/s per member")
    option("--fanout", int, "latency workload: members of the one room")
    option("--fanout-rate", float, "latency workload: messages/s of its one sender")
    option("--handshakes", int, "handshake workload: connections")
    option("--idle", int, "memory workload: idle connections")
    option("--settle", float, "memory workload: seconds before each RSS reading")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "race.jsonl",
                        help="JSON lines appended here, one per run (default bench/results/race.jsonl)")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench" / "results" / "race.png",
                        help="the PNG chart of the full-speed figures (default bench/results/race.png)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the client to CPUs")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    args.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    args.n = [int(n) for n in str(args.n).split(",")]
    args.small_n = [int(n) for n in str(args.small_n).split(",")]
    unknown = [name for name in args.servers if name not in SERVERS]
    unknown += [name for name in args.workloads if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown server or workload: {', '.join(unknown)}")
    if not args.servers or not args.workloads or not args.n or not args.small_n:
        parser.error("no server, workload or room size to race")
    if min(args.n + args.small_n) < 2:
        parser.error("a room needs at least 2 members: a sender and a receiver")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers and the client
    pins = None if args.no_pin else pinning()
    chosen = workloads(args)
    env = environment()
    # Every server runs from bytecode, as an installed package does (pip compiles what it installs): with
    # PYTHONDONTWRITEBYTECODE set, hubbub and the peers in bench/ would otherwise be compiled from source at
    # every start, which costs the bigger code base start-up time and several MB of peak RSS.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "hubbub"), str(ROOT / "bench")], check=True)
    race_id = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    settings = {key: getattr(args, key) for key in FULL}
    print(f"race {race_id}: {', '.join(args.servers)} x {', '.join(w.key for w in chosen)}, {args.rounds} round(s); "
          + (f"servers on CPU {pins[0]}, the client on CPU {pins[1]}" if pins else "not pinned"), file=sys.stderr)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="race-") as logdir, open(args.results, "a") as results:
        for round_ in range(args.rounds):
            shift = round_ % len(args.servers)
            for name in args.servers[shift:] + args.servers[:shift]:
                for workload in chosen:
                    if not workload.runs_on(name):
                        if round_ == 0:
                            print(f"{name} skips {workload.key}: it speaks only v1 /chat/ROOM", file=sys.stderr)
                        continue
                    record = {"race": race_id, "time": datetime.now(UTC).isoformat(timespec="seconds"),
                              "round": round_ + 1, "quick": args.quick, "settings": settings,
                              "pinned": {"server_cpu": pins[0], "client_cpu": pins[1]} if pins else None,
                              "loadavg": os.getloadavg(), **env}
                    record |= run_once(name, workload, pins, args.in_flight, Path(logdir))
                    records.append(record)
                    results.write(json.dumps(record) + "\n")
                    results.flush()
                    print(report.progress(record), file=sys.stderr)
    print("\n" + report.render(records))
    drawn = report.draw_chart(records, args.chart)
    print(f"\nresults appended to {args.results}" + (f"; chart in {args.chart}" if drawn else ""), file=sys.stderr)
    return 1 if any(record["failure"] for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
