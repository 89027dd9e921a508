"""hubbub's application routes, written against core's API only (no I/O here)."""

from __future__ import annotations

from hubbub.core import Config, Router

from . import chat, echo, presence, ws


def build_router(config: Config) -> Router:
    """The routes of the wire protocol: v1's /chat, /chat/{room}, /presence and /echo, and v2's /ws."""
    router = Router()
    router.add("/chat", chat.endpoint)
    router.add("/chat/{room}", chat.endpoint)
    router.add("/presence", presence.endpoint)
    router.add("/echo", echo.build(config.max_echo_message_size, config.max_buffer))
    router.add("/ws", ws.endpoint)
    return router
