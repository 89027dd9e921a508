"""The demo page on the core's plain-HTTP path: GET / and its headers, no sockets, no browser."""

from __future__ import annotations

import base64
import hashlib
import re

import h11
import pytest

from hubbub import core
from hubbub.handlers import build_router, page

NOW = 1_700_000_000.0


def request(target: str, method: str = "GET", host: str = "127.0.0.1:8765") -> tuple[h11.Response, bytes]:
    """One plain HTTP request to a core.Server serving the page and its client, parsed by h11's client."""
    config = core.Config()
    server = core.Server(build_router(config), config, http_routes={"/": page.index, "/hubbub.js": page.client_js})
    conn = server.connect(peer=("127.0.0.1", 40000), now=NOW)
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=[("Host", host)]))
    data += client.send(h11.EndOfMessage())
    server.receive(conn, data, NOW)
    assert conn.closed  # a plain HTTP answer closes the connection
    client.receive_data(conn.data_to_send())
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return response, body


def headers_of(response: h11.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in response.headers:
        out.setdefault(name.decode(), []).append(value.decode())
    return out


def directives(policy: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (part.strip() for part in policy.split(";")) if d}


def sha256_source(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def test_get_root_answers_the_page_with_its_headers() -> None:
    response, body = request("/")
    headers = headers_of(response)
    assert response.status_code == 200
    assert headers["content-type"] == ["text/html; charset=utf-8"]
    assert headers["cache-control"] == ["no-cache"]  # the route's own, not the default no-store as well
    assert headers["x-content-type-options"] == ["nosniff"]
    assert body == page.PAGE and body.startswith(b"<!doctype html>")
    csp = directives(headers["content-security-policy"][0])
    assert csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'", "ws://127.0.0.1:8765", "wss://127.0.0.1:8765"]
    assert csp["base-uri"] == csp["form-action"] == csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in headers["content-security-policy"][0]


def test_policy_hashes_are_exactly_the_inline_script_and_style() -> None:
    """script-src: the page's one inline module by hash, and 'self' for the client it imports."""
    response, body = request("/")
    html = body.decode()
    csp = directives(headers_of(response)["content-security-policy"][0])
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module">']  # one, inline, no src
    scripts = re.findall(r'<script type="module">(.*?)</script>', html, re.DOTALL)
    styles = re.findall(r"<style\b[^>]*>(.*?)</style>", html, re.DOTALL)
    assert len(scripts) == len(styles) == 1
    assert csp["script-src"] == ["'self'", sha256_source(scripts[0])]
    assert csp["style-src"] == [sha256_source(styles[0])]


def test_self_in_script_src_is_for_the_client_module_only() -> None:
    """'self' is there because the inline module imports /hubbub.js: that is its only import, and
    the page neither evaluates strings nor loads anything else from its origin."""
    _, body = request("/")
    [script] = re.findall(r'<script type="module">(.*?)</script>', body.decode(), re.DOTALL)
    assert re.findall(r"""\bimport\b[^;]*?from\s*["']([^"']+)["']""", script) == ["/hubbub.js"]
    assert "import(" not in script and "eval(" not in script and "new Function" not in script
    assert "new WebSocket" not in script and '"event"' not in script  # no protocol code inline
    response, client = request("/hubbub.js")
    assert response.status_code == 200 and client == page.CLIENT


def test_page_is_self_contained() -> None:
    _, body = request("/")
    html = body.decode()
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html  # /hubbub.js: an import
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith("data:"), url  # nothing from another server or from disk


def test_head_answers_the_headers_without_the_body() -> None:
    response, body = request("/", method="HEAD")
    assert response.status_code == 200
    assert body == b""
    assert "content-security-policy" in headers_of(response)


@pytest.mark.parametrize(
    "host",
    ["evil.example; script-src *", "a b", "x'y", "[::1", "127.0.0.1:8765/x"],
)
def test_a_hostile_host_header_cannot_reach_the_policy(host: str) -> None:
    response, _ = request("/", host=host)
    policy = headers_of(response)["content-security-policy"][0]
    assert directives(policy)["connect-src"] == ["'self'"]
    assert directives(policy)["script-src"] == ["'self'", *page.SCRIPT_SRC.split()]
    assert set(directives(policy)) == set(directives(page.policy(b"127.0.0.1:8765")))  # no directive injected
    assert host not in policy


def test_ipv6_host_is_named_in_connect_src() -> None:
    response, _ = request("/", host="[::1]:8765")
    policy = headers_of(response)["content-security-policy"][0]
    assert "ws://[::1]:8765" in directives(policy)["connect-src"]


@pytest.mark.parametrize(
    "path",
    [
        "/index.html",
        "/static/index.html",
        "/handlers/static/index.html",
        "/handlers/page.py",
        "/core.py",
        "/../core.py",
        "/%2e%2e/core.py",
        "/static/../core.py",
        "//etc/passwd",
        "/README.md",
        "/favicon.ico",
    ],
)
def test_nothing_else_is_served_from_disk(path: str) -> None:
    response, body = request(path)
    assert response.status_code == 404
    assert body == b"not found\n"


def test_get_hubbub_js_answers_the_client_module() -> None:
    response, body = request("/hubbub.js")
    headers = headers_of(response)
    assert response.status_code == 200
    assert headers["content-type"] == ["text/javascript"]
    assert headers["cache-control"] == ["no-cache"]
    assert headers["x-content-type-options"] == ["nosniff"]
    assert headers["access-control-allow-origin"] == ["*"]  # module imports from other origins use CORS
    assert "content-security-policy" not in headers
    assert body == page.CLIENT and b"export function connect(" in body


def test_post_to_the_page_is_refused() -> None:
    response, _ = request("/", method="POST")
    assert response.status_code == 405
    assert headers_of(response)["allow"] == ["GET, HEAD"]


def test_routes_without_headers_of_their_own_keep_no_store() -> None:
    response, _ = request("/healthz")
    headers = headers_of(response)
    assert response.status_code == 200
    assert headers["cache-control"] == ["no-store"]
    assert "content-security-policy" not in headers
