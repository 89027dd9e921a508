"""Fixtures: real hubbub servers on both anyio backends; the hardening tests' measured figures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import pytest
from anyio.from_thread import start_blocking_portal

from hubbub import server as shell_module

# (test id, outcome, figures) of every test that recorded figures, in the order they ran
FIGURES: list[tuple[str, str, list[str]]] = []


@dataclass
class InProcessServer:
    """A real server on a real socket, run by a portal thread in this process."""

    port: int
    backend: str
    shell: shell_module.Shell

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def start_in_process(backend: str, *flags: str) -> Iterator[InProcessServer]:
    # the memory store unless a test asks for another: test servers must not share ./hubbub.db
    args = shell_module.build_parser().parse_args(["--port", "0", "--backend", backend, "--store", "memory", *flags])
    with start_blocking_portal(backend) as portal:
        future, (shell, port) = portal.start_task(partial(shell_module.serve, args, handle_signals=False))
        try:
            yield InProcessServer(port, backend, shell)
        finally:
            portal.call(shell.shutdown, 0.5)
            future.result(timeout=10)


@pytest.fixture
def hubbub(backend: str) -> Iterator[InProcessServer]:
    """hubbub with default settings, in this process, on each anyio backend."""
    yield from start_in_process(backend)


@pytest.fixture
def figure(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """Record one measured figure of this test (RSS growth, messages lost, ...): it goes into the
    test report's properties (JUnit XML too) and into the "hardening figures" block printed at the end."""

    def record(text: str) -> None:
        record_property("figure", text)

    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the figures of each test's call phase, in the order the tests ran."""
    figures = [str(value) for name, value in report.user_properties if name == "figure"]
    if report.when == "call" and figures:
        outcome = "xfail" if hasattr(report, "wasxfail") else report.outcome
        FIGURES.append((report.nodeid, outcome, figures))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print every recorded figure as one block, so a CI log shows what each hardening test measured."""
    if not FIGURES:
        return
    terminalreporter.write_line("hardening figures:")
    for nodeid, outcome, figures in FIGURES:
        mark = "" if outcome == "passed" else f" [{outcome}]"
        terminalreporter.write_line(f"  {nodeid}{mark}: {'; '.join(figures)}")
