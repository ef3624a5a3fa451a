// A reconnect storm, measured: N SDK clients (Node) connected through a TCP proxy to a
// gateway are cut at once; how long until every one is connected again (resumed, same
// connectionId), and the gateway's resume rate, sampled every 100 ms from its metrics.
// Usage (after `npm test` built build-test/): node scripts/storm.mjs [N]
import { Switchboard } from "../build-test/src/index.js";
import { Gateway, Proxy } from "../build-test/test/gateway.js";

const count = Number(process.argv[2] ?? 1000);
const gateway = await Gateway.start();
const proxy = await Proxy.start(gateway.wsPort);
const clients = [];
for (let i = 0; i < count; i += 50) {
  const batch = Array.from({ length: Math.min(50, count - i) }, () => new Switchboard(proxy.url()));
  await Promise.all(batch.map((sb) => sb.connect()));
  clients.push(...batch);
}
const ids = clients.map((sb) => sb.connectionId);
const resumed = async () => {
  const text = await (await fetch(`http://127.0.0.1:${gateway.apiPort}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith('switchboard_resumes_total{outcome="resumed"}'));
  return line ? Number(line.split(" ").pop()) : 0;
};
const before = await resumed();
const started = Date.now();
proxy.cut();
let peak = 0;
let last = before;
while (clients.some((sb) => sb.state !== "connected" || sb.transportKind === null) || (await resumed()) - before < count) {
  await new Promise((r) => setTimeout(r, 100));
  const now = await resumed();
  peak = Math.max(peak, (now - last) * 10);
  last = now;
  if (Date.now() - started > 60_000) break;
}
const elapsed = Date.now() - started;
const same = clients.filter((sb, i) => sb.connectionId === ids[i] && sb.state === "connected").length;
console.log(JSON.stringify({ clients: count, back_connected: same, seconds: elapsed / 1000, resumed: (await resumed()) - before, peak_resumes_per_sec: peak }));
await Promise.all(clients.map((sb) => sb.close()));
await proxy.stop();
await gateway.stop();
