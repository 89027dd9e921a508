"""TLS on the server's own port (``--tls-cert``/``--tls-key``), on both anyio backends.

Certificates are made at test time by ``trustme`` (a throwaway CA). Real clients speak wss:// and
https://: the ``websockets`` library, urllib, Node's WebSocket and headless Chromium (the demo page
over https, its socket over wss). Hostile clients get nothing and cost nobody else anything: a plain
HTTP request on the TLS port is answered 400, a garbage ClientHello is dropped, half a handshake is
dropped at ``--handshake-timeout``; each is counted (``TLS.failures``). SIGHUP reloads the
certificate without dropping the connections already open, and keeps the old one if the new files
are bad; bad files at startup fail with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import InProcessServer, start_in_process
from tests.services import IN_CI, recv_json, recv_until

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"hubbub listening on (wss?)://([^:]+):(\d+)")


@dataclass
class Certs:
    """A throwaway CA and a server certificate it issued for localhost and 127.0.0.1, as PEM files."""

    ca: Any
    cert: Path
    key: Path
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client's context that trusts this CA only (and checks the host name, as browsers do)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_certs(directory: Path, name: str = "server") -> Certs:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}-ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert, key, ca_file)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


@contextmanager
def tls_server(backend: str, certs: Certs, *flags: str) -> Iterator[InProcessServer]:
    yield from _wrap(start_in_process(backend, "--tls-cert", str(certs.cert), "--tls-key", str(certs.key), *flags))


def _wrap(gen: Iterator[InProcessServer]) -> Iterator[InProcessServer]:
    try:
        yield next(gen)
    finally:
        gen.close()


def wss(server: InProcessServer, path: str, certs: Certs, **kwargs: Any) -> Any:
    return connect(f"wss://localhost:{server.port}{path}", ssl=certs.client_context(), **kwargs)


def https_get(port: int, path: str, certs: Certs) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(f"https://localhost:{port}{path}", context=certs.client_context(),
                                    timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_wss_and_https_on_one_port(backend: str, certs: Certs) -> None:
    with tls_server(backend, certs) as server:
        with wss(server, "/chat/tls-room?user=alice", certs) as alice, \
                wss(server, "/chat/tls-room?user=bob", certs) as bob:
            alice.send(json.dumps({"event": "message", "text": "über TLS", "ref": 1}))
            got = recv_json(bob)
            assert (got["user"], got["text"]) == ("alice", "über TLS")
            assert recv_json(alice)["event"] == "ack"
        status, headers, body = https_get(server.port, "/healthz", certs)
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, headers, body = https_get(server.port, "/", certs)
        assert status == 200 and b"<title>hubbub</title>" in body
        assert f"wss://localhost:{server.port}" in headers["Content-Security-Policy"]
        status, _, body = https_get(server.port, "/metrics", certs)
        assert status == 200 and b"hubbub_connections" in body
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                certs.client_context().wrap_socket(raw, server_hostname="localhost") as tls_sock:
            assert tls_sock.selected_alpn_protocol() is None  # we offered none: nothing chosen
            assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")
        context = certs.client_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", server.port)) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
            assert tls_sock.selected_alpn_protocol() == "http/1.1"  # never h2: we speak HTTP/1.1
        stats = server.shell.tls
        assert stats is not None
        until(lambda: stats.handshakes == 7)
        assert stats.failures == {"plain_http": 0, "protocol": 0, "timeout": 0, "eof": 0}


def test_tls_below_1_2_is_refused(backend: str, certs: Certs) -> None:
    context = certs.client_context()
    with warnings.catch_warnings():  # deprecated, as they should be: this client is the old one we refuse
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with tls_server(backend, certs) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with pytest.raises(ssl.SSLError):
                context.wrap_socket(raw, server_hostname="localhost")
        stats = server.shell.tls
        assert stats is not None
        until(lambda: stats.failures["protocol"] == 1)


def test_plain_clients_on_the_tls_port_get_a_400_and_nobody_else_notices(backend: str, certs: Certs) -> None:
    with tls_server(backend, certs) as server, wss(server, "/chat/calm?user=alice", certs) as alice, \
            wss(server, "/chat/calm?user=bob", certs) as bob:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := raw.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert answer.endswith(b"This port speaks TLS: use https:// or wss:// here.\n")
        with pytest.raises((InvalidStatus, InvalidMessage)) as refused:  # the websockets client over ws://
            connect(f"ws://127.0.0.1:{server.port}/chat/calm?user=mallory", open_timeout=10)
        if isinstance(refused.value, InvalidStatus):
            assert refused.value.response.status_code == 400
        for garbage in (b"\x16\x03\x01\x00\x05garbagegarbage", b"\x00" * 64, os.urandom(2048)):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                raw.sendall(garbage)
                try:
                    while raw.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
        alice.send('{"event":"message","text":"still here"}')
        assert recv_json(bob)["text"] == "still here"
        stats = server.shell.tls
        assert stats is not None
        until(lambda: stats.failures["plain_http"] == 2 and stats.failures["protocol"] == 3)
        assert stats.failures["timeout"] == 0
        assert server.shell.server.stats()["sockets"] == 2  # the refused ones left nothing behind


def test_a_handshake_that_never_finishes_is_dropped_at_the_handshake_timeout(backend: str, certs: Certs) -> None:
    hello = client_hello()
    with tls_server(backend, certs, "--handshake-timeout", "0.5") as server, \
            wss(server, "/chat/calm?user=alice", certs) as alice, wss(server, "/chat/calm?user=bob", certs) as bob:
        stalled = []
        for i in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 2:
                sock.sendall(hello[: len(hello) // 2])  # half a ClientHello, then silence
            else:
                sock.sendall(hello)  # the whole ClientHello, but never the rest of the handshake
            stalled.append(sock)
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # TCP only
        started = time.monotonic()
        for sock in [*stalled, silent]:
            try:
                while sock.recv(65536):  # the server's hello, maybe, then its close
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        waited = time.monotonic() - started
        assert 0.3 < waited < 9.0, waited  # 0.5 s, and a loaded machine's scheduling
        alice.send('{"event":"message","text":"unhindered"}')
        assert recv_json(bob)["text"] == "unhindered"
        stats = server.shell.tls
        assert stats is not None
        until(lambda: stats.failures["timeout"] == 21)
        assert server.shell.server.stats()["sockets"] == 2


def test_closing_mid_handshake_is_counted(backend: str, certs: Certs) -> None:
    hello = client_hello()
    with tls_server(backend, certs) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(hello[:40])
        with socket.create_connection(("127.0.0.1", server.port)):
            pass
        stats = server.shell.tls
        assert stats is not None
        until(lambda: stats.failures["eof"] == 2)
        until(lambda: server.shell.server.stats()["sockets"] == 0)


def test_a_slow_tls_reader_is_closed_1013_and_the_others_keep_up(backend: str, certs: Certs) -> None:
    with tls_server(backend, certs, "--max-buffer", "65536", "--rate-limit", "0") as server, \
            wss(server, "/chat/flood?user=sender", certs) as sender, \
            wss(server, "/chat/flood?user=reader", certs, max_size=None) as reader:
        stuck = socket.create_connection(("127.0.0.1", server.port))
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls_stuck = certs.client_context().wrap_socket(stuck, server_hostname="localhost")
        tls_stuck.sendall(b"GET /chat/flood?user=stuck HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert tls_stuck.recv(4096).startswith(b"HTTP/1.1 101")
        text = "x" * 1000
        for i in range(600):  # 600 KB for a reader that never reads
            sender.send(json.dumps({"event": "message", "text": f"{i}:{text}"}))
        for i in range(600):
            assert recv_json(reader)["text"].startswith(f"{i}:")
        until(lambda: server.shell.server.metrics.slow_consumers == 1)
        tls_stuck.close()


def test_sighup_reloads_the_certificate_without_dropping_connections(tmp_path: Path) -> None:
    first = make_certs(tmp_path, "first")
    second = make_certs(tmp_path, "second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    both = ssl.create_default_context(cafile=str(first.ca_file))
    both.load_verify_locations(cafile=str(second.ca_file))
    with tls_process("--tls-cert", str(cert), "--tls-key", str(key)) as server:
        url = f"wss://localhost:{server.port}"
        with connect(f"{url}/chat/reload?user=alice", ssl=both) as alice, \
                connect(f"{url}/chat/reload?user=bob", ssl=both) as bob:
            assert issuer_of(server.port, both) == issuer_name(first)
            shutil.copy(second.cert, cert)
            shutil.copy(second.key, key)
            server.process.send_signal(signal.SIGHUP)
            until(lambda: any("TLS: reloaded" in line for line in server.output))
            assert issuer_of(server.port, both) == issuer_name(second)  # new connections: the new certificate
            alice.send('{"event":"message","text":"after the reload"}')
            assert recv_json(bob)["text"] == "after the reload"  # the open ones: untouched
            key.write_text("not a key\n")  # a broken renewal: the old certificate stays
            server.process.send_signal(signal.SIGHUP)
            until(lambda: any("reload failed" in line for line in server.output))
            assert issuer_of(server.port, both) == issuer_name(second)
            bob.send('{"event":"message","text":"still up"}')
            assert recv_until(alice, lambda e: e.get("text") == "still up")
        assert server.stop() == 0


def test_bad_tls_files_fail_at_startup_with_a_clear_message(tmp_path: Path, certs: Certs) -> None:
    other = make_certs(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.key)], "missing.pem: no such file"),
        (["--tls-cert", str(garbage), "--tls-key", str(certs.key)], "not a PEM certificate chain and private key"),
        (["--tls-cert", str(certs.cert), "--tls-key", str(other.key)], "the key does not belong to the certificate"),
        (["--tls-cert", str(certs.cert)], "--tls-cert and --tls-key go together"),
    ]
    for flags, message in cases:
        done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--port", "0", "--store", "memory", *flags],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done
        assert message in done.stderr, done.stderr


def test_node_websocket_over_wss(certs: Certs) -> None:
    node = shutil.which("node")
    if node is None:
        if IN_CI:
            pytest.fail("node is not installed")
        pytest.skip("node is not installed")
    script = """
