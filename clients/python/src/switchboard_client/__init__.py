"""asyncio client for the Switchboard WebSocket gateway: resume with exact counts, acked
sends, rooms with history recovery and presence, reconnect with backoff."""

from .client import AckError, ConnectError, Reconnect, Switchboard
from .room import MessageMeta, Room

__all__ = ["AckError", "ConnectError", "MessageMeta", "Reconnect", "Room", "Switchboard"]
