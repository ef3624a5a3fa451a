/**
 * The two ways to reach the gateway, behind one small interface: a WebSocket (browsers'
 * global, Node's global from 22, or the `ws` package), and WebTransport in browsers that
 * have it (one bidirectional stream; each message `[kind: 1 text, 2 binary][length: u32
 * BE][payload]`, as the gateway frames it).
 */

export type Incoming = string | Uint8Array;

export interface Transport {
  readonly kind: "websocket" | "webtransport";
  /** The WebSocket extensions the gateway agreed (e.g. `permessage-deflate; …`); `""` for
   * none and for WebTransport. */
  readonly extensions: string;
  send(data: string | Uint8Array): void;
  /** Closes with a close frame (a clean end: the gateway does not keep the session). */
  close(code?: number, reason?: string): void;
  /** Drops the connection without a close frame, as a lost network would. */
  drop(): void;
  /** Starts delivering: what arrived since the connection opened (a welcome can come in
   * the same read as the handshake's answer) comes first. */
  listen(onMessage: (data: Incoming) => void, onClose: (code: number, reason: string) => void): void;
}

/** Holds what a transport receives until it is listened to. */
class Inbox {
  private early: Incoming[] = [];
  private closed: [number, string] | null = null;
  private onMessage: ((data: Incoming) => void) | null = null;
  private onClose: ((code: number, reason: string) => void) | null = null;

  message(data: Incoming): void {
    if (this.onMessage) this.onMessage(data);
    else this.early.push(data);
  }

  close(code: number, reason: string): void {
    if (this.onClose) this.onClose(code, reason);
    else this.closed ??= [code, reason];
  }

  listen(onMessage: (data: Incoming) => void, onClose: (code: number, reason: string) => void): void {
    this.onMessage = onMessage;
    this.onClose = onClose;
    for (const data of this.early.splice(0)) onMessage(data);
    if (this.closed) onClose(...this.closed);
  }
}

/** What a WebSocket constructor needs to look like (the browser's, Node's, or `ws`'s). */
export type WebSocketLike = new (
  url: string,
  protocols?: string | string[],
  options?: { headers?: Record<string, string> },
) => {
  binaryType: string;
  readyState: number;
  extensions?: string;
  onopen: ((event: unknown) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  terminate?: () => void;
};

/** Why a connection attempt failed before it opened. */
export class ConnectError extends Error {
  constructor(
    message: string,
    /** The handshake's HTTP status, where the platform tells it (Node). */
    readonly status?: number,
  ) {
    super(message);
    this.name = "ConnectError";
  }
}

export function isBrowser(): boolean {
  return typeof window !== "undefined" && typeof document !== "undefined";
}

/** The WebSocket to use: the one given, the global one, or Node's `ws` package. */
export async function webSocketClass(given?: WebSocketLike): Promise<WebSocketLike> {
  if (given) return given;
  const global = (globalThis as { WebSocket?: WebSocketLike }).WebSocket;
  if (global && isBrowser()) return global;
  // Outside browsers `ws` first: it sends headers (tokens, resume) and drops without a
  // close frame; Node's global WebSocket (22 and later) does neither.
  try {
    const module = (await import("ws")) as unknown as { default: WebSocketLike };
    return module.default;
  } catch {
    if (global) return global;
    throw new ConnectError("no WebSocket here: install the `ws` package (Node < 22)");
  }
}

export function openWebSocket(
  WebSocketClass: WebSocketLike,
  url: string,
  protocols: string[] | undefined,
  headers: Record<string, string>,
  timeoutMs: number,
): Promise<Transport> {
  const options = Object.keys(headers).length > 0 ? { headers } : undefined;
  const socket = new WebSocketClass(url, protocols, options);
  socket.binaryType = "arraybuffer";
  const inbox = new Inbox();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      fail(new ConnectError(`no answer within ${timeoutMs} ms`));
      socket.terminate ? socket.terminate() : socket.close();
    }, timeoutMs);
    let settled = false;
    const fail = (error: ConnectError) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(error);
    };
    // `ws` tells the handshake's status; browsers only say it failed.
    const node = socket as unknown as { once?: (event: string, f: (...a: unknown[]) => void) => void };
    node.once?.("unexpected-response", (_request: unknown, response: unknown) => {
      const status = (response as { statusCode?: number }).statusCode;
      fail(new ConnectError(`the gateway answered ${status}`, status));
      socket.terminate?.();
    });
    socket.onerror = () => fail(new ConnectError("the connection failed"));
    socket.onclose = (event) => fail(new ConnectError(`closed before it opened (${event.code})`));
    socket.onopen = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const transport: Transport = {
        kind: "websocket",
        extensions: socket.extensions ?? "",
        send: (data) => socket.send(data),
        close: (code = 1000, reason = "") => socket.close(code, reason),
        drop: () => (socket.terminate ? socket.terminate() : socket.close(4000, "dropped")),
        listen: (onMessage, onClose) => inbox.listen(onMessage, onClose),
      };
      socket.onmessage = (event) => inbox.message(incoming(event.data));
      socket.onerror = () => {};
      socket.onclose = (event) => inbox.close(event.code, event.reason);
      resolve(transport);
    };
  });
}

