"""The shell's timer over a real socket: a connection that never sends a byte is dropped at
``--handshake-timeout`` even while the only other deadline is far away (a keepalive ping)."""

from __future__ import annotations

import socket
import time

from websockets.sync.client import connect

from tests.servers import spawn_server


def test_a_silent_connection_is_dropped_at_the_handshake_timeout_while_the_timer_sleeps_long() -> None:
    # alice's next keepalive ping (30 s) is the only deadline: the timer task sleeps until then
    with spawn_server("--handshake-timeout", "0.5", "--ping-interval", "30") as server, \
            connect(f"{server.url}/chat?user=alice"):
        time.sleep(1.5)  # past the handshakes' deadlines: only the ping is left
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # TCP only, never a byte
        started = time.monotonic()
        try:
            assert silent.recv(1024) == b""  # closed by the server; a timeout here fails the test
        except ConnectionResetError:
            pass
        finally:
            silent.close()
        assert time.monotonic() - started < 9.0  # the handshake timeout, not alice's ping 30 s away
