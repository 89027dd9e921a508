"""``/hubbub.js``, the JavaScript client, driven directly in headless Chromium and in Node.

A page of another origin imports the module from a real ``server.py``
(``import("http://127.0.0.1:PORT/hubbub.js")`` from ``http://localhost:PORT``: a cross-origin
module import, so the route's CORS header is needed; its sockets go to ``/ws`` of the page's own
origin, as the server's Origin check wants) and runs clients in it through a small harness
(``HARNESS``): every status, error, message (with how it came), presence state and ``joined``
reply is recorded in the page, and every frame each socket sends is recorded by Playwright. The
tests: two rooms on one socket, publishes acked with ``{id, ts}``, ``not_joined``, presence kept
from diffs (one meta per connection), a callback that throws; a server restart mid-conversation
(``/api/publish`` into one room, rejoin with ``since``, a publish in flight sent again with its
key, one written while down sent once, nothing lost or doubled); a token function asked again
before expiry and on reconnect. In Node: two clients; a scripted ``/ws`` that recovers and one
that cannot; a socket that never opens; 60 rooms through a restart under the server's rate limit.

Every wait gives up after ``GIVE_UP_MS`` with a message (``Harness.js`` races each evaluate
against it: ``page.evaluate`` alone would wait forever for a Promise that never settles, which is
how an earlier run hung); none is a speed check.

Browser skipped only when no Chromium (or no Playwright) is installed *and* ``CI`` is unset (see
``tests/browser.py``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.browser import GIVE_UP_MS, chromium
from tests.servers import ROOT, RunningServer, spawn_server

MODULE = ROOT / "hubbub" / "handlers" / "static" / "hubbub.js"
API_KEY = "k" * 32

HARNESS = """
async (base) => {
  const mod = await import(base + "/hubbub.js");
  const H = window.H = { mod, clients: {}, rooms: {}, hold: {} };
  // a client named `name` for user `user`; its backoff is 200 ms unless H.hold[name] is set
  H.start = (name, user, options = {}) => {
    const rec = { status: [], errors: [], tokens: 0 };
    // "/ws": the page's own origin (localhost), as the server's Origin check wants; the module came
    // from 127.0.0.1. A relative URL also checks that the client resolves it against the page.
    const client = mod.connect("/ws", {
      params: { user },
      onStatus: (s) => rec.status.push(s.state),
      onError: (e) => rec.errors.push(e.code),
      backoff: () => (H.hold[name] ? 3600000 : 200),
      ...options,
    });
    H.clients[name] = { client, rec };
    return client.status.state;
  };
  H.join = async (name, room, options = {}) => {
    const { client } = H.clients[name];
    const rec = H.rooms[name + "/" + room] = { messages: [], presence: null, joined: [], left: [] };
    const handle = client.join(room, {
      onMessage: (m, info) => rec.messages.push({ id: m.id, user: m.user, data: m.data, source: info.source }),
      onPresence: (state) => { rec.presence = state; },
      onJoin: (j) => rec.joined.push({ recovered: j.recovered, messages: j.messages ? j.messages.length : null }),
      onLeave: (reason) => rec.left.push(reason),
      ...options,
    });
    rec.handle = handle;
    await handle.ready;
    return true;
  };
  H.room = (name, room) => H.rooms[name + "/" + room].handle;
  // publish and settle: {ok: {id, ts}} or {error: code}
  H.publish = (name, room, data) => H.room(name, room).publish(data).then(
    (ack) => ({ ok: ack }), (err) => ({ error: err.code }));
  // publish without waiting; the outcome lands in H.outcomes[label]
  H.outcomes = {};
  H.launch = (label, name, room, data) => {
    H.publish(name, room, data).then((outcome) => { H.outcomes[label] = outcome; });
  };
  return Object.keys(mod).sort();
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


class Harness:
    """A blank page that imported ``/hubbub.js`` from ``server``, with every sent frame recorded."""

    def __init__(self, browser: Any, server: RunningServer) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.sent: list[tuple[int, dict[str, Any]]] = []  # (socket number, frame) of every frame sent
        self.sockets: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("websocket", self._socket)
        # A page of another origin than the module's (localhost vs 127.0.0.1): a cross-origin module
        # import, which needs the route's CORS header. (Not about:blank: an opaque origin is no secure
        # context, and Chromium's Private Network Access keeps it from loopback addresses.)
        self.context.route("**/favicon.ico", lambda route: route.fulfill(status=204))
        self.page.goto(f"http://localhost:{server.port}/healthz")
        exports = self.js(HARNESS, server.http)
        assert exports == ["Client", "HubbubError", "Room", "connect"]

    def _socket(self, ws: Any) -> None:
        number = len(self.sockets)
        self.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self.sent.append((number, json.loads(payload))))

    def js(self, expression: str, arg: Any = None) -> Any:
        """Run ``expression`` (a function of ``arg``) in the page; a Promise it returns must settle
        within GIVE_UP_MS, else the test fails naming it (``page.evaluate`` itself waits forever)."""
        wrapped = f"""async (arg) => {{
            let timer;
            const giveUp = new Promise((_, reject) => {{
                timer = setTimeout(() => reject(new Error("gave up after {GIVE_UP_MS} ms waiting for: "
                    + {json.dumps(expression)})), {GIVE_UP_MS});
            }});
            try {{ return await Promise.race([({expression})(arg), giveUp]); }} finally {{ clearTimeout(timer); }}
        }}"""
        return self.page.evaluate(wrapped, arg)

    def wait(self, expression: str, arg: Any = None) -> Any:
        """Wait until ``expression`` (a function of ``arg``, in the page) is truthy; returns its value."""
        return self.page.wait_for_function(expression, arg=arg, timeout=GIVE_UP_MS).json_value()

    def messages(self, name: str, room: str) -> list[dict[str, Any]]:
        return self.js("([n, r]) => H.rooms[n + '/' + r].messages", [name, room])

    def presence(self, name: str, room: str) -> Any:
        return self.js("([n, r]) => H.rooms[n + '/' + r].presence", [name, room])

    def wait_presence(self, name: str, room: str, expected: dict[str, list[Any]]) -> None:
        """Wait until ``name``'s presence state in ``room`` is ``expected`` (metas compared as sets)."""
        self.wait(
            """([n, r, want]) => {
                const got = H.rooms[n + '/' + r].presence || {};
                const metas = (list) => list.map((m) => JSON.stringify(m)).sort();
                const norm = (s) => JSON.stringify(Object.keys(s).sort().map((u) => [u, metas(s[u])]));
                return norm(got) === norm(want);
            }""",
            [name, room, expected],
        )

    def wait_until(self, condition: Any, failure: str) -> Any:
        """Poll ``condition()`` (Python side) until truthy, or fail with ``failure`` after GIVE_UP_MS."""
        deadline = time.monotonic() + GIVE_UP_MS / 1000
        while not (value := condition()):
            assert time.monotonic() < deadline, failure
            self.page.wait_for_timeout(20)
        return value

    def opened(self, part: str) -> list[int]:
        """The numbers of the sockets whose URL holds ``part`` (``"user=alice"``) and that carried
        frames: tries refused at the handshake (the server down) carry none."""
        used = {n for n, _ in self.sent}
        return [n for n, url in enumerate(self.sockets) if part in url and n in used]

    def frames(self, event: str, socket: int | None = None) -> list[dict[str, Any]]:
        return [f for n, f in self.sent if f.get("event") == event and (socket is None or n == socket)]


