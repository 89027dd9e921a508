"""The Locust ``RoomsUser`` (loadtest/rooms.py): one /ws socket in several rooms, every delivery counted.

A short headless run against a real server, as tests/test_loadtest.py does for ``ChatUser``: ~7 s of load
(spawn 1 s, settle 1 s, send 3 s, drain 2 s), the lateness limit loosened so a busy machine cannot make the
run invalid; nothing asserts on time.
"""

from __future__ import annotations

from tests.servers import spawn_server
from tests.test_loadtest import free_port, run_locust

ROOMS = ["RoomsUser", "-u", "40", "-r", "40", "--rooms-per-user", "5", "--room-size", "10", "--senders", "2"]


def test_rooms_users_receive_every_message_of_their_rooms_once_across_processes() -> None:
    """Two worker processes, each counting its own groups of rooms; the master sums them."""
    port = str(free_port())
    with spawn_server() as server:
        code, figures, output = run_locust(server.url, *ROOMS, "--processes", "2", "--master-bind-port", port,
                                           "--master-port", port)
    assert code == 0, output[-5000:]
    assert figures["chat_users"] == 40
    assert figures["missing_workers"] == 0
    assert figures["sent"] > 0
    assert figures["expected"] > figures["sent"]  # rooms of several members: most publishes reach several
    assert figures["received"] == figures["expected"]
    assert figures["lost"] == 0
    assert figures["out_of_order"] == 0
    assert figures["connect_failures"] == figures["unexpected_closes"] == figures["failures"] == 0
    assert " joined " in output  # the joined row: every socket joined its rooms on /ws


def test_refused_joins_fail_the_run() -> None:
    """A server that allows 3 rooms per connection refuses 2 of every RoomsUser's 5 joins: exit code 1."""
    with spawn_server("--max-rooms-per-connection", "3") as server:
        code, figures, output = run_locust(server.url, *ROOMS, "-u", "10", "-r", "10", "-t", "4s", "--settle", "0.5",
                                           "--drain", "1")
    assert code == 1, output[-5000:]
    assert figures["failures"] >= 10 * 2  # an error row for every refused join
    assert "error too_many_rooms" in output
    assert figures["lost"] == 0  # publishes go only to the rooms joined, and those are counted exactly
