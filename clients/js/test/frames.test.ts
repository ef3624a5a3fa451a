/**
 * The SDK against the wire contract, `protocol/frames.json` (the gateway's tests check its
 * own frames against the same file): every frame there is one the SDK knows, told apart
 * from its examples, with the fields the SDK reads.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { classify, type Frame } from "../src/frames.js";

const here = fileURLToPath(new URL(".", import.meta.url));
const schema = JSON.parse(readFileSync(join(here, "../../../../protocol/frames.json"), "utf8")) as {
  frames: Record<string, { examples: Record<string, unknown>[] }>;
};

/** Each schema frame, as the SDK names what it is. */
const KINDS: Record<string, Frame["kind"]> = {
  welcome: "welcome",
  resumed: "resumed",
  ack: "ack",
  error: "error",
  joined: "joined",
  message: "room",
  presence: "presence",
  presence_many: "presence",
  presence_list: "presenceList",
};

test("the SDK knows every frame of protocol/frames.json", () => {
  assert.deepEqual(Object.keys(schema.frames).sort(), Object.keys(KINDS).sort());
});

test("each example is told apart as its frame, with the fields the SDK reads", () => {
  for (const [name, { examples }] of Object.entries(schema.frames)) {
    for (const example of examples) {
      const frame = classify(JSON.stringify(example));
      assert.equal(frame.kind, KINDS[name], `${name}: ${JSON.stringify(example)}`);
      switch (frame.kind) {
        case "welcome":
        case "resumed":
          assert.equal(frame.connectionId, example.connectionId);
          assert.equal(frame.resumeToken, example.resumeToken);
          break;
        case "ack":
          assert.equal(frame.messageId, example.messageId);
          break;
        case "error":
          assert.equal(frame.message, example.message);
          break;
        case "joined":
          assert.deepEqual([frame.room, frame.epoch, frame.offset], [example.room, example.epoch, example.offset]);
          break;
        case "room":
          assert.equal(frame.offset, example.offset);
          if ("data_base64" in example) {
            assert.deepEqual(frame.data, new Uint8Array(Buffer.from(String(example.data_base64), "base64")));
          } else {
            assert.deepEqual(frame.data, example.data);
          }
          break;
        case "presence":
          assert.equal(frame.event.event, example.event);
          break;
        case "presenceList":
          assert.equal(frame.list.members.length, (example.members as unknown[]).length);
          break;
      }
    }
  }
});
