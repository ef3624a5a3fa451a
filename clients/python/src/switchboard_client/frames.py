"""What the gateway sends, told apart.

The gateway's own frames carry a ``type`` (welcome, resumed, ack, joined, message,
presence); its error frame and a ``room_presence`` reply have none and are known by their
fields. Everything else is the application's.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Union


@dataclass
class Frame:
    kind: str
    fields: dict[str, Any]
    data: Any = None


def classify(raw: Union[str, bytes]) -> Frame:
    if isinstance(raw, bytes):
        return Frame("data", {}, raw)
    try:
        value = json.loads(raw)
    except ValueError:
        return Frame("data", {}, raw)
    if not isinstance(value, dict):
        return Frame("data", {}, value)
    kind = value.get("type")
    if kind in ("welcome", "resumed", "ack", "joined"):
        return Frame(kind, value)
    if kind == "message" and isinstance(value.get("room"), str) and isinstance(value.get("offset"), int):
        data = base64.b64decode(value["data_base64"]) if "data_base64" in value else value.get("data")
        return Frame("room", value, data)
    if kind == "presence" and isinstance(value.get("room"), str):
        event = {k: v for k, v in value.items() if k not in ("type", "room")}
        return Frame("presence", value, event)
    if kind is None:
        if isinstance(value.get("message"), str) and "requestId" in value and "connectionId" in value:
            return Frame("error", value)
        if isinstance(value.get("room"), str) and isinstance(value.get("members"), list) and "count" in value:
            return Frame("presence_list", value, value)
    return Frame("data", {}, value)
