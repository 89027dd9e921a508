"""The race's report: per-run progress lines, medians over rounds, the Markdown table and the notes under it.

Works on the race's run records (the JSON lines ``bench.race`` appends to its results file), so the report of
any race can be printed again from that file, e.g. after a change to the report itself::

    python -m bench.report                          # the last race in bench/results/race.jsonl
    python -m bench.report FILE --race 2026-12-01T02:43:33Z
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import chart

BASELINE = "limit"  # the per-message-write floor: ratios are to its figures
CONTENDED = 0.10  # a run whose server or client waited this fraction of the window for a CPU was disturbed
LATE = 0.01  # a paced run with more than this fraction of late sends measured a client that fell behind
BUSY = 0.9  # the fraction of the window a side that set the pace was running or waiting for a CPU
EXIT_WITHIN = 2.0  # seconds the contract gives a server to exit after SIGTERM
WIDTH = 120  # columns of the prose around the table


@dataclass
class Standing:
    """One server's row: medians per workload over its successful rounds, and everything that went wrong."""

    medians: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: Counter[str] = field(default_factory=Counter)
    lost: int = 0  # deliveries lost or duplicated, over every run
    closes: int = 0  # unexpected closes, over every run
    failures: list[str] = field(default_factory=list)
    saturated: dict[str, list[float]] = field(default_factory=dict)  # workload -> server busy in each such run
    contended: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    slow_exits: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)  # runs that passed, but the server logged a traceback
    paced_by_window: list[str] = field(default_factory=list)  # full speed, and neither side was busy


