// Drives the demo chat page (GET /demo) in headless Chromium through playwright-core:
// one page joins a room over WebSocket, another over WebTransport; each sees the other's
// messages, and pushes through the management API reach both pages (the WebSocket one's
// compressed with permessage-deflate, which the page reports having negotiated).
//
// Usage: node browser_chat.cjs MANAGEMENT_URL STAGE SCREENSHOT_PATH
// (NODE_PATH must hold playwright-core; SWITCHBOARD_CHROMIUM names the browser binary.)
"use strict";
const { chromium } = require("playwright-core");

const [api, stage, screenshot] = process.argv.slice(2);
const WAIT = { timeout: 20000 };

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.SWITCHBOARD_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    const join = async (transport, name, room = "lobby") => {
      const page = await browser.newPage();
      page.on("console", (m) => console.error(`[${transport} console] ${m.text()}`));
      page.on("pageerror", (e) => console.error(`[${transport} error] ${e.message}`));
      await page.goto(`${api}/demo`);
      await page.fill("#name", name);
      await page.fill("#room", room);
      await page.selectOption("#transport", transport);
      await page.click("#join-button");
      await page.waitForFunction(() => window.chat.connectionId, null, WAIT);
      return page;
    };
    const heard = (page, line) =>
      page.waitForFunction((l) => window.chat.messages.includes(l), line, WAIT);
    const say = async (page, text) => {
      await page.fill("#text", text);
      await page.click("#send-button");
    };
    const websocket = await join("websocket", "alice");
    const webtransport = await join("webtransport", "bob");

    await say(websocket, "hello over websocket");
    await heard(webtransport, "alice: hello over websocket");
    await heard(websocket, "alice: hello over websocket");
    await say(webtransport, "hello over webtransport");
    await heard(websocket, "bob: hello over webtransport");
    await heard(webtransport, "bob: hello over webtransport");

    const ids = {
      websocket: await websocket.evaluate(() => window.chat.connectionId),
      webtransport: await webtransport.evaluate(() => window.chat.connectionId),
    };
    const pushed = await fetch(`${api}/${stage}/@connections/${ids.webtransport}`, {
      method: "POST",
      body: "pushed by the backend",
    });
    if (pushed.status !== 200) throw new Error(`push answered ${pushed.status}`);
    await heard(webtransport, "pushed by the backend");
    // A push large enough to go compressed reaches the WebSocket page whole.
    const long = "a long push, compressed on the way: " + "tick tock ".repeat(100);
    const deflated = await fetch(`${api}/${stage}/@connections/${ids.websocket}`, {
      method: "POST",
      body: long,
    });
    if (deflated.status !== 200) throw new Error(`push answered ${deflated.status}`);
    await heard(websocket, long);
    const extensions = await websocket.evaluate(() => window.chat.extensions);
    const status = await webtransport.textContent("#status");
    await webtransport.screenshot({ path: screenshot });

    // A room name the gateway refuses: the page says so, and a message typed there is
    // refused visibly instead of vanishing.
    const refused = await join("websocket", "carol", "my room");
    await say(refused, "anyone?");
    await refused.waitForFunction(() => window.chat.errors.length >= 2, null, WAIT);
    const refusal = {
      status: await refused.textContent("#status"),
      errors: await refused.evaluate(() => window.chat.errors),
    };
    console.log(JSON.stringify({ ...ids, status, refusal, extensions }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
