"""A room the client joined: its messages (with the envelope, ``[rooms] envelope = true``),
presence, and where it is in the room's history (epoch and offset), which a rejoin after a
lost session uses to recover what it missed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from .events import Emitter

if TYPE_CHECKING:
    from .client import Switchboard

#: At most this many messages wait for a room's first listener.
EARLY_LIMIT = 10_000


@dataclass(frozen=True)
class MessageMeta:
    room: str
    offset: int


class Room(Emitter):
    """Events: ``message`` (data, meta), ``presence`` (event dict), ``recovered`` and
    ``reset`` (a dict with room, epoch, offset) after a rejoin that followed a lost session."""

    def __init__(self, name: str, client: "Switchboard", history: Optional[int], since: Optional[int], epoch: Optional[str]):
        super().__init__()
        self.name = name
        self.history = history
        self.since = since
        self.requested_epoch = epoch
        #: The room's epoch, from its last ``joined`` frame ("" if it keeps no offsets).
        self.epoch = ""
        #: The offset of the last message of this room the client received.
        self.offset = 0
        self._client = client
        self._rejoining = False
        self._early: list[tuple[Any, MessageMeta]] = []

    async def publish(self, data: Any) -> None:
        await self._client.send({"action": self._client.actions["publish"], "room": self.name, "data": data})

    async def leave(self) -> None:
        self._client._forget(self.name)
        await self._client.send({"action": self._client.actions["leave"], "room": self.name})

    async def presence(self) -> dict:
        """Who is in the room (through a ``room_presence`` route)."""
        return await self._client._request_presence(self.name)

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[[], None]:
        """Listens to ``event``; the first ``message`` listener also gets what came before it."""
        off = super().on(event, listener)
        if event == "message":
            early, self._early = self._early, []
            for data, meta in early:
                self._emit("message", data, meta)
        return off

    def _deliver(self, data: Any, offset: int) -> None:
        self.offset = max(self.offset, offset)
        meta = MessageMeta(self.name, offset)
        if self._listener_count("message"):
            self._emit("message", data, meta)
        elif len(self._early) < EARLY_LIMIT:
            self._early.append((data, meta))

    def _joined(self, epoch: str, offset: int, recovered: bool) -> None:
        # The offset moves with the messages delivered, so a session lost in the middle of the
        # replay that follows asks for the rest of it: it starts where that replay starts.
        if not recovered:
            self.offset = offset  # nothing replayed: the room's top
        elif epoch != self.epoch:
            self.offset = self.since if self.since is not None else max(0, offset - (self.history or 0))
        self.epoch = epoch
        if self._rejoining:
            self._rejoining = False
            self._emit("recovered" if recovered else "reset", {"room": self.name, "epoch": epoch, "offset": offset})
