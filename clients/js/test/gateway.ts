/**
 * The real gateway for the SDK's tests: the `switchboard` binary (SWITCHBOARD_BIN, or the
 * workspace's debug build) on loopback, with a config the SDK's behaviour needs (resume,
 * the room envelope, presence, an acked queue), on a temporary data dir.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
export const BIN = process.env.SWITCHBOARD_BIN ?? join(here, "../../../../target/debug/switchboard");

/** The routes both SDKs' tests share. */
export const ROUTES = readFileSync(join(here, "../../../test-routes.toml"), "utf8");

export interface GatewayOptions {
  resume?: boolean;
  resumeWindowSecs?: number;
  /** Serve WebTransport too (a self-signed certificate, its hash in the discovery document). */
  webtransport?: boolean;
  /** Lines added under [rooms]. */
  rooms?: string;
  /** More TOML at the end. */
  extra?: string;
}

export class Gateway {
  private constructor(
    private child: ChildProcess,
    readonly dir: string,
    readonly wsPort: number,
    readonly apiPort: number,
    private readonly config: string,
  ) {}

  get ws(): string {
    return `ws://127.0.0.1:${this.wsPort}/dev`;
  }

  get api(): string {
    return `http://127.0.0.1:${this.apiPort}/dev`;
  }

  static async start(options: GatewayOptions = {}): Promise<Gateway> {
    const dir = mkdtempSync(join(tmpdir(), "sb-sdk-"));
    const [wsPort, apiPort] = [await freePort(), await freePort()];
    const config = `
[server]
listen = "127.0.0.1:${wsPort}"
shards = 2
data_dir = "${join(dir, "data")}"
[management]
listen = "127.0.0.1:${apiPort}"
[api]
stage = "dev"
resume = ${options.resume ?? true}
resume_window_secs = ${options.resumeWindowSecs ?? 30}
[rooms]
history_size = 50
envelope = true
presence_events = true
${options.rooms ?? ""}
[limits]
connects_per_sec_per_ip = 0
max_connections_per_ip = 0
resumes_per_sec_per_ip = 0
resumes_per_sec_per_connection = 0
${ROUTES}
${options.webtransport ? `[server.webtransport]\nlisten = "127.0.0.1:${await freePort()}"\n` : ""}
${options.extra ?? ""}
`;
    const gateway = new Gateway(spawnGateway(dir, config), dir, wsPort, apiPort, config);
    await gateway.ready();
    return gateway;
  }

  /** The embedded demo (`switchboard demo-config`, what `switchboard serve` runs with no
   * config), on free ports and a temporary data dir instead of its fixed ones. */
  static async demo(): Promise<Gateway> {
    const dir = mkdtempSync(join(tmpdir(), "sb-sdk-"));
    const [wsPort, apiPort, wtPort] = [await freePort(), await freePort(), await freePort()];
    const config = execFileSync(BIN, ["demo-config"], { encoding: "utf8" })
      .replace('"127.0.0.1:8080"', `"127.0.0.1:${wsPort}"`)
      .replace('"127.0.0.1:9090"', `"127.0.0.1:${apiPort}"`)
      .replace('"127.0.0.1:4433"', `"127.0.0.1:${wtPort}"`)
      .replace('data_dir = "./data"', `data_dir = "${join(dir, "data")}"`);
    const gateway = new Gateway(spawnGateway(dir, config), dir, wsPort, apiPort, config);
    await gateway.ready();
    return gateway;
  }

  /** Stops it (SIGKILL: no goodbye to clients) and starts it again on the same ports and data. */
  async restart(): Promise<void> {
    await this.kill();
    this.child = spawnGateway(this.dir, this.config);
    await this.ready();
  }

  async stop(): Promise<void> {
    await this.kill("SIGTERM");
    rmSync(this.dir, { recursive: true, force: true });
  }

  private kill(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    if (this.child.exitCode !== null) return Promise.resolve();
    return new Promise((resolve) => {
      this.child.once("exit", () => resolve());
      this.child.kill(signal);
    });
  }

  private async ready(): Promise<void> {
    for (let i = 0; i < 200; i += 1) {
      try {
        if ((await fetch(`http://127.0.0.1:${this.apiPort}/health`)).ok) return;
      } catch {
        // not yet
      }
      await sleep(50);
    }
    throw new Error("the gateway did not come up");
  }

  async post(path: string, body: string): Promise<Response> {
    return fetch(`${this.api}${path}`, { method: "POST", body });
  }

  async get(path: string): Promise<unknown> {
    const response = await fetch(`${this.api}${path}`);
    if (!response.ok) throw new Error(`GET ${path}: ${response.status}`);
    return response.json();
  }
}

function spawnGateway(dir: string, config: string): ChildProcess {
  const path = join(dir, "switchboard.toml");
  writeFileSync(path, config);
  return spawn(BIN, ["serve", "--config", path], { stdio: ["ignore", "ignore", "ignore"], env: { ...process.env, RUST_LOG: "warn" } });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits (bounded) until `condition` holds. */
export async function eventually(what: string, condition: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`${what} within ${ms} ms`);
    await sleep(20);
  }
}

/**
 * A TCP proxy in front of the gateway: `cut()` destroys every connection through it (the
 * client sees its socket die, no close frame), and while `blocked` it refuses new ones, so a
 * test decides how long a client stays away.
 */
export class Proxy {
  blocked = false;
  private sockets = new Set<import("node:net").Socket>();

  private constructor(
    private readonly server: import("node:net").Server,
    readonly port: number,
  ) {}

  static async start(targetPort: number): Promise<Proxy> {
    const net = await import("node:net");
    let proxy: Proxy | undefined;
    const server = net.createServer((client) => {
      if (!proxy || proxy.blocked) {
        client.destroy();
        return;
      }
      const upstream = net.connect(targetPort, "127.0.0.1");
      for (const socket of [client, upstream]) {
        proxy.sockets.add(socket);
        socket.on("close", () => proxy?.sockets.delete(socket));
        socket.on("error", () => {
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    proxy = new Proxy(server, typeof address === "object" && address ? address.port : 0);
    return proxy;
  }

  /** `ws://` through the proxy to `gateway`'s stage. */
  url(stage = "dev"): string {
    return `ws://127.0.0.1:${this.port}/${stage}`;
  }

  cut(): void {
    for (const socket of this.sockets) socket.resetAndDestroy();
    this.sockets.clear();
  }

  get open(): number {
    return this.sockets.size / 2;
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