function incoming(data: unknown): Incoming {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return String(data);
}

/** `GET {api}/@webtransport`: the session URL and the certificate hashes to trust. */
export interface Discovery {
  url: string;
  serverCertificateHashes?: { algorithm: string; value: string }[];
}

export async function discover(api: string): Promise<Discovery> {
  const response = await fetch(`${api.replace(/\/$/, "")}/@webtransport`, {
    cache: "no-store",
    signal: AbortSignal.timeout(5000),
  });
  if (!response.ok) throw new ConnectError(`WebTransport discovery answered ${response.status}`);
  return (await response.json()) as Discovery;
}

/** Opens a WebTransport session to `discovery.url` (with `query` added) and its stream. */
export async function openWebTransport(
  discovery: Discovery,
  query: string,
  timeoutMs: number,
): Promise<Transport> {
  const WebTransportClass = (globalThis as { WebTransport?: new (url: string, options?: object) => WebTransportSession })
    .WebTransport;
  if (!WebTransportClass) throw new ConnectError("this browser has no WebTransport");
  const options = discovery.serverCertificateHashes
    ? {
        serverCertificateHashes: discovery.serverCertificateHashes.map((hash) => ({
          algorithm: hash.algorithm,
          value: Uint8Array.from(atob(hash.value), (c) => c.charCodeAt(0)),
        })),
      }
    : {};
  const separator = discovery.url.includes("?") ? "&" : "?";
  const session = new WebTransportClass(query ? `${discovery.url}${separator}${query}` : discovery.url, options);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new ConnectError(`WebTransport not ready within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([session.ready, timeout]);
    const stream = await Promise.race([session.createBidirectionalStream(), timeout]);
    clearTimeout(timer);
    return streamTransport(session, stream);
  } catch (error) {
    clearTimeout(timer);
    session.close();
    throw error instanceof ConnectError ? error : new ConnectError(String(error));
  }
}

interface WebTransportSession {
  ready: Promise<unknown>;
  closed: Promise<{ closeCode?: number; reason?: string }>;
  createBidirectionalStream(): Promise<{ readable: ReadableStream<Uint8Array>; writable: WritableStream<Uint8Array> }>;
  close(info?: { closeCode?: number; reason?: string }): void;
}

function streamTransport(
  session: WebTransportSession,
  stream: { readable: ReadableStream<Uint8Array>; writable: WritableStream<Uint8Array> },
): Transport {
  const writer = stream.writable.getWriter();
  const encoder = new TextEncoder();
  const inbox = new Inbox();
  let ended = false;
  const transport: Transport = {
    kind: "webtransport",
    extensions: "",
    send: (data) => {
      const payload = typeof data === "string" ? encoder.encode(data) : data;
      const frame = new Uint8Array(5 + payload.length);
      frame[0] = typeof data === "string" ? 1 : 2;
      new DataView(frame.buffer).setUint32(1, payload.length);
      frame.set(payload, 5);
      void writer.write(frame).catch(() => {});
    },
    close: (code = 1000, reason = "") => session.close({ closeCode: code, reason }),
    drop: () => session.close({ closeCode: 4000, reason: "dropped" }),
    listen: (onMessage, onClose) => inbox.listen(onMessage, onClose),
  };
  const end = (code: number, reason: string) => {
    if (ended) return;
    ended = true;
    inbox.close(code, reason);
  };
  session.closed.then(
    (info) => end(info.closeCode ?? 1005, info.reason ?? ""),
    () => end(1006, "connection lost"),
  );
  void readFrames(stream.readable.getReader(), (message) => inbox.message(message)).finally(() =>
    end(1006, "stream ended"),
  );
  return transport;
}

async function readFrames(reader: ReadableStreamDefaultReader<Uint8Array>, onMessage: (m: Incoming) => void) {
  const decoder = new TextDecoder();
  let buffer = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read().catch(() => ({ value: undefined, done: true }));
    if (done || !value) return;
    const joined = new Uint8Array(buffer.length + value.length);
    joined.set(buffer);
    joined.set(value, buffer.length);
    buffer = joined;
    while (buffer.length >= 5) {
      const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
      if (buffer.length < 5 + length) break;
      const payload = buffer.slice(5, 5 + length);
      onMessage(buffer[0] === 1 ? decoder.decode(payload) : payload);
      buffer = buffer.slice(5 + length);
    }
  }
}
