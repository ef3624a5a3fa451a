/**
 * The SDK against the real gateway: connect and resume, acked sends across a lost
 * connection, rooms with the envelope, presence, recovery after a restart, and the rules
 * for when not to reconnect.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { AckError, Switchboard, type State } from "../src/index.js";
import { eventually, Gateway, Proxy, sleep } from "./gateway.js";

const fast = { initialDelayMs: 20, maxDelayMs: 200 };

describe("switchboard-client", { timeout: 60_000 }, () => {
  let gateway: Gateway;
  before(async () => {
    gateway = await Gateway.start({
      rooms: 'history_durable = true\n[[rooms.class]]\npattern = "volatile:*"\nhistory_durable = false',
    });
  });
  after(() => gateway.stop());

  test("connects after the welcome, echoes, and closes for good", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    const states: State[] = [];
    sb.on("state", (state) => states.push(state));
    await sb.connect();
    assert.match(sb.connectionId ?? "", /^[A-Za-z0-9_-]{22}$/);
    const heard: unknown[] = [];
    sb.on("message", (data) => heard.push(data));
    await sb.send({ hello: "world" });
    await eventually("the echo", () => heard.length === 1);
    assert.deepEqual(heard, [{ hello: "world" }]);
    await sb.close();
    assert.deepEqual(states, ["connecting", "connected", "closed"]);
    await assert.rejects(sb.send("after close"), /not connected/);
  });

  test("a lost connection resumes: the same id, every push once and in order", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    const id = sb.connectionId;
    const heard: unknown[] = [];
    sb.on("message", (data) => heard.push(data));
    for (let n = 1; n <= 5; n += 1) assert.equal((await gateway.post(`/@connections/${id}`, `m${n}`)).status, 200);
    await eventually("the first five", () => heard.length === 5);
    const states: State[] = [];
    sb.on("state", (state) => states.push(state));
    sb.simulateDrop();
    for (let n = 6; n <= 20; n += 1) assert.equal((await gateway.post(`/@connections/${id}`, `m${n}`)).status, 200);
    await eventually("all twenty", () => heard.length >= 20);
    await sleep(100);
    assert.deepEqual(heard, Array.from({ length: 20 }, (_, i) => `m${i + 1}`));
    assert.equal(sb.connectionId, id);
    assert.deepEqual(states, ["reconnecting", "connected"]);
    await sb.close();
  });

  test("acked sends resolve with their messageId, once each, across a lost connection", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    // A value JSON cannot take is refused at once and leaves no waiter behind.
    await assert.rejects(sb.sendAcked({ action: "enqueue", big: 1n }), TypeError);
    const first = await sb.sendAcked({ action: "enqueue", order: 0 });
    assert.match(first, /^[A-Za-z0-9_-]+$/);
    // Sent, then the connection drops before (some of) their acks: each still resolves once,
    // the ones the gateway never got are sent again.
    const sends = Array.from({ length: 20 }, (_, n) => sb.sendAcked({ action: "enqueue", order: n + 1 }));
    sb.simulateDrop();
    const ids = await Promise.all(sends);
    assert.equal(new Set([first, ...ids]).size, 21);
    // The queue holds each exactly once, in order.
    type Event = { body: string; requestContext: { messageId: string; connectionId: string } };
    const stored = (await gateway.get("/@queues/sdk/messages?group=sdk-test&max=100")) as {
      messages: { event: Event | string }[];
    };
    const events = stored.messages.map((m) => (typeof m.event === "string" ? (JSON.parse(m.event) as Event) : m.event));
    const mine = events.filter((event) => event.requestContext.connectionId === sb.connectionId);
    assert.deepEqual(
      mine.map((event) => JSON.parse(event.body).order),
      Array.from({ length: 21 }, (_, n) => n),
    );
    assert.deepEqual(
      mine.map((event) => event.requestContext.messageId),
      [first, ...ids],
    );
    await sb.close();
  });

  test("rooms: join with history, messages with their offsets, publish, presence, leave", async () => {
    for (const n of [1, 2, 3]) await gateway.post("/@rooms/lobby", JSON.stringify({ n }));
    const alice = new Switchboard(gateway.ws, { reconnect: fast });
    await alice.connect();
    const heard: [unknown, number][] = [];
    const room = await alice.join("lobby", { history: 2 });
    room.on("message", (data, meta) => heard.push([data, meta.offset]));
    await eventually("the replay", () => heard.length === 2);
    assert.deepEqual(heard, [
      [{ n: 2 }, 2],
      [{ n: 3 }, 3],
    ]);
    assert.ok(room.epoch.length > 0);
    const events: unknown[] = [];
    room.on("presence", (event) => events.push(event));
    const bob = new Switchboard(gateway.ws, { reconnect: fast });
    await bob.connect();
    const bobs = await bob.join("lobby");
    await eventually("bob's join", () => events.length === 1);
    assert.deepEqual(events[0], { event: "join", connectionId: bob.connectionId, user: null });
    await bobs.publish({ text: "hi from bob" });
    await eventually("bob's message", () => heard.length === 3);
    assert.deepEqual(heard[2], [{ text: "hi from bob" }, 4]);
    const presence = await room.presence();
    assert.equal(presence.count, 2);
    assert.deepEqual(
      presence.members.map((m) => m.connectionId).sort(),
      [alice.connectionId, bob.connectionId].sort(),
    );
    await bobs.leave();
    await eventually("bob's leave", () => events.length === 2);
    assert.equal((events[1] as { event: string }).event, "leave");
    await assert.rejects(alice.join("not a room name"), /invalid room name/);
    await Promise.all([alice.close(), bob.close()]);
  });

  test("two joins of one room at once share it; a join or presence nobody answers times out", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    const [first, second] = await Promise.all([sb.join("shared", { history: 0 }), sb.join("shared")]);
    assert.equal(first, second);
    assert.ok(first.epoch.length > 0, "both resolved after the joined frame");
    await sb.close();
    // Routes that are not room integrations (the echo answers them): a clear error, in time.
    const misrouted = new Switchboard(gateway.ws, { reconnect: fast, timeoutMs: 500, actions: { join: "not-a-join" } });
    await misrouted.connect();
    const error = /join lost: no joined frame \(is "not-a-join" a room_join route\?\)/;
    await assert.rejects(misrouted.join("lost"), error);
    assert.deepEqual(misrouted.joined, [], "a join that failed leaves no room behind");
    await assert.rejects(misrouted.join("lost"), error, "and a second try asks again");
    await misrouted.close();
    const unanswered = new Switchboard(gateway.ws, { reconnect: fast, timeoutMs: 500, actions: { presence: "not-a-presence" } });
    await unanswered.connect();
    const room = await unanswered.join("asked");
    await assert.rejects(room.presence(), /presence of asked: no answer \(is "not-a-presence" a room_presence route\?\)/);
    await unanswered.close();
  });

  test("a session the gateway forgot starts over: reset, rooms rejoined and recovered", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    const kept = await sb.join("kept");
    const volatile = await sb.join("volatile:prices");
    const heard: unknown[] = [];
    kept.on("message", (data) => heard.push(data));
    await gateway.post("/@rooms/kept", "before");
    await eventually("before", () => heard.length === 1);
    const resets: unknown[] = [];
    sb.on("reset", (info) => resets.push(info));
    const recovered: string[] = [];
    kept.on("recovered", (info) => recovered.push(info.room));
    const reset: string[] = [];
    volatile.on("reset", (info) => reset.push(info.room));
    const before = sb.connectionId;
    await gateway.restart();
    // Published while the client is away: recovered from the room's durable history.
    await gateway.post("/@rooms/kept", "while away");
    await eventually("the rejoin", () => recovered.length === 1 && reset.length === 1, 15_000);
    await eventually("the missed message", () => heard.length === 2);
    assert.deepEqual(heard, ["before", "while away"]);
    assert.notEqual(sb.connectionId, before);
    assert.deepEqual(resets, [{ reason: "unknown", previousConnectionId: before }]);
    await sb.close();
  });

  test("acked sends pending when a session is lost reject as lost, and the client carries on", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    await sb.sendAcked({ action: "enqueue", warm: true });
    const reset = new Promise((resolve) => sb.on("reset", resolve));
    const pending = sb.sendAcked({ action: "enqueue", during: "restart" }).then(
      (id) => ({ id }),
      (error: unknown) => ({ error }),
    );
    await gateway.restart();
    const outcome = await pending;
    // Either the gateway stored it before it stopped (acked), or the session was lost.
    if ("error" in outcome) {
      assert.ok(outcome.error instanceof AckError && outcome.error.reason === "lost", String(outcome.error));
    }
    await reset;
    await eventually("connected again", () => sb.state === "connected", 15_000);
    assert.match(await sb.sendAcked({ action: "enqueue", after: "restart" }), /^[A-Za-z0-9_-]+$/);
    await sb.close();
  });

  test("cut by the network while pushes keep coming: resumed, every message once, in order", async () => {
    const proxy = await Proxy.start(gateway.wsPort);
    const sb = new Switchboard(proxy.url(), { reconnect: fast });
    await sb.connect();
    const id = sb.connectionId;
    const heard: unknown[] = [];
    sb.on("message", (data) => heard.push(data));
    const pushing = (async () => {
      for (let n = 1; n <= 200; n += 1) {
        assert.equal((await gateway.post(`/@connections/${id}`, `m${n}`)).status, 200);
        if (n % 50 === 0) proxy.cut();
      }
    })();
    await pushing;
    await eventually("all two hundred", () => heard.length >= 200);
    await sleep(100);
    assert.deepEqual(heard, Array.from({ length: 200 }, (_, i) => `m${i + 1}`));
    assert.equal(sb.connectionId, id);
    await sb.close();
    await proxy.stop();
  });

  test("away past the resume window: a new session, rooms recovered by since", async () => {
    // The gateway says `expired` for one more window after it ended the session.
    const short = await Gateway.start({ resumeWindowSecs: 3 });
    const proxy = await Proxy.start(short.wsPort);
    try {
      const sb = new Switchboard(proxy.url(), { reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
      await sb.connect();
      const room = await sb.join("ticker");
      const heard: unknown[] = [];
      room.on("message", (data) => heard.push(data));
      await short.post("/@rooms/ticker", "1");
      await eventually("the first tick", () => heard.length === 1);
      const resets: { reason: string }[] = [];
      sb.on("reset", (info) => resets.push(info));
      const recovered: string[] = [];
      room.on("recovered", (info) => recovered.push(info.room));
      proxy.blocked = true;
      proxy.cut();
      await short.post("/@rooms/ticker", "2");
      await sleep(4000);
      proxy.blocked = false;
      await eventually("recovered", () => recovered.length === 1, 15_000);
      await eventually("the tick sent while away", () => heard.length === 2);
      assert.deepEqual(heard, [1, 2]);
      assert.deepEqual(resets.map((r) => r.reason), ["expired"]);
      await sb.close();
    } finally {
      await proxy.stop();
      await short.stop();
    }
  });

  test("a connection the backend deletes is not reconnected", async () => {
    const sb = new Switchboard(gateway.ws, { reconnect: fast });
    await sb.connect();
    const response = await fetch(`${gateway.api}/@connections/${sb.connectionId}`, { method: "DELETE" });
    assert.equal(response.status, 204);
    await eventually("closed", () => sb.state === "closed");
    await sleep(300);
    assert.equal(sb.state, "closed");
  });

  test("a refused token is not retried without a provider; a provider is asked again", async () => {
    const secured = await Gateway.start({
      extra: '[authorizer]\ntype = "api_key"\nkeys = ["good-key"]\ntoken = "header:X-Api-Key"\n',
    });
    try {
      const refused = new Switchboard(secured.ws, { token: "bad-key", tokenSource: "header:X-Api-Key", reconnect: fast });
      await assert.rejects(refused.connect(), (error: Error & { status?: number }) => error.status === 403);
      assert.equal(refused.state, "closed");
      let asked = 0;
      const sb = new Switchboard(secured.ws, {
        token: () => {
          asked += 1;
          return "good-key";
        },
        tokenSource: "header:X-Api-Key",
        reconnect: fast,
      });
      await sb.connect();
      sb.simulateDrop();
      await eventually("resumed", () => asked === 2 && sb.state === "connected");
      await sb.close();
    } finally {
      await secured.stop();
    }
  });
});
