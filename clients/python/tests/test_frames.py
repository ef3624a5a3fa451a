"""The SDK against the wire contract, ``protocol/frames.json`` (the gateway's tests check
its own frames against the same file): every frame there is one the SDK knows, told apart
from its examples, with the fields the SDK reads."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from switchboard_client.frames import classify

SCHEMA = json.loads((Path(__file__).resolve().parents[3] / "protocol" / "frames.json").read_text())

#: Each schema frame, as the SDK names what it is.
KINDS = {
    "welcome": "welcome",
    "resumed": "resumed",
    "ack": "ack",
    "error": "error",
    "joined": "joined",
    "message": "room",
    "presence": "presence",
    "presence_many": "presence",
    "presence_list": "presence_list",
}


def test_the_sdk_knows_every_frame_of_the_schema() -> None:
    assert sorted(SCHEMA["frames"]) == sorted(KINDS)


def test_each_example_is_told_apart_as_its_frame_with_the_fields_the_sdk_reads() -> None:
    for name, frame in SCHEMA["frames"].items():
        for example in frame["examples"]:
            got = classify(json.dumps(example))
            assert got.kind == KINDS[name], (name, example)
            if got.kind in ("welcome", "resumed"):
                assert got.fields["connectionId"] == example["connectionId"]
                assert got.fields["resumeToken"] == example["resumeToken"]
            elif got.kind == "ack":
                assert got.fields["messageId"] == example["messageId"]
            elif got.kind == "error":
                assert got.fields["message"] == example["message"]
            elif got.kind == "joined":
                assert [got.fields[k] for k in ("room", "epoch", "offset")] == [example[k] for k in ("room", "epoch", "offset")]
            elif got.kind == "room":
                expected = base64.b64decode(example["data_base64"]) if "data_base64" in example else example["data"]
                assert got.data == expected
            elif got.kind == "presence":
                assert got.data["event"] == example["event"]
            elif got.kind == "presence_list":
                assert len(got.data["members"]) == len(example["members"])