def median_figures(results: list[dict[str, Any]]) -> dict[str, float]:
    """The median of every numeric figure the results share (booleans, lists and None left out).

    Server CPU per unit is the exception: its total, user and sys all come from the run with the median total
    (the lower one of two), so that the split shown always adds up to the total its ratio is computed from.
    """
    keys = set.intersection(*(set(result) for result in results))
    medians = {}
    for key in keys:
        values = [result[key] for result in results]
        if all(isinstance(value, int | float) and not isinstance(value, bool) for value in values):
            medians[key] = statistics.median(values)
    for key in [key for key in medians if key.startswith("server_us_per_")]:
        middle = sorted(results, key=lambda result: result[key])[(len(results) - 1) // 2]
        unit = key.removeprefix("server_us_per_")
        for part in (key, f"server_user_us_per_{unit}", f"server_sys_us_per_{unit}"):
            medians[part] = middle[part]
    return medians


def summarize(records: list[dict[str, Any]]) -> dict[str, Standing]:
    """Each server's standing, from the run records of a race."""
    standings: dict[str, Standing] = {}
    good: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        standing = standings.setdefault(record["server"], Standing())
        key = record["workload"]
        standing.runs[key] += 1
        result = record.get("result", {})
        standing.lost += result.get("lost", 0) + result.get("extra", 0)
        standing.closes += result.get("unexpected_closes", 0)
        if record["failure"]:
            standing.failures.append(f"round {record['round']} {key}: {record['failure']}")
        else:
            good.setdefault((record["server"], key), []).append(result)
            if record.get("server_log"):
                standing.tracebacks.append(key)
        if "server_cpu_util" in result:
            busy = result["server_cpu_util"] + result["server_run_queue_wait"]
            if result["client_saturated"]:  # was the server busy all the same? then it still set the pace
                standing.saturated.setdefault(key, []).append(busy)
            elif pipelined(key) and busy < BUSY:
                standing.paced_by_window.append(key)
        if max(result.get("server_run_queue_wait", 0), result.get("client_run_queue_wait", 0)) > CONTENDED:
            standing.contended.append(key)
        if result.get("late_sends", 0) > LATE * result.get("messages_sent", 0):
            standing.late.append(key)
        if record.get("server_killed") or (record.get("server_stop_s") or 0) > EXIT_WITHIN:
            standing.slow_exits.append(key)
    for (name, key), results in good.items():
        standings[name].medians[key] = median_figures(results)
    return standings


def pipelined(key: str) -> bool:
    """Whether a workload's senders send as fast as a window allows (``full-N``, ``small-N``), not on a schedule."""
    return key.startswith("full-") or key.removeprefix("small-").isdigit()


def ratio(value: float | None, base: float | None) -> str:
    """`` 0.61x``: ``value`` as a multiple of the baseline's, or nothing without one."""
    return f" {value / base:.2f}x" if value is not None and base else ""


def counted(keys: list[str]) -> str:
    """``full-5000 (2), rooms``: the workloads a note is about, with the number of rounds when more than one."""
    return ", ".join(f"{key} ({count})" if count > 1 else key for key, count in Counter(keys).items())


def columns(key: str) -> list[str]:
    """The table's column headers for one workload."""
    if key.startswith("full-"):
        n = key.removeprefix("full-")
        return [f"N={n} deliv/s", f"N={n} µs/deliv u+s"]
    if pipelined(key):
        return [f"{key} in msg/s", f"{key} µs/in u+s"]
    return {
        "rooms": ["rooms µs/deliv u+s", "rooms p50/p99 ms"],
        "multi": ["multi µs/deliv u+s", "multi p50/p99 ms"],
        "small-paced": ["small-paced µs/in u+s", "small-paced p50/p99 ms"],
        "latency": ["fan-out p50/p99/max ms"],
        "handshake": ["handshakes s (µs)"],
        "memory": ["KB/conn", "peak MB"],
    }[key]


def cells(key: str, figures: dict[str, float] | None, base: dict[str, float]) -> list[str]:
    """One server's cells for one workload: its medians, and ratios to the baseline's where they mean something."""
    if figures is None:
        return ["FAIL"] * len(columns(key))

    def cpu(unit: str) -> str:
        split = f"{figures[f'server_user_us_per_{unit}']:.2f}+{figures[f'server_sys_us_per_{unit}']:.2f}"
        return split + ratio(figures[f"server_us_per_{unit}"], base.get(f"server_us_per_{unit}"))

    def rate(name: str) -> str:
        return chart.compact(figures[name]) + ratio(figures[name], base.get(name))

    def latency() -> str:
        return f"{figures['latency_p50_ms']:.1f}/{figures['latency_p99_ms']:.1f}"

    if key.startswith("full-"):
        return [rate("deliveries_per_s"), cpu("delivery")]
    if pipelined(key):
        return [rate("inbound_per_s"), cpu("inbound")]
    if key in ("rooms", "multi"):
        return [cpu("delivery"), latency()]
    if key == "small-paced":
        return [cpu("inbound"), latency()]
    if key == "latency":
        return [f"{latency()}/{figures['latency_max_ms']:.1f}"]
    if key == "handshake":
        return [f"{figures['seconds']:.2f} ({figures['server_us_per_handshake']:.0f})"]
    return [f"{figures['kb_per_connection']:.1f}", f"{figures['server_peak_rss_kb'] / 1024:.0f}"]


def table(standings: dict[str, Standing], servers: list[str], keys: list[str]) -> str:
    """The race table in Markdown, padded so that it also reads well in a terminal."""
    base = standings[BASELINE].medians if BASELINE in standings else {}
    header = ["server", *(column for key in keys for column in columns(key)), "lost", "client-saturated"]
    rows = []
    for name in servers:
        if (standing := standings.get(name)) is None:
            continue
        lost = str(standing.lost) + (f" ({standing.closes} closed)" if standing.closes else "")
        saturated = [f"{key} {len(busy)}/{standing.runs[key]} ({statistics.median(busy):.0%})"
                     for key, busy in standing.saturated.items()]
        rows.append([name, *(cell for key in keys for cell in (
                         cells(key, standing.medians.get(key), base.get(key, {})) if standing.runs[key]
                         else ["-"] * len(columns(key)))),  # a workload it does not speak (multi: /ws)
                     lost + (" FAIL" if standing.failures else ""), ", ".join(saturated) or "-"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        padded = (cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                  enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (width + 1) + (":" if i else "-") for i, width in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def legend(settings: dict[str, Any], keys: list[str]) -> str:
    """What the table's columns are, with this race's parameters: a sentence for each workload it ran."""
    ran = {"full" if key.startswith("full-") else "small" if pipelined(key) else key for key in keys}
    sentences = {  # only those of workloads that ran: a race's settings may predate a workload
        "full": lambda: f"deliv/s: deliveries per second at full speed (one room of N, one sender, window "
                        f"{settings['window']}).",
        "small": lambda: f"small-N: {settings['small_rooms']} rooms of N at full speed, one sender each, window "
                         f"{settings['window']} each; in msg/s: inbound messages per second, the messages the server "
                         "read from senders and fanned out (deliveries / (N - 1)).",
        "rooms": lambda: f"rooms: {settings['rooms']} rooms of {settings['room_size']}, {settings['senders']} senders "
                         f"each at {settings['rate']:g} messages/s.",
        "multi": lambda: f"multi: the rooms workload on hubbub's /ws, each socket in {settings['rooms_per_socket']} of "
                         f"the rooms ({settings['rooms'] * settings['room_size'] // settings['rooms_per_socket']} "
                         "sockets), messages spread over them; hubbub only (no peer speaks /ws).",
        "small-paced": lambda: f"small-paced: {settings['small_paced_rooms']} rooms of "
                               f"{settings['small_paced_size']}, every member sending "
                               f"{settings['small_paced_rate']:g} messages/s.",
        "latency": lambda: f"fan-out: one room of {settings['fanout']}, one sender at {settings['fanout_rate']:g} "
                           "messages/s.",
        "handshake": lambda: f"handshakes: {settings['handshakes']} upgrades, {settings['in_flight']} in flight, "
                             "seconds (server CPU µs each).",
        "memory": lambda: f"KB/conn: (RSS with {settings['idle']} idle connections - RSS empty) / {settings['idle']}; "
                          f"peak MB: the server's peak RSS (VmHWM, MiB), all {settings['idle']} open.",
    }
    paragraphs = [" ".join(sentence() for name, sentence in sentences.items() if name in ran)]
    if ran & {"full", "small", "rooms", "multi", "small-paced"}:
        paragraphs.insert(0, f"u+s: server CPU microseconds, user+sys, from /proc/PID/stat over the "
                             f"{settings['measure']} s window, per delivery (µs/deliv) or per inbound message "
                             f"(µs/in). Nx: N times {BASELINE}'s figure.")
    if ran & {"rooms", "multi", "small-paced", "latency"}:
        paragraphs.append("p50/p99: delivery latency, receive minus send time, one clock (the client's).")
    paragraphs.append(
        "lost: deliveries lost or duplicated, every run. client-saturated: runs where the client was busy (running or "
        f"waiting for a CPU) over {BUSY:.0%} of the window, and how busy the server was meanwhile (near 100%: the "
        "server still set the pace)."
    )
    return "\n".join(textwrap.fill(paragraph, WIDTH) for paragraph in paragraphs)


MULTI_TARGET = 1.15  # issue 14: CPU per delivery with 10 rooms per socket, at most this times one room per socket


def multi_ratio(standing: Standing) -> float | None:
    """A server's median CPU per delivery in ``multi`` over its median in ``rooms`` (same run), if it ran both."""
    multi, rooms = standing.medians.get("multi"), standing.medians.get("rooms")
    if not multi or not rooms or not rooms.get("server_us_per_delivery"):
        return None
    return multi["server_us_per_delivery"] / rooms["server_us_per_delivery"]


def notes(standings: dict[str, Standing], servers: list[str]) -> list[str]:
    """What to know before believing the table: failures, disturbed runs, a paced client that fell behind."""
    ranked = [(name, standings[name]) for name in servers if name in standings]
    lines = [f"- {name} FAILED {failure}" for name, standing in ranked for failure in standing.failures]
    for name, standing in ranked:
        if (multi := multi_ratio(standing)) is not None:
            per = [standing.medians[key]["server_us_per_delivery"] for key in ("multi", "rooms")]
            lines.append(f"- {name} multi/rooms server CPU per delivery: {per[0]:.2f} / {per[1]:.2f} µs = {multi:.2f}x "
                         f"({'within' if multi <= MULTI_TARGET else 'over'} the {MULTI_TARGET}x target)")
    for what, runs in (
        (f"server or client waited over {CONTENDED:.0%} of the window for a CPU something else had (another "
         "process or kernel threads)", {name: standing.contended for name, standing in ranked}),
        (f"the client sent over {LATE:.0%} of the paced messages late (it fell behind its schedule)",
         {name: standing.late for name, standing in ranked}),
        (f"neither the server nor the client was busy {BUSY:.0%} of the time: the window's round trip set the pace",
         {name: standing.paced_by_window for name, standing in ranked}),
        ("the server logged a traceback (see its JSON lines), yet the run passed",
         {name: standing.tracebacks for name, standing in ranked}),
        (f"the server took over {EXIT_WITHIN:.0f} s to exit after SIGTERM, or was killed",
         {name: standing.slow_exits for name, standing in ranked}),
    ):
        if any(runs.values()):
            which = "; ".join(f"{name} {counted(keys)}" for name, keys in runs.items() if keys)
            lines.append(textwrap.fill(f"- {what}: {which}", WIDTH, subsequent_indent="  "))
    return lines


def render(records: list[dict[str, Any]]) -> str:
    """The whole report of one race: a heading, the table, its legend, the notes."""
    first = records[0]
    servers = ordered_servers(records)
    keys = list(dict.fromkeys(record["workload"] for record in records))
    standings = summarize(records)
    loads = sorted(record["loadavg"][0] for record in records)
    heading = (f"Race {first['race']}: medians of {rounds_of(records)} round(s); "
               f"{'server and client pinned to one CPU each' if first['pinned'] else 'not pinned'}; "
               f"{first['python']}; {first['machine']['cpu']} ({first['machine']['cpus']} CPUs); "
               f"load average {loads[0]:.1f} to {loads[-1]:.1f} during the race.")
    parts = [heading, table(standings, servers, keys), legend(first["settings"], keys)]
    if lines := notes(standings, servers):
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def draw_chart(records: list[dict[str, Any]], path: Path) -> bool:
    """Draw the chart of one race's full-speed medians to ``path``; False (and nothing drawn) if it had none."""
    standings = summarize(records)
    points = [chart.Point(name, int(key.removeprefix("full-")), figures["deliveries_per_s"],
                          figures["server_user_us_per_delivery"], figures["server_sys_us_per_delivery"])
              for name in ordered_servers(records) for key, figures in standings[name].medians.items()
              if key.startswith("full-")]
    if not points:
        return False
    first = records[0]
    chart.draw(points, path, f"hubbub broadcast race {first['race']}, medians of {rounds_of(records)} round(s), "
                             f"{first['python']}, {first['machine']['cpus']} CPUs"
                             + (", server and client pinned to one core each" if first["pinned"] else ""))
    return True


def ordered_servers(records: list[dict[str, Any]]) -> list[str]:
    """The servers in the order the race was given them (the order of its first round)."""
    return list(dict.fromkeys(record["server"] for record in sorted(records, key=lambda record: record["round"])))


def rounds_of(records: list[dict[str, Any]]) -> int:
    return max(record["round"] for record in records)


def progress(record: dict[str, Any]) -> str:
    """One line per run while the race goes on."""
    result = record.get("result", {})
    figures = []
    if "deliveries_per_s" in result:
        figures.append(f"{chart.compact(result['deliveries_per_s'])} deliveries/s")
    if result.get("server_us_per_delivery") is not None:
        figures.append(f"{result['server_us_per_delivery']:.2f} µs/delivery")
    if pipelined(record["workload"]) and "inbound_per_s" in result:
        figures.append(f"{chart.compact(result['inbound_per_s'])} inbound/s")
    if record["workload"].startswith("small") and result.get("server_us_per_inbound") is not None:
        figures.append(f"{result['server_us_per_inbound']:.2f} µs/inbound")
    if "latency_p99_ms" in result:
        figures.append(f"p50 {result['latency_p50_ms']:.1f} p99 {result['latency_p99_ms']:.1f} ms")
    if "seconds" in result:
        figures.append(f"{result['seconds']:.2f} s")
    if "kb_per_connection" in result:
        figures.append(f"{result['kb_per_connection']:.1f} KB/conn, peak {result['server_peak_rss_kb'] / 1024:.0f} MB")
    if "client_cpu_util" in result:
        figures.append(f"server {result['server_cpu_util']:.0%} client {result['client_cpu_util']:.0%} CPU")
    status = f"FAILED: {record['failure']}" if record["failure"] else f"lost {result.get('lost', 0)}"
    return f"round {record['round']} {record['server']:<21} {record['workload']:<10} {', '.join(figures)}; {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="Print a race's report again.")
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).parent / "results" / "race.jsonl",
                        help="a results file of bench.race (default bench/results/race.jsonl)")
    parser.add_argument("--race", help="which race: its id, the time it started (default: the last in the file)")
    parser.add_argument("--chart", type=Path, help="also draw its chart (PNG) here")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    race = args.race or records[-1]["race"]
    chosen = [record for record in records if record["race"] == race]
    if not chosen:
        parser.error(f"no race {race} in {args.results}")
    print(render(chosen))
    if args.chart is not None and draw_chart(chosen, args.chart):
        print(f"\nchart in {args.chart}", file=sys.stderr)
    return 1 if any(record["failure"] for record in chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
