"""hubbub: a real-time WebSocket server (chat rooms, presence, fan-out) on a sans-io core.

- ``hubbub.core``: the sans-io core (bytes and the time in, bytes and effects out); any event loop can drive it.
- ``hubbub.server``: the anyio shell and the command line (``hubbub``, ``python -m hubbub``).
- ``hubbub.handlers``: the routes, written against the core's handler API.
- ``hubbub.backends``: the broker, store, auth and metrics the shell plugs in.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``hubbub.__version__``, read from the installed metadata only when asked: importlib.metadata
    costs every server process several MB of memory (its email parser) for a string it rarely needs."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hubbub")
        except PackageNotFoundError:  # run from a checkout that was never installed
            return "0+checkout"
    raise AttributeError(f"module 'hubbub' has no attribute {name!r}")
