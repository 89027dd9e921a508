"""hubbub: a real-time WebSocket server (chat rooms, presence, fan-out) on a sans-io core.

- ``hubbub.core``: the sans-io core (bytes and the time in, bytes and effects out); any event loop can drive it.
- ``hubbub.server``: the anyio shell and the command line (``hubbub``, ``python -m hubbub``).
- ``hubbub.handlers``: the routes, written against the core's handler API.
- ``hubbub.backends``: the broker, store, auth and metrics the shell plugs in.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hubbub")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+checkout"
