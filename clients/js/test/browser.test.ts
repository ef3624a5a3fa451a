/**
 * The SDK in a real browser (Debian's headless Chromium, driven by playwright-core from
 * SWITCHBOARD_PLAYWRIGHT, as the gateway's own browser test): WebTransport first where the
 * gateway offers it, with the same frames (welcome, echo, rooms); WebSocket when the
 * discovery document says it does not, and when it offers WebTransport but the network
 * drops every UDP packet on the way (the SDK gives up on it within its timeout). `.ci/run` sets SWITCHBOARD_REQUIRE_BROWSER=1, so CI
 * never skips this.
 */
import assert from "node:assert/strict";
import { createSocket } from "node:dgram";
import { createRequire } from "node:module";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

import { Gateway } from "./gateway.js";

const playwrightDir = process.env.SWITCHBOARD_PLAYWRIGHT;
const required = process.env.SWITCHBOARD_REQUIRE_BROWSER !== undefined;
const here = fileURLToPath(new URL(".", import.meta.url));

type PageResult = { kind: string | null; id: string | null; heard: unknown[]; got: unknown[] };

describe("in Chromium", { skip: !playwrightDir && !required ? "SWITCHBOARD_PLAYWRIGHT is not set" : false, timeout: 90_000 }, () => {
  let browser: { newPage(): Promise<Page>; close(): Promise<void> };
  let bundle: string;
  let withWebTransport: Gateway;
  let withoutWebTransport: Gateway;

  before(async () => {
    assert.ok(playwrightDir, "SWITCHBOARD_REQUIRE_BROWSER is set but SWITCHBOARD_PLAYWRIGHT is not");
    const require = createRequire(join(playwrightDir, "node_modules", "index.js"));
    const { chromium } = require("playwright-core");
    browser = await chromium.launch({
      executablePath: process.env.SWITCHBOARD_CHROMIUM ?? "/usr/bin/chromium",
      args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const built = await build({
      entryPoints: [join(here, "../../src/index.ts")],
      bundle: true,
      format: "iife",
      globalName: "SwitchboardClient",
      platform: "browser",
      external: ["ws"],
      write: false,
    });
    bundle = built.outputFiles[0].text;
    withWebTransport = await Gateway.start({ webtransport: true });
    withoutWebTransport = await Gateway.start();
  });

  after(async () => {
    await browser?.close();
    await withWebTransport?.stop();
    await withoutWebTransport?.stop();
  });

  async function runInPage(gateway: Gateway, prepare?: (page: Page) => Promise<void>): Promise<PageResult> {
    const page = await browser.newPage();
    await prepare?.(page);
    // A page of the gateway's own (a secure context: loopback), with the SDK added.
    await page.goto(`http://127.0.0.1:${gateway.apiPort}/demo`);
    await page.addScriptTag({ content: bundle });
    return page.evaluate(
      async ({ ws, api }: { ws: string; api: string }) => {
        const { Switchboard } = (window as unknown as { SwitchboardClient: typeof import("../src/index.js") }).SwitchboardClient;
        const sb = new Switchboard(ws, { api, timeoutMs: 5000 });
        await sb.connect();
        const heard: unknown[] = [];
        sb.on("message", (m) => heard.push(m));
        await sb.send({ hello: "from the browser" });
        const room = await sb.join("web");
        const got: unknown[] = [];
        room.on("message", (data) => got.push(data));
        await room.publish({ n: 1 });
        for (let i = 0; i < 200 && (heard.length < 1 || got.length < 1); i += 1) {
          await new Promise((r) => setTimeout(r, 20));
        }
        const result = { kind: sb.transportKind, id: sb.connectionId, heard, got };
        await sb.close();
        return result;
      },
      { ws: gateway.ws, api: gateway.api },
    );
  }

  test("WebTransport first where the gateway offers it", async () => {
    const result = await runInPage(withWebTransport);
    assert.equal(result.kind, "webtransport");
    assert.match(result.id ?? "", /^[A-Za-z0-9_-]{22}$/);
    assert.deepEqual(result.heard, [{ hello: "from the browser" }]);
    assert.deepEqual(result.got, [{ n: 1 }]);
  });

  test("WebSocket when the gateway has no WebTransport", async () => {
    const result = await runInPage(withoutWebTransport);
    assert.equal(result.kind, "websocket");
    assert.deepEqual(result.heard, [{ hello: "from the browser" }]);
    assert.deepEqual(result.got, [{ n: 1 }]);
  });

  test("WebSocket when WebTransport is offered but blocked on the way", async () => {
    // A firewall that drops QUIC: a UDP port that takes every packet and answers none,
    // put in the discovery document's URL in place of the gateway's.
    const blackhole = createSocket("udp4");
    let dropped = 0;
    blackhole.on("message", () => (dropped += 1));
    await new Promise<void>((resolve) => blackhole.bind(0, "127.0.0.1", resolve));
    try {
      const result = await runInPage(withWebTransport, async (page) => {
        await page.route("**/@webtransport", async (route) => {
          const response = await route.fetch();
          const discovery = (await response.json()) as { url: string };
          const url = new URL(discovery.url);
          url.port = String(blackhole.address().port);
          await route.fulfill({ response, json: { ...discovery, url: url.href } });
        });
      });
      assert.ok(dropped > 0, "the browser tried WebTransport first");
      assert.equal(result.kind, "websocket");
      assert.match(result.id ?? "", /^[A-Za-z0-9_-]{22}$/);
      assert.deepEqual(result.heard, [{ hello: "from the browser" }]);
      assert.deepEqual(result.got, [{ n: 1 }]);
    } finally {
      blackhole.close();
    }
  });
});

interface Route {
  fetch(): Promise<{ json(): Promise<unknown> }>;
  fulfill(options: { response: unknown; json: unknown }): Promise<void>;
}

interface Page {
  route(pattern: string, handler: (route: Route) => Promise<void>): Promise<void>;
  goto(url: string): Promise<unknown>;
  addScriptTag(options: { content: string }): Promise<unknown>;
  evaluate<R, A>(f: (arg: A) => Promise<R>, arg: A): Promise<R>;
}
