"""The demo page (``GET /``) and the JavaScript client it uses (``GET /hubbub.js``).

Both files ship inside the package (``hubbub/handlers/static/``) and are read once, at
import; nothing else is ever served from disk, so there is no path to traverse. The
page is one HTML file with inline CSS and one inline module script that imports
``/hubbub.js`` (no CDN, no build step). Its Content-Security-Policy allows exactly
the inline ``<style>`` and ``<script>`` the file carries, by SHA-256 hash computed
here from the file itself (so an edit to the page can never leave a stale hash
behind), scripts from its own origin (the client module), and WebSocket connections
back to the host the browser asked for.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from hubbub.core import HttpReply, Server

PAGE = (Path(__file__).parent / "static" / "index.html").read_bytes()  # not importlib.resources: 0.7 MB
CLIENT = (Path(__file__).parent / "static" / "hubbub.js").read_bytes()
"""The JavaScript client (one ES module), served at ``GET /hubbub.js``; read once, like the page."""

_HOST = re.compile(rb"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
"""A Host header we are willing to echo into the policy; anything else could inject directives."""


def _inline_hashes(tag: str, html: str) -> str:
    """CSP hash sources for every inline ``<tag>`` element (``<script type="module">`` too), or 'none'."""
    bodies = re.findall(rf'<{tag}(?: type="module")?>(.*?)</{tag}>', html, re.DOTALL)
    sources = [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies]
    return " ".join(sources) or "'none'"


_html = PAGE.decode("utf-8")
SCRIPT_SRC = _inline_hashes("script", _html)
STYLE_SRC = _inline_hashes("style", _html)


def policy(host: bytes | None) -> str:
    """The page's Content-Security-Policy for a request that named ``host``.

    'self' covers same-origin ws:/wss: only in CSP3 browsers (Chrome 71+,
    Safari 16+), so the page's own WebSocket origin is also named explicitly.
    """
    connect = ["'self'"]
    if host is not None and _HOST.fullmatch(host):
        name = host.decode("ascii")
        connect += [f"ws://{name}", f"wss://{name}"]
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {SCRIPT_SRC}",  # 'self': the page's module imports /hubbub.js
            f"style-src {STYLE_SRC}",
            "img-src data:",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ]
    )


def index(server: Server, headers: Mapping[bytes, bytes]) -> HttpReply:
    """``GET /``: the demo page."""
    return (
        200,
        PAGE,
        "text/html; charset=utf-8",
        [
            ("Content-Security-Policy", policy(headers.get(b"host"))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ],
    )


def client_js(server: Server, headers: Mapping[bytes, bytes]) -> HttpReply:
    """``GET /hubbub.js``: the JavaScript client, one ES module (no key needed)."""
    return (
        200,
        CLIENT,
        "text/javascript",  # module scripts are always decoded as UTF-8
        [
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            # a public file: pages of other origins may import it (module scripts are fetched with CORS)
            ("Access-Control-Allow-Origin", "*"),
        ],
    )