def test_the_module_is_served_as_an_es_module() -> None:
    """No browser needed: GET /hubbub.js, without any key, is the file in the package."""
    with spawn_server() as server, urllib.request.urlopen(server.http + "/hubbub.js") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/javascript"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.read() == MODULE.read_bytes()


def test_two_rooms_on_one_socket_publish_not_joined_and_presence(browser: Any) -> None:
    with spawn_server() as server:
        h = Harness(browser, server)
        h.js("() => { H.start('alice', 'alice'); H.start('bob', 'bob'); }")
        assert h.js("() => Promise.all([H.join('alice', 'alpha', {meta: {device: 'laptop'}}), H.join('alice', 'beta'),"
                    " H.join('bob', 'alpha')])") == [True, True, True]
        h.wait_presence("alice", "alpha", {"alice": [{"device": "laptop"}], "bob": [{}]})
        assert h.presence("alice", "beta") == {"alice": [{}]}

        # publish: the ack resolves with the stored message's id and ts; only the room's members get it
        before = time.time() * 1000
        ack = h.js("() => H.publish('alice', 'alpha', {text: 'one'})")["ok"]
        assert isinstance(ack["id"], str) and ack["id"]
        assert isinstance(ack["ts"], int) and before - 5000 <= ack["ts"] <= time.time() * 1000 + 5000
        h.wait("() => H.rooms['bob/alpha'].messages.length === 1")
        one = {"id": ack["id"], "user": "alice", "data": {"text": "one"}, "source": "live"}
        assert h.messages("bob", "alpha") == [one]
        beta = h.js("() => H.publish('alice', 'beta', [1, 2, 3])")["ok"]
        assert beta["id"] != ack["id"]
        reply = h.js("() => H.publish('bob', 'alpha', 'two')")["ok"]
        h.wait("() => H.rooms['alice/alpha'].messages.length === 1")
        assert h.messages("alice", "alpha") == [{"id": reply["id"], "user": "bob", "data": "two", "source": "live"}]
        assert h.messages("alice", "beta") == [] and h.messages("bob", "alpha")[1:] == []  # no echo, no leak
        assert len(h.frames("join", 0)) == 2 and all(len(f["key"]) <= 64 for f in h.frames("publish"))
        assert len({f["key"] for f in h.frames("publish")}) == 3  # a fresh key per publish
        assert all("ref" in f for _, f in h.sent)  # every request carries a ref

        # not joined: the server's not_joined rejects the publish; a refused updateMeta reaches onError
        h.js("() => H.join('alice', 'gamma')")
        h.js("() => H.room('alice', 'gamma').leave()")
        assert h.js("() => H.publish('alice', 'gamma', 'late')") == {"error": "not_joined"}
        h.js("() => H.room('alice', 'gamma').updateMeta({status: 'away'})")
        h.wait("() => H.clients.alice.rec.errors.includes('not_joined')")
        assert h.js("() => H.room('alice', 'gamma').left") is True
        assert h.js("() => [...H.clients.alice.client.rooms.keys()].sort()") == ["alpha", "beta"]

        # a callback that throws is the application's bug, reported as uncaught; the client goes on
        h.js("""() => {
            H.loud = [];
            const onMessage = (m) => { H.loud.push(m.data); throw new Error("boom " + m.data); };
            return Promise.all([H.join('bob', 'loud', {onMessage}), H.join('alice', 'loud')]);
        }""")
        for n in (1, 2):
            assert "ok" in h.js("(n) => H.publish('alice', 'loud', n)", n)
        h.wait("() => H.loud.length === 2")
        h.wait_until(lambda: [e for e in h.errors if "boom" in e] == ["boom 1", "boom 2"], f"not reported: {h.errors}")
        h.errors[:] = [e for e in h.errors if "boom" not in e]

        # presence from diffs: a status in meta, a second connection of bob, then both going
        h.js("() => H.room('bob', 'alpha').updateMeta({status: 'typing'})")
        h.wait_presence("alice", "alpha", {"alice": [{"device": "laptop"}], "bob": [{"status": "typing"}]})
        h.js("() => { H.start('bob2', 'bob'); return H.join('bob2', 'alpha', {meta: {device: 'phone'}}); }")
        h.wait_presence("alice", "alpha",
                        {"alice": [{"device": "laptop"}], "bob": [{"status": "typing"}, {"device": "phone"}]})
        h.js("() => H.clients.bob2.client.close()")
        h.wait_presence("alice", "alpha", {"alice": [{"device": "laptop"}], "bob": [{"status": "typing"}]})
        h.js("() => H.room('bob', 'alpha').leave()")
        h.wait_presence("alice", "alpha", {"alice": [{"device": "laptop"}]})

        # history pages, oldest first
        page = h.js("() => H.room('alice', 'alpha').history({limit: 10})")
        assert [m["data"] for m in page["messages"]] == [{"text": "one"}, "two"] and page["truncated"] is False
        newest = h.js("() => H.room('alice', 'alpha').history({limit: 1})")["messages"]
        assert [m["id"] for m in newest] == [reply["id"]]
        older = h.js("(id) => H.room('alice', 'alpha').history({before: id})", reply["id"])["messages"]
        assert [m["id"] for m in older] == [ack["id"]]

        assert len(h.sockets) == 3  # alice, bob, bob's second connection: one socket each, whatever the rooms
        assert h.js("() => H.clients.bob2.rec.status.at(-1)") == "closed"
        assert h.errors == []
        h.context.close()