const ws = new WebSocket(process.argv[1]);
const timer = setTimeout(() => { console.error("timeout"); process.exit(2); }, 20000);
ws.onopen = () => ws.send(JSON.stringify({event: "message", text: "from node", ref: 7}));
ws.onmessage = (m) => {
  const e = JSON.parse(m.data);
  if (e.event === "message") { console.log(e.text); clearTimeout(timer); ws.close(1000); }
};
ws.onclose = (e) => process.exit(e.code === 1000 ? 0 : 3);
ws.onerror = (e) => { console.error("error", e.message); process.exit(1); };
"""
    with tls_server("asyncio", certs) as server, wss(server, "/chat/node?user=python", certs) as python:
        child = subprocess.Popen(
            [node, "--experimental-websocket", "--no-warnings", "-e", script,
             f"wss://localhost:{server.port}/chat/node?user=node"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NODE_EXTRA_CA_CERTS": str(certs.ca_file)},
        )
        got = recv_json(python, 20)
        assert (got["user"], got["text"]) == ("node", "from node")
        python.send('{"event":"message","text":"from python"}')
        out, err = child.communicate(timeout=20)
        assert child.returncode == 0, err
        assert out.strip() == "from python"


def test_chromium_serves_the_demo_page_over_https_and_chats_over_wss(certs: Certs, tmp_path: Path) -> None:
    from tests.browser import CHROMIUM_FLAGS, find_chromium, skip_or_fail

    executable = find_chromium()
    if executable is None:
        skip_or_fail("no Chromium installed (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        skip_or_fail("Playwright is not installed (pip install -e '.[test]')")
    with tls_server("asyncio", certs) as server, sync_playwright() as playwright, \
            wss(server, "/chat/browser?user=python", certs) as python:
        # The test's own CA is not in Chromium's store: only this test's browser skips the check.
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=[*CHROMIUM_FLAGS, "--ignore-certificate-errors"])
        page = browser.new_context(ignore_https_errors=True).new_page()
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(f"https://localhost:{server.port}/")
        page.fill("#name", "chromium")
        page.fill("#room", "browser")
        page.click("#join-button")
        expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=30_000)
        python.send('{"event":"message","text":"hello browser"}')
        expect(page.locator("#messages .msg .text")).to_have_text(["hello browser"], timeout=30_000)
        page.fill("#text", "hello python")
        page.press("#text", "Enter")
        # the page speaks /ws (v2): a v1 member of the room gets its message with data as it is
        assert recv_until(python, lambda e: e.get("event") == "message")["data"] == {"text": "hello python"}
        assert sockets and all(url.startswith(f"wss://localhost:{server.port}/ws") for url in sockets)
        page.screenshot(path=tmp_path / "chromium-wss.png")
        browser.close()


# -- a server process of our own (its output line names wss://) ---------------------------------------


@dataclass
class TLSProcess:
    process: subprocess.Popen[str]
    port: int
    output: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(15)


@contextmanager
def tls_process(*flags: str) -> Iterator[TLSProcess]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", "--store", "memory", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                port.append(int(match.group(3)))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(30) or not port:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(output))
    running = TLSProcess(process, port[0], output)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def issuer_name(certs: Certs) -> str:
    """The subject of ``certs``' CA (each trustme CA has its own)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(certs.ca.cert_pem.bytes()).subject.rfc4514_string()


def issuer_of(port: int, context: ssl.SSLContext) -> str:
    """The issuer of the certificate a new connection to ``port`` is shown."""
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).issuer.rfc4514_string()
