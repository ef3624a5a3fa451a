// A terminal chat on the TypeScript SDK, against the embedded demo (`switchboard serve`):
//
//   (cd clients/js && npm ci && npm run build)
//   node examples/chat.mjs lobby alice        # and in a second terminal:
//   node examples/chat.mjs lobby bob
//
// Lines typed are published to the room, and the room's last 10 messages and everything said
// after them are printed. Drop the network for a moment: it resumes, same connectionId,
// nothing missed. SWITCHBOARD_URL points it elsewhere.
import { createInterface } from "node:readline";

import { Switchboard } from "../clients/js/dist/index.js";

const [room = "lobby", name = `guest-${process.pid}`] = process.argv.slice(2);
const sb = new Switchboard(process.env.SWITCHBOARD_URL ?? "ws://127.0.0.1:8080/dev");
const print = (data) => console.log(typeof data === "string" ? data : JSON.stringify(data));
sb.on("state", (state) => console.error(`[${state}]`));
sb.on("message", print); // a room without the envelope (the demo's) delivers here
await sb.connect();
const chat = await sb.join(room, { history: 10 });
chat.on("message", print); // a room with `envelope = true` delivers here, with its offset
console.error(`[joined ${room} as ${sb.connectionId}]`);
for await (const line of createInterface({ input: process.stdin })) {
  if (line.trim()) await chat.publish(`${name}: ${line}`);
}
await sb.close();
