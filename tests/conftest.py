"""Fixtures: real hubbub servers on both anyio backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import pytest
from anyio.from_thread import start_blocking_portal

import server as shell_module


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
