"""Message stores: where chat history lives.

``MemoryStore`` keeps the most recent messages of each room in the process;
it is what ``--store memory`` runs on and what the other stores are measured
against.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

Message = Mapping[str, Any]


class MemoryStore:
    """The last ``per_room`` messages of every room, oldest first; gone on restart."""

    def __init__(self, per_room: int = 1000) -> None:
        self.per_room = per_room
        self._rooms: dict[str, deque[Message]] = {}

    def add(self, room: str, message: Message) -> None:
        log = self._rooms.get(room)
        if log is None:
            log = self._rooms[room] = deque(maxlen=self.per_room)
        log.append(message)

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        """Up to ``limit`` messages older than id ``before`` (or the newest), oldest first."""
        log = self._rooms.get(room, ())
        picked: list[Message] = []
        for message in reversed(log):
            if before is not None and message["id"] >= before:
                continue
            picked.append(message)
            if len(picked) == limit:
                break
        picked.reverse()
        return picked