def api_publish(server: RunningServer, room: str, data: Any) -> dict[str, Any]:
    """``POST /api/publish`` as an application backend does it: ``{"id", "ts"}`` once stored."""
    request = urllib.request.Request(
        server.http + "/api/publish",
        data=json.dumps({"room": room, "data": data}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=GIVE_UP_MS / 1000) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_reconnect_after_a_server_restart_rejoins_and_resends(browser: Any, tmp_path: Path) -> None:
    """A server restart mid-conversation: alice's client (in two rooms, one fed by the server API)
    comes back to the new server (same port, same SQLite file), rejoins both rooms with ``since``,
    sends a publish that was in flight again with the same key and one written while down once, and
    gets what carol and the backend said meanwhile: nothing lost, nothing twice, in order."""
    store = f"sqlite:///{tmp_path}/hubbub.db"
    flags = ("--store", store, "--api-key", API_KEY)
    with spawn_server(*flags) as server:
        port = server.port
        h = Harness(browser, server)
        h.js("() => { H.start('alice', 'alice'); H.start('carol', 'carol'); }")
        h.js("() => Promise.all([H.join('alice', 'alpha'), H.join('alice', 'news'), H.join('alice', 'quiet'),"
             " H.join('carol', 'alpha')])")
        m1 = h.js("() => H.publish('carol', 'alpha', 'm1')")["ok"]
        h.wait("() => H.rooms['alice/alpha'].messages.length === 1")
        n1 = api_publish(server, "news", {"headline": "n1"})  # the backend publishes, alice gets it
        h.wait("() => H.rooms['alice/news'].messages.length === 1")
        assert h.messages("alice", "news") == [
            {"id": n1["id"], "user": "server", "data": {"headline": "n1"}, "source": "live"}]
        own = h.js("() => H.publish('alice', 'news', 'a reply')")["ok"]  # her own: never an onMessage
        h.js("() => { H.hold.alice = true; }")  # alice stays away until the test lets her back
        [first] = h.opened("user=alice")

        server.process.send_signal(signal.SIGSTOP)  # frozen: what alice sends now is never read
        h.js("() => H.launch('in flight', 'alice', 'alpha', 'in flight')")
        h.wait_until(lambda: any(f.get("data") == "in flight" for f in h.frames("publish", first)),
                     "the publish never left the page")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(GIVE_UP_MS / 1000)
        h.wait("() => H.clients.alice.client.status.state === 'reconnecting'")
        h.js("() => H.launch('queued', 'alice', 'alpha', 'queued')")  # written while down
        assert h.js("() => H.outcomes") == {}  # neither settled: both wait for a server

    with spawn_server("--port", str(port), *flags) as again:
        h.wait("() => H.rooms['carol/alpha'].joined.length === 2")  # carol is back first (alice is held)
        m2 = h.js("() => H.publish('carol', 'alpha', 'm2')")["ok"]
        m3 = h.js("() => H.publish('carol', 'alpha', 'm3')")["ok"]
        n2 = api_publish(again, "news", {"headline": "n2"})
        q1 = api_publish(again, "quiet", "q1")  # a room alice never had a message in
        h.js("() => { H.hold.alice = false; H.clients.alice.client.reconnect(); }")
        h.wait("() => ['alpha', 'news', 'quiet'].every((r) => H.rooms['alice/' + r].joined.length === 2)")
        outcomes = h.wait("() => H.outcomes['in flight'] && H.outcomes['queued'] && H.outcomes")
        assert "ok" in outcomes["in flight"] and "ok" in outcomes["queued"], outcomes

        # one new socket for alice, which rejoined each room with since = the last message seen there
        first_again, second = h.opened("user=alice")
        assert first_again == first
        rejoins = {f["room"]: f.get("since") for f in h.frames("join", second)}
        assert rejoins == {"alpha": m1["id"], "news": n1["id"], "quiet": None}
        # the publish in flight went again with the same key; the one written while down went once
        flight = [f for f in h.frames("publish") if f["data"] == "in flight"]
        assert [n for n, f in h.sent if f.get("data") == "in flight"] == [first, second]
        assert flight[0]["key"] == flight[1]["key"] and len(flight[0]["key"]) <= 64
        assert [n for n, f in h.sent if f.get("data") == "queued"] == [second]
        # the joins went before the publishes that need them
        order = [f["event"] for n, f in h.sent if n == second and f["event"] in ("join", "publish")]
        assert order == ["join", "join", "join", "publish", "publish"], order
        stored = h.js("() => H.room('alice', 'alpha').history({limit: 20})")["messages"]
        assert sorted(m["data"] for m in stored) == ["in flight", "m1", "m2", "m3", "queued"]  # each once
        h.wait_presence("alice", "alpha", {"alice": [{}], "carol": [{}]})
        assert h.js("() => H.clients.alice.rec.status.filter((s) => s === 'connected').length") == 2

        # nothing said while alice was away is lost or doubled, in order, after what she had
        h.wait("() => H.rooms['alice/alpha'].messages.length >= 3 && H.rooms['alice/news'].messages.length >= 2"
               " && H.rooms['alice/quiet'].messages.length >= 1")
        h.js("() => H.room('alice', 'alpha').history({limit: 1})")  # a round trip: a duplicate would be here now
        alpha, news = h.messages("alice", "alpha"), h.messages("alice", "news")
        assert [(m["id"], m["data"]) for m in alpha] == [(m1["id"], "m1"), (m2["id"], "m2"), (m3["id"], "m3")]
        assert [(m["id"], m["data"]) for m in news] == [(n1["id"], {"headline": "n1"}), (n2["id"], {"headline": "n2"})]
        assert own["id"] not in {m["id"] for m in news}
        # no since to give (nothing seen there): the client pages that room's history from its start
        assert h.messages("alice", "quiet") == [{"id": q1["id"], "user": "server", "data": "q1", "source": "history"}]
        joined = {room: h.js("(r) => H.rooms['alice/' + r].joined[1]", room) for room in ("alpha", "news")}
        assert h.errors == [e for e in h.errors if "WebSocket connection to" in e]  # refused while it was down
        h.context.close()

    # How the missed ones came depends on the server: in `joined` when it recovered the gap itself
    # (`recovered: true`), else from the client's `history` pages (`after`: the last id it saw).
    for room, got in (("alpha", alpha), ("news", news)):
        recovered = joined[room]["recovered"]
        assert recovered in (None, True, False), joined
        late = "recovered" if recovered is True else "history"
        assert [m["source"] for m in got] == ["live"] + [late] * (len(got) - 1), (room, joined[room], got)


def test_a_token_function_is_asked_again_before_expiry_and_on_reconnect(browser: Any) -> None:
    secret = "s" * 32
    with spawn_server("--jwt-secret", secret) as server:
        port = server.port
        h = Harness(browser, server)
        # made once the page is ready, so that a slow start cannot eat the short token's life
        start = int(time.time())
        life = 6  # seconds: token_expiring comes at half of it (under 30 s)
        tokens = [jwt.encode({"sub": "tess", "exp": start + s}, secret, algorithm="HS256") for s in (life, 300, 300)]
        h.js("""(tokens) => {
            const calls = H.tokenCalls = [];
            const token = async () => { calls.push(Date.now()); return tokens[Math.min(calls.length, 3) - 1]; };
            H.start('tess', 'ignored', {token});
            return H.join('tess', 'news');
        }""", tokens)
        assert "token=" + tokens[0] in h.sockets[0]
        h.wait("() => H.tokenCalls.length === 2")  # token_expiring: fetched again and sent as refresh
        h.wait_until(lambda: h.frames("refresh"), "no refresh sent")
        assert h.frames("refresh")[0]["token"] == tokens[1]
        h.wait_until(lambda: time.time() > start + life + 0.5, "never past the first token's exp")
        assert h.js("() => H.clients.tess.client.status.state") == "connected"  # not closed with 1008
        assert "ok" in h.js("() => H.publish('tess', 'news', 'still here')")
        assert h.js("() => H.clients.tess.rec.errors") == []
        h.js("() => { H.hold.tess = true; }")  # no retries while the server is down: one token per connection
        assert server.stop() == 0
        h.wait("() => H.clients.tess.client.status.state === 'reconnecting'")
    with spawn_server("--port", str(port), "--jwt-secret", secret):
        h.js("() => { H.hold.tess = false; H.clients.tess.client.reconnect(); }")
        h.wait("() => H.rooms['tess/news'].joined.length === 2")
        assert h.js("() => H.tokenCalls.length") == 3  # and once more for the new connection
        [_, again] = h.opened("token=")
        assert "token=" + tokens[2] in h.sockets[again]
        h.context.close()


def _node() -> tuple[str, list[str]]:
    """Node and the flags it needs for a global WebSocket (Node 20: --experimental-websocket); a skip
    without Node, a failure in CI."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed")
        pytest.skip("node is not installed")
    builtin = subprocess.run([node, "-p", "typeof WebSocket"], capture_output=True, text=True, timeout=30)
    return node, [] if builtin.stdout.strip() == "function" else ["--experimental-websocket"]


def test_node_imports_the_module_and_publishes() -> None:
    """Node runs the module as it is: Node 22+ has a global WebSocket, Node 20 behind
    --experimental-websocket (the `WebSocket` option takes any other implementation, e.g. `ws`)."""
    node, flags = _node()
    script = """
const { connect } = await import(process.argv[1]);
const timer = setTimeout(() => { console.error("gave up after 20 s"); process.exit(2); }, 20000);
const until = (check) => new Promise((resolve) => {
  const poll = () => (check() ? resolve() : setTimeout(poll, 10));
  poll();
});
const heard = [];
let seen = {};
const listener = connect(process.argv[2], { params: { user: "listener" } });
const inbox = listener.join("from-node", {
  onMessage: (m, info) => heard.push({ id: m.id, user: m.user, data: m.data, source: info.source }),
  onPresence: (state) => { seen = state; },
});
await inbox.ready;
const hub = connect(process.argv[2], { params: { user: "node" } });
const room = hub.join("from-node", { meta: { runtime: "node" } });
await room.ready;
await until(() => seen.node);
const presence = { ...seen };
const ack = await room.publish({ hello: "from node" });
await until(() => heard.length === 1);
const { messages } = await room.history({ limit: 5 });
await room.leave();
await until(() => !seen.node);
console.log(JSON.stringify({ ack, messages, heard, presence, after: seen }));
clearTimeout(timer);
hub.close();
listener.close();
"""
    with spawn_server() as server:
        done = subprocess.run(
            [node, *flags, "--no-warnings", "--input-type=module", "-e", script, MODULE.as_uri(), server.url + "/ws"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [m["id"] for m in out["messages"]] == [out["ack"]["id"]]
    assert out["messages"][0]["data"] == {"hello": "from node"} and out["messages"][0]["user"] == "node"
    assert out["heard"] == [{"id": out["ack"]["id"], "user": "node", "data": {"hello": "from node"}, "source": "live"}]
    assert out["presence"] == {"listener": [{}], "node": [{"runtime": "node"}]}
    assert out["after"] == {"listener": [{}]}


NODE_TOO_BIG = """
const { connect } = await import(process.argv[1]);
const timer = setTimeout(() => { console.error("gave up after 20 s"); process.exit(2); }, 20000);
const states = [];
const errors = [];
const hub = connect(process.argv[2], {
  params: { user: "node" }, maxMessageSize: 4096,
  onStatus: (s) => states.push(s.state), onError: (e) => errors.push(e.code),
});
const room = hub.join("big");
await room.ready;
let refused = null;
try {
  await room.publish("\u00e9".repeat(3000));  // 3,000 characters, 6,000 bytes of UTF-8: over 4,096
} catch (e) {
  refused = { code: e.code, room: e.room };
}
room.updateMeta({ bio: "x".repeat(5000) });   // no Promise: reported through onError
const ack = await room.publish("\u00e9".repeat(1000));  // 2,000 bytes: sent on the same socket
const { messages } = await room.history({ limit: 5 });
console.log(JSON.stringify({ refused, errors, states, ack, stored: messages.map((m) => m.data.length) }));
clearTimeout(timer);
hub.close();
"""


def test_a_request_over_the_servers_message_size_is_refused_before_it_is_sent() -> None:
    """The server closes a socket (1009) for a frame over --max-message-size, and the client would send
    it again on every reconnect: it is refused in the client instead, and the socket stays."""
    node, flags = _node()
    with spawn_server("--max-message-size", "4096", "--rate-limit", "0") as server:
        done = subprocess.run(
            [node, *flags, "--no-warnings", "--input-type=module", "-e", NODE_TOO_BIG, MODULE.as_uri(),
             server.url + "/ws"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["refused"] == {"code": "bad_field", "room": "big"}
    assert out["errors"] == ["bad_field"]
    assert out["states"] == ["connecting", "connected"] and isinstance(out["ack"]["id"], str)  # never reconnected
    assert out["stored"] == [1000]


NODE_RECOVERY = """
const { connect } = await import(process.argv[1]);
const timer = setTimeout(() => {
  console.error("gave up after 20 s; heard so far:", JSON.stringify(heard));
  process.exit(2);
}, 20000);
const until = (check) => new Promise((resolve) => {
  const poll = () => (check() ? resolve() : setTimeout(poll, 10));
  poll();
});
const heard = [];
const errors = [];
const hub = connect(process.argv[2], {
  params: { user: "node" }, backoff: () => 50, onError: (e) => errors.push(e.code),
});
const room = hub.join("r", { onMessage: (m, info) => heard.push([m.id, info.source]) });
await room.ready;
await until(() => heard.length === 1);
const ack = await room.publish("p");   // first try lost with its socket, acked on the next one
await until(() => heard.length === 2);
room.updateMeta({ phase: 2 });         // tells the scripted server to drop the socket again
await until(() => heard.length === 7);
console.log(JSON.stringify({ ack, heard, errors, lastId: room.lastId }));
clearTimeout(timer);
hub.close();
"""


def test_the_client_against_a_server_that_recovers_and_one_that_cannot() -> None:
    """PROTOCOL.md's recovery from the client's side, against a scripted ``/ws`` (Node runs the
    client): ``recovered: true`` delivers ``joined``'s messages, its own re-sent publish (acked with
    the id stored the first time) never comes back as a message; ``recovered: false`` pages
    ``history`` forward with ``after`` up to the first message ``joined`` brought, holds a live
    message until then, and drops what it already delivered."""
    from websockets.sync.server import serve

    node, flags = _node()
    got: list[tuple[int, dict[str, Any]]] = []  # (connection number, frame) of every frame the client sent
    count = [0]

    def msg(id_: str, user: str = "other", data: Any = None) -> dict[str, Any]:
        return {"room": "r", "id": id_, "ts": 1, "user": user, "data": data if data is not None else id_}

    def handler(ws: Any) -> None:
        count[0] += 1
        n = count[0]

        def expect(event: str) -> dict[str, Any]:
            while True:
                frame = json.loads(ws.recv(timeout=GIVE_UP_MS / 1000))
                got.append((n, frame))
                if frame["event"] == event:
                    return frame

        def send(frame: dict[str, Any]) -> None:
            ws.send(json.dumps(frame))

        join = expect("join")
        joined = {"event": "joined", "room": "r", "ref": join["ref"], "presence": {"node": [{}]}}
        if n == 1:  # today's server: no `since`, no `recovered`
            send(joined)
            baseline = expect("history")
            send({"event": "history", "room": "r", "ref": baseline["ref"], "messages": []})
            send({"event": "message", **msg("0001")})
            expect("publish")  # read, never acked: the socket goes
            ws.close(1012)
        elif n == 2:  # a server that recovers exactly, and knows the key it stored before
            send({**joined, "recovered": True, "messages": [msg("0002"), msg("0003", "node", "p")]})
            again = expect("publish")
            send({"event": "ack", "ref": again["ref"], "id": "0003", "ts": 1})
            expect("presence_update")
            ws.close(1012)
        elif n == 3:  # a server that cannot recover the gap: `messages` holds the newest ones
            send({**joined, "recovered": False, "messages": [msg("0006"), msg("0007")]})
            send({"event": "message", **msg("0008")})  # live, while the client fills the gap
            for page in ([msg("0003", "node", "p"), msg("0004"), msg("0005")], [msg("0006"), msg("0007")]):
                ask = expect("history")
                send({"event": "history", "room": "r", "ref": ask["ref"], "messages": page})
        try:
            ws.recv(timeout=GIVE_UP_MS / 1000)  # until the client goes
        except Exception:
            pass

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        done = subprocess.run(
            [node, *flags, "--no-warnings", "--input-type=module", "-e", NODE_RECOVERY, MODULE.as_uri(),
             f"ws://127.0.0.1:{port}/ws"],
            capture_output=True, text=True, timeout=60,
        )
        server.shutdown()
    assert done.returncode == 0, (done.stderr, got)
    out = json.loads(done.stdout)
    assert out["heard"] == [["0001", "live"], ["0002", "recovered"], ["0004", "history"], ["0005", "history"],
                            ["0006", "recovered"], ["0007", "recovered"], ["0008", "live"]]
    assert out["ack"] == {"id": "0003", "ts": 1} and out["errors"] == [] and out["lastId"] == "0008"
    joins = [(n, f.get("since")) for n, f in got if f["event"] == "join"]
    assert joins == [(1, None), (2, "0001"), (3, "0002")]
    keys = [(n, f["key"]) for n, f in got if f["event"] == "publish"]
    assert [n for n, _ in keys] == [1, 2] and keys[0][1] == keys[1][1]  # sent again with its key
    fills = [(f.get("after"), f.get("limit")) for n, f in got if n == 3 and f["event"] == "history"]
    assert fills == [("0002", 100), ("0005", 100)]


def test_a_socket_that_never_opens_is_given_up_and_tried_again() -> None:
    """A server that takes the TCP connection and never answers the handshake (a dead network
    looks the same): after ``connectTimeout`` the client gives the socket up and tries again. Its
    ``onStatus`` may name the client (the first status comes after ``connect()`` returned)."""
    node, flags = _node()
    script = """
