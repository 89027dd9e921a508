"""Race peer ``socketify``: uWebSockets through socketify's CFFI binding, fanning out with uWS pub/sub.

Each member ``ws.subscribe(room)`` on open; a message is parsed, rebuilt and serialised once in Python, then
published to the room topic with uWS's ``WebSocket::publish`` (C API ``uws_ws_publish_with_options``), which sends
it to every subscriber but the sender, from C++. socketify 0.0.31's own ``WebSocket.publish(topic, message,
OpCode.TEXT)`` calls ``App.publish`` instead, which reaches the sender too, so this peer calls the C API that
socketify wraps (and left commented out there). socketify runs uWS's libuv loop from its own asyncio loop
(``App.run``). No compression, no idle timeout or pings, 16 MiB messages, 64 MiB backpressure per socket (uWS
drops messages over it), listen backlog raised from uSockets' fixed 512 to 4096.
"""

from __future__ import annotations

import os
import signal
import socket

from socketify import App, AppListenOptions, CompressOptions, OpCode, WebSocket
from socketify.native import lib
from socketify.socketify import AppRequest, AppResponse

from bench.peers._common import announce, outgoing, parse_args, route


def upgrade(res: AppResponse, req: AppRequest, socket_context: object) -> None:
    """Copy room and user out of the request (only valid in this callback) into the socket's user data."""
    target = route(req.get_full_url())
    if target is None:
        res.write_status(404).end("not found\n")
        return
    room, user = target
    res.upgrade(
        req.get_header("sec-websocket-key"),
        req.get_header("sec-websocket-protocol"),
        req.get_header("sec-websocket-extensions"),
        socket_context,
        (room, user, room.encode()),
    )


def publish_to_others(ws: WebSocket, topic: bytes, message: bytes) -> None:
    """uWS ``WebSocket::publish``: a text frame to every subscriber of ``topic`` except ``ws``."""
    lib.uws_ws_publish_with_options(ws.app.SSL, ws.ws, topic, len(topic), message, len(message), OpCode.TEXT, False)


def on_open(ws: WebSocket) -> None:
    _, _, topic = ws.get_user_data()
    ws.subscribe(topic)


def on_message(ws: WebSocket, message: str | bytes, opcode: OpCode) -> None:
    room, user, topic = ws.get_user_data()
    text = outgoing(room, user, message)
    if text is not None:
        publish_to_others(ws, topic, text.encode())


def on_close(ws: WebSocket, code: int, message: bytes | None) -> None:
    """Nothing to do (uWS unsubscribes a closed socket), but with a close handler socketify frees the user data."""


def widen_backlog(port: int, backlog: int = 4096) -> None:
    """Raise the listen backlog of our listening socket on ``port``: uSockets listens with a fixed 512.

    socketify exposes no file descriptor for it, so find it among the process's own; calling ``listen()`` again on
    a listening socket only changes its backlog (Linux).
    """
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue  # not a socket
        try:
            if (
                sock.type == socket.SOCK_STREAM
                and sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[1] == port
            ):
                sock.listen(backlog)
        finally:
            sock.detach()  # the descriptor stays uSockets'


def listening(host: str, port: int) -> None:
    widen_backlog(port)
    announce(host, port)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    app = App()
    behavior = {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 16 * 1024 * 1024,
        "idle_timeout": 0,
        "max_backpressure": 64 * 1024 * 1024,
        "send_pings_automatically": False,
        "upgrade": upgrade,
        "open": on_open,
        "message": on_message,
        "close": on_close,
    }
    app.ws("/chat", behavior)
    app.ws("/chat/*", behavior)
    app.any("/*", lambda res, req: res.write_status(404).end("not found\n"))
    app.listen(AppListenOptions(port=args.port, host=args.host), lambda config: listening(args.host, config.port))
    # SIGINT: socketify's run() installs its own handler (close the listening socket, stop the loop, exit).
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    app.run()


if __name__ == "__main__":
    main()
