/**
 * examples/chat.mjs, the repository's terminal chat on this SDK, run as its header says
 * against the embedded demo config: two of them in one room hear each other.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { Gateway } from "./gateway.js";

const here = fileURLToPath(new URL(".", import.meta.url));
const EXAMPLE = join(here, "../../../../examples/chat.mjs");

let gateway: Gateway;
before(async () => {
  gateway = await Gateway.demo();
});
after(async () => {
  await gateway?.stop();
});

/** A running example: its output so far, and a wait for a line in it. */
function chat(room: string, name: string) {
  const child: ChildProcessWithoutNullStreams = spawn(process.execPath, [EXAMPLE, room, name], {
    env: { ...process.env, SWITCHBOARD_URL: gateway.ws },
  });
  let out = "";
  let err = "";
  child.stdout.on("data", (chunk) => (out += chunk));
  child.stderr.on("data", (chunk) => (err += chunk));
  const waitFor = async (where: () => string, text: string) => {
    for (let i = 0; i < 200 && !where().includes(text); i += 1) await new Promise((r) => setTimeout(r, 25));
    assert.ok(where().includes(text), `${name} printed ${JSON.stringify(text)}; stdout ${out}; stderr ${err}`);
  };
  return {
    child,
    joined: () => waitFor(() => err, "[joined "),
    heard: (line: string) => waitFor(() => out, line),
    say: (line: string) => child.stdin.write(`${line}\n`),
    exited: () => new Promise<number | null>((resolve) => child.once("exit", resolve)),
  };
}

test("two examples/chat.mjs in one room of the demo hear each other", async () => {
  const alice = chat("lobby", "alice");
  await alice.joined();
  alice.say("hello from alice");
  await alice.heard("alice: hello from alice");
  // Bob comes later and gets the history, then what is said next.
  const bob = chat("lobby", "bob");
  await bob.joined();
  await bob.heard("alice: hello from alice");
  bob.say("hi alice");
  await alice.heard("bob: hi alice");
  for (const example of [alice, bob]) {
    const exited = example.exited();
    example.child.stdin.end();
    assert.equal(await exited, 0, "the end of input closes it");
  }
});
