"""The handshake as a pure decision: ``Gatekeeper.decide`` takes one parsed request and returns a frozen
``Refuse``, ``ServeHttp`` or ``Upgrade``, without a connection or a socket; and ``Router.add`` refuses a
template it could never match as written."""

from __future__ import annotations

import dataclasses

import pytest

from hubbub import core
from hubbub.handlers import build_router

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def request(target: str = "/chat", method: str = "GET", **headers: str) -> core.RequestHead:
    fields = {"Host": "localhost:8765", "Upgrade": "websocket", "Connection": "Upgrade",
              "Sec-WebSocket-Key": KEY.decode(), "Sec-WebSocket-Version": "13"}
    for name, value in headers.items():
        fields[name.replace("_", "-")] = value
    headers_sent = [(k.encode(), v.encode()) for k, v in fields.items() if v]
    return core.RequestHead(method.encode(), target.encode(), headers_sent)


def gate(verifier: core.Verifier | None = None, **config: object) -> core.Gatekeeper:
    cfg = core.Config(**config)  # type: ignore[arg-type]
    return core.Gatekeeper(build_router(cfg), cfg, {"/healthz": core.healthz}, verifier)


def test_an_upgrade_carries_everything_the_connection_opens_with() -> None:
    decision = gate().decide(request("/chat/general?user=alice", Sec_WebSocket_Extensions="permessage-deflate"), 1, 0)
    assert isinstance(decision, core.Upgrade)
    assert decision.params == {"room": "general"} and decision.user == "alice" and decision.expires is None
    assert decision.deflate_bits == 15
    assert decision.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in decision.response
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.user = "mallory"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("req", "from_address", "open_connections", "status"),
    [
        (request("/nowhere"), 1, 0, 404),
        (request("/chat", method="POST"), 1, 0, 405),
        (request("/chat", Sec_WebSocket_Version="8"), 1, 0, 426),
        (request("/chat", Sec_WebSocket_Key="short"), 1, 0, 400),
        (request("/chat", Origin="http://evil.example"), 1, 0, 403),
        (request("/chat/%FE"), 1, 0, 400),
        (request("/chat?user=" + "u" * 300), 1, 0, 400),
        (request("/chat"), 1001, 0, 429),
        (request("/chat"), 1, 10_000, 503),
    ],
    ids=["route", "method", "version", "key", "origin", "room", "user", "per-address", "full"],
)
def test_refusals_are_values_with_their_status(req: core.RequestHead, from_address: int, open_connections: int,
                                               status: int) -> None:
    decision = gate().decide(req, from_address, open_connections)
    assert isinstance(decision, core.Refuse) and decision.status == status, decision


def test_plain_http_is_served_or_refused_by_the_route_table() -> None:
    plain = {"Upgrade": "", "Connection": ""}
    served = gate().decide(request("/healthz", method="HEAD", **plain), 1, 0)
    assert isinstance(served, core.ServeHttp) and served.route is core.healthz and served.head
    refused = gate().decide(request("/chat", **plain), 1, 0)
    assert isinstance(refused, core.Refuse) and refused.status == 426
    assert ("Upgrade", "websocket") in refused.headers


def test_a_verifier_that_raises_is_a_401_that_carries_the_failure() -> None:
    def broken(token: str) -> dict:
        raise OverflowError("exp out of range")

    decision = gate(verifier=broken).decide(request("/chat?token=t"), 1, 0)
    assert isinstance(decision, core.Refuse) and decision.status == 401
    assert isinstance(decision.failure, OverflowError)


@pytest.mark.parametrize(
    ("template", "why"),
    [("/chat/{room}/{room}", "twice"), ("chat", "start with"), ("/chat/{room", "parameter"),
     ("/chat/{9room}", "parameter")],
)
def test_router_refuses_a_bad_template_clearly(template: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        core.Router().add(template, core.Endpoint())
