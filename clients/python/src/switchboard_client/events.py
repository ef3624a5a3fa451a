"""A small event emitter: listeners are plain callables, called in order."""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("switchboard_client")


class Emitter:
    def __init__(self) -> None:
        self._listeners: dict[str, list[Callable[..., Any]]] = {}

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[[], None]:
        """Calls ``listener`` on every ``event``; returns a function that stops it."""
        self._listeners.setdefault(event, []).append(listener)
        return lambda: self.off(event, listener)

    def off(self, event: str, listener: Callable[..., Any]) -> None:
        listeners = self._listeners.get(event, [])
        if listener in listeners:
            listeners.remove(listener)

    def _listener_count(self, event: str) -> int:
        return len(self._listeners.get(event, []))

    def _emit(self, event: str, *args: Any) -> None:
        for listener in list(self._listeners.get(event, [])):
            try:
                listener(*args)
            except Exception:  # a listener's bug must not break the frame loop
                log.exception("a %s listener failed", event)