const { connect } = await import(process.argv[1]);
const states = [];
const timer = setTimeout(() => {
  console.error("gave up after 20 s:", JSON.stringify(states));
  process.exit(2);
}, 20000);
const hub = connect(process.argv[2], {
  connectTimeout: 200, backoff: () => 50,
  onStatus: (s) => states.push([s.state, hub.status.state]),
});
const room = hub.join("r");
const outcome = room.publish("never").then(() => "acked", (e) => e.code);
await new Promise((resolve) => {
  const poll = () => (states.filter(([s]) => s === "reconnecting").length >= 2 ? resolve() : setTimeout(poll, 10));
  poll();
});
hub.close();
console.log(JSON.stringify({ states, outcome: await outcome }));
clearTimeout(timer);
"""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)  # never accepted: the kernel completes the TCP handshake, nobody answers
        done = subprocess.run(
            [node, *flags, "--no-warnings", "--input-type=module", "-e", script, MODULE.as_uri(),
             f"ws://127.0.0.1:{mute.getsockname()[1]}/ws"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [s for s, _ in out["states"]][:4] == ["connecting", "reconnecting", "connecting", "reconnecting"]
    assert all(s == seen for s, seen in out["states"])  # the client was there for every call
    assert out["states"][-1][0] == "closed"
    assert out["outcome"] == "closed"  # the publish never went: close() rejects it


NODE_MANY_ROOMS = """
const { connect } = await import(process.argv[1]);
const ROOMS = Number(process.argv[3]);
const timer = setTimeout(() => { console.error("gave up after 60 s"); process.exit(2); }, 60000);
const until = (check) => new Promise((resolve) => {
  const poll = () => (check() ? resolve() : setTimeout(poll, 10));
  poll();
});
let hold = false;
const states = [];
const errors = [];
const heard = {};
const hub = connect(process.argv[2], {
  params: { user: "many" },
  backoff: () => (hold ? 3600000 : 100),
  onStatus: (s) => states.push([s.state, s.code]),
  onError: (e) => errors.push(e.code),
});
const feeder = connect(process.argv[2], { params: { user: "feeder" } });
const names = Array.from({ length: ROOMS }, (_, i) => `room-${i}`);
const rooms = names.map((name) => {
  heard[name] = [];
  return hub.join(name, { onMessage: (m, info) => heard[name].push([m.data, info.source]) });
});
await Promise.all(rooms.map((room) => room.ready));
const feeds = names.map((name) => feeder.join(name));
await Promise.all(feeds.map((room, i) => room.publish(`before ${i}`)));
feeder.close();
await until(() => names.every((name) => heard[name].length === 1));
hold = true;
console.log("phase 1");                      // the test restarts the server, publishes, says "go"
for await (const line of (await import("node:readline")).createInterface({ input: process.stdin })) {
  if (line === "go") break;
}
hold = false;
hub.reconnect();
await until(() => names.every((name) => heard[name].length === 2));
console.log(JSON.stringify({ heard, states, errors }));
clearTimeout(timer);
hub.close();
process.exit(0);
"""


def test_a_reconnect_in_many_rooms_stays_under_the_servers_rate_limit(tmp_path: Path) -> None:
    """60 rooms on one socket: the rejoins and their history pages (today's server does not
    recover) are more frames than the server's --rate-limit burst (100); the client paces them,
    so none is refused and the socket is not closed with 1008."""
    node, flags = _node()
    rooms = 60
    store = f"sqlite:///{tmp_path}/hubbub.db"
    lines: queue.Queue[str] = queue.Queue()
    with spawn_server("--store", store, "--api-key", API_KEY) as server:
        port = server.port
        child = subprocess.Popen(
            [node, *flags, "--no-warnings", "--input-type=module", "-e", NODE_MANY_ROOMS, MODULE.as_uri(),
             server.url + "/ws", str(rooms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
            try:
                first = lines.get(timeout=GIVE_UP_MS / 1000)
            except queue.Empty:
                child.kill()
                pytest.fail(f"phase 1 never came: {child.stderr.read()}")
            assert first == "phase 1\n"
            assert server.stop() == 0
            with spawn_server("--port", str(port), "--store", store, "--api-key", API_KEY) as again:
                for i in range(rooms):
                    api_publish(again, f"room-{i}", f"after {i}")
                child.stdin.write("go\n")
                child.stdin.flush()
                assert child.wait(timeout=90) == 0, child.stderr.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    out = json.loads(lines.get(timeout=5))
    assert out["errors"] == []
    assert [s for s, _ in out["states"]].count("connected") == 2  # one reconnect: never closed for flooding
    assert all(code != 1008 for _, code in out["states"])
    for i in range(rooms):  # the missed one from the server's recovery, or (today) from history pages
        [before, (after, source)] = out["heard"][f"room-{i}"]
        assert before == [f"before {i}", "live"] and after == f"after {i}" and source in ("recovered", "history")
