/**
 * A connection to the gateway that survives lost networks: it reconnects with backoff and
 * full jitter, resumes its session (the same connectionId, every message once and in
 * order, counting what it received), sends again what the gateway never handled, and when
 * a session cannot be resumed starts a new one, rejoins its rooms from where they were and
 * says what could not be recovered.
 */
import { Emitter } from "./emitter.js";
import { classify, type Frame, type Presence } from "./frames.js";
import { Room, type JoinOptions, type RoomLink } from "./room.js";
import {
  ConnectError,
  discover,
  isBrowser,
  openWebSocket,
  openWebTransport,
  type Incoming,
  type Transport,
  type WebSocketLike,
  webSocketClass,
} from "./transport.js";

export type State = "connecting" | "connected" | "reconnecting" | "closed";

export interface ReconnectOptions {
  /** The first retry waits up to this long (full jitter), doubling up to `maxDelayMs`. */
  initialDelayMs?: number;
  maxDelayMs?: number;
  /** Attempts before giving up (state `closed`). */
  maxAttempts?: number;
}

/** The route (`action`) names the gateway's config gives the room integrations. */
export interface Actions {
  join: string;
  leave: string;
  publish: string;
  presence: string;
}

export interface SwitchboardOptions {
  /** The gateway resumes sessions (`[api] resume = true`): wait for its welcome frame,
   * and resume on reconnect. Default true. */
  resume?: boolean;
  /** For a `$connect` authorizer; a function is called again before every reconnect. */
  token?: string | (() => string | Promise<string>);
  /** Where the token goes, as the authorizer's `token` setting names it:
   * `header:NAME` (default outside browsers: `header:Authorization`, as `Bearer …`) or
   * `query:NAME` (default in browsers, which cannot set WebSocket headers: `query:token`). */
  tokenSource?: string;
  protocols?: string[];
  /** In order of preference. Default: WebTransport then WebSocket in browsers when `api`
   * is given, else WebSocket. */
  transports?: ("webtransport" | "websocket")[];
  /** The management API with the stage (`http://host:9090/dev`), for WebTransport's
   * discovery document. */
  api?: string;
  reconnect?: ReconnectOptions | false;
  actions?: Partial<Actions>;
  /** A WebSocket class to use instead of the global one or `ws`. */
  WebSocket?: WebSocketLike;
  /** How long an attempt to connect (or its welcome), a join's `joined` frame or a presence
   * answer may take. Default 10 s. */
  timeoutMs?: number;
  /** How many sent messages are kept to be sent again after a resume. Default 256. */
  resendBuffer?: number;
}

/** An acked send that did not get its ack. */
export class AckError extends Error {
  constructor(
    message: string,
    /** `refused`: the gateway answered with an error; `lost`: the connection (and its
     * session) was lost before the ack, and the message may or may not have been stored. */
    readonly reason: "refused" | "lost",
  ) {
    super(message);
    this.name = "AckError";
  }
}

/** Why the session was replaced by a new one. */
export interface ResetInfo {
  reason: string;
  previousConnectionId: string | null;
}

type Events = {
  state: [state: State];
  message: [data: unknown];
  reset: [info: ResetInfo];
  error: [error: Error];
};

/** Close codes after which reconnecting would not help. */
const FINAL_CLOSE_CODES = new Set([1000, 1002, 1003, 1007, 1009, 1010]);

interface Waiter<T> {
  resolve: (value: T) => void;
  reject: (error: Error) => void;
}

/** A join waiting for its `joined` frame; a second `join()` of the room meanwhile shares it. */
interface PendingJoin extends Waiter<Room> {
  room: Room;
  promise: Promise<Room>;
}

export class Switchboard extends Emitter<Events> {
  connectionId: string | null = null;
  state: State = "closed";

  private readonly options: Required<Pick<SwitchboardOptions, "resume" | "timeoutMs" | "resendBuffer">> &
    SwitchboardOptions;
  private readonly actions: Actions;
  private transport: Transport | null = null;
  private resumeToken: string | null = null;
  /** Data messages received in this session, after each socket's first frame. */
  private received = 0;
  private awaitingFirstFrame = false;
  private firstFrame: Waiter<void> | null = null;
  /** Data messages sent in this session, and the last of them, to send again. */
  private sentCount = 0;
  private sent: { index: number; data: string | Uint8Array }[] = [];
  private acks: (Waiter<string> & { index: number })[] = [];
  private joins = new Map<string, PendingJoin>();
  private presences = new Map<string, Waiter<Presence>[]>();
  private rooms = new Map<string, Room>();
  private connectedWaiters: Waiter<void>[] = [];
  private closing = false;
  /** Resolves `close()` once the close went through. */
  private closed: (() => void) | null = null;

  constructor(
    readonly url: string,
    options: SwitchboardOptions = {},
  ) {
    super();
    this.options = { resume: true, timeoutMs: 10_000, resendBuffer: 256, ...options };
    this.actions = { join: "join", leave: "leave", publish: "publish", presence: "presence", ...options.actions };
  }

  /** Connects; resolves once connected (after the welcome frame when resuming is on). */
  async connect(): Promise<void> {
    if (this.state === "connected") return;
    this.closing = false;
    this.setState("connecting");
    try {
      await this.open(false);
    } catch (error) {
      this.finish(error instanceof Error ? error : new Error(String(error)));
      throw error;
    }
  }

  /** Closes for good (a close frame: the gateway ends the session). */
  async close(): Promise<void> {
    this.closing = true;
    const transport = this.transport;
    if (!transport) {
      this.finish(new Error("closed"));
      return;
    }
    await new Promise<void>((resolve) => {
      this.closed = resolve;
      transport.close(1000, "bye");
      setTimeout(resolve, 2000);
    });
  }

  /** Sends `data` (an object goes as JSON text); waits while reconnecting. */
  async send(data: unknown): Promise<void> {
    await this.whenConnected();
    this.sendData(encode(data));
  }

  /** Sends to a `queue` route with `ack = true`; resolves with the stored message's
   * `messageId`, rejects with an {@link AckError}. */
  async sendAcked(data: unknown): Promise<string> {
    const encoded = encode(data); // first: a value JSON cannot take leaves no waiter behind
    await this.whenConnected();
    return new Promise<string>((resolve, reject) => {
      this.acks.push({ resolve, reject, index: this.sentCount + 1 });
      this.sendData(encoded);
    });
  }

  /** Joins `name`; resolves after the gateway's `joined` frame (a join of a room already
   * joined, or being joined, resolves as that one does). */
  async join(name: string, options: JoinOptions = {}): Promise<Room> {
    const pending = this.joins.get(name);
    if (pending) return pending.promise;
    const existing = this.rooms.get(name);
    if (existing) return existing;
    await this.whenConnected();
    const room = new Room(name, this.roomLink(), options);
    this.rooms.set(name, room);
    return this.sendJoin(room, false);
  }

  /** What carries the connection now: `websocket`, `webtransport`, or `null` between
   * connections. */
  get transportKind(): "websocket" | "webtransport" | null {
    return this.transport?.kind ?? null;
  }

  /** The WebSocket extensions the gateway agreed for this connection (compression shows
   * here as `permessage-deflate; …`); `""` for none, for WebTransport and between
   * connections. */
  get extensions(): string {
    return this.transport?.extensions ?? "";
  }

  /** The rooms joined. */
  get joined(): Room[] {
    return [...this.rooms.values()];
  }

  /** For tests and diagnostics: drops the connection without a close frame, as a lost
   * network would; the client then reconnects and resumes. */
  simulateDrop(): void {
    this.transport?.drop();
  }

  private roomLink(): RoomLink {
    return {
      actions: this.actions,
      sendAction: (fields) => this.send(fields),
      requestPresence: (room) => this.requestPresence(room),
      forget: (room) => {
        this.rooms.delete(room);
      },
    };
  }

  private sendJoin(room: Room, rejoin: boolean): Promise<Room> {
    const fields: Record<string, unknown> = { action: this.actions.join, room: room.name };
    if (rejoin && room.epoch) {
      fields.since = room.offset;
      fields.epoch = room.epoch;
    } else if (!rejoin && room.options.since !== undefined) {
      fields.since = room.options.since;
      if (room.options.epoch) fields.epoch = room.options.epoch;
    } else {
      // A join with `history` (0 included) is answered with `joined`; a plain one is not.
      fields.history = room.options.history ?? 0;
    }
    const previous = this.joins.get(room.name);
    const pending = { room } as PendingJoin;
    pending.promise = this.within(
      new Promise<Room>((resolve, reject) => Object.assign(pending, { resolve, reject })),
      () => {
        if (this.joins.get(room.name) !== pending) return;
        this.joins.delete(room.name);
        if (!rejoin) this.rooms.delete(room.name);
        pending.reject(new Error(`join ${room.name}: no joined frame (is "${this.actions.join}" a room_join route?)`));
      },
    );
    // A join still waiting (a rejoin after a new session overtook it) ends as this one does.
    if (previous) pending.promise.then(previous.resolve, previous.reject);
    this.joins.set(room.name, pending);
    room.rejoining = rejoin;
    this.sendData(encode(fields));
    return pending.promise;
  }

  /** `promise`, with `expire` called if it has not settled within `timeoutMs`. */
  private within<T>(promise: Promise<T>, expire: () => void): Promise<T> {
    const timer = setTimeout(expire, this.options.timeoutMs);
    const settled = () => clearTimeout(timer);
    promise.then(settled, settled);
    return promise;
  }

  private async requestPresence(room: string): Promise<Presence> {
    await this.whenConnected();
    const waiting = this.presences.get(room) ?? [];
    this.presences.set(room, waiting);
    const waiter = {} as Waiter<Presence>;
    const answer = new Promise<Presence>((resolve, reject) => Object.assign(waiter, { resolve, reject }));
    waiting.push(waiter);
    this.sendData(encode({ action: this.actions.presence, room }));
    return this.within(answer, () => {
      const at = waiting.indexOf(waiter);
      if (at < 0) return;
      waiting.splice(at, 1);
      waiter.reject(new Error(`presence of ${room}: no answer (is "${this.actions.presence}" a room_presence route?)`));
    });
  }

  private sendData(data: string | Uint8Array): void {
    if (!this.transport) throw new Error("not connected");
    this.sentCount += 1;
    this.sent.push({ index: this.sentCount, data });
    if (this.sent.length > this.options.resendBuffer) this.sent.shift();
    this.transport.send(data);
  }

  private whenConnected(): Promise<void> {
    if (this.state === "connected") return Promise.resolve();
    if (this.state === "closed") return Promise.reject(new Error("not connected: call connect()"));
    return new Promise((resolve, reject) => this.connectedWaiters.push({ resolve, reject }));
  }

  private setState(state: State): void {
    if (this.state === state) return;
    this.state = state;
    if (state === "connected") {
      for (const waiter of this.connectedWaiters.splice(0)) waiter.resolve();
    }
    this.emit("state", state);
  }

  /** One attempt: a transport, then (resuming) the welcome or resumed frame. */
  private async open(reconnecting: boolean): Promise<void> {
    const { query, headers } = await this.handshakeParameters(reconnecting);
    const transport = await this.openTransport(query, headers);
    if (this.closing) {
      transport.close(1000, "bye");
      throw new ConnectError("closed while connecting");
    }
    this.transport = transport;
    this.awaitingFirstFrame = this.options.resume;
    const first = this.options.resume ? this.waitForFirstFrame(transport) : Promise.resolve();
    transport.listen(
      (raw) => {
        if (this.transport === transport) this.onRaw(raw);
      },
      (code, reason) => this.onClose(transport, code, reason),
    );
    try {
      await first;
    } catch (error) {
      if (this.transport === transport) this.transport = null;
      transport.drop();
      throw error;
    }
    if (this.closing) {
      this.transport = null;
      transport.close(1000, "bye");
      throw new ConnectError("closed while connecting");
    }
    if (!this.options.resume && reconnecting) {
      this.startOver("not resumable");
    }
    this.setState("connected");
    if (!this.options.resume && reconnecting) this.rejoinRooms();
  }

  private waitForFirstFrame(transport: Transport): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.firstFrame = null;
        reject(new ConnectError("no welcome frame: is resume on in the gateway ([api] resume)?"));
      }, this.options.timeoutMs);
      this.firstFrame = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
    });
  }

  private async handshakeParameters(reconnecting: boolean) {
    const query = new URLSearchParams();
    const headers: Record<string, string> = {};
    const browser = isBrowser();
    const token = typeof this.options.token === "function" ? await this.options.token() : this.options.token;
    if (token !== undefined) {
      const source = this.options.tokenSource ?? (browser ? "query:token" : "header:Authorization");
      const [where, name] = source.split(":", 2);
      if (where === "query") query.set(name, token);
      else if (browser) throw new ConnectError("browsers cannot send WebSocket headers: use tokenSource query:NAME");
      else headers[name] = name.toLowerCase() === "authorization" ? `Bearer ${token}` : token;
    }
    if (reconnecting && this.options.resume && this.resumeToken) {
      // Headers where the platform allows them: URLs end up in access logs.
      if (browser) {
        query.set("resume", this.resumeToken);
        query.set("received", String(this.received));
      } else {
        headers["X-Switchboard-Resume"] = this.resumeToken;
        headers["X-Switchboard-Received"] = String(this.received);
      }
    }
    return { query: query.toString(), headers };
  }

  private async openTransport(query: string, headers: Record<string, string>): Promise<Transport> {
    const browser = isBrowser();
    const transports =
      this.options.transports ?? (browser && this.options.api ? ["webtransport", "websocket"] : ["websocket"]);
    let failure: Error = new ConnectError("no transport to try");
    for (const kind of transports) {
      try {
        if (kind === "webtransport") {
          if (!this.options.api) throw new ConnectError("WebTransport needs the `api` option");
          const discovery = await discover(this.options.api);
          return await openWebTransport(discovery, query, Math.min(this.options.timeoutMs, 5000));
        }
        const WebSocketClass = await webSocketClass(this.options.WebSocket);
        const separator = this.url.includes("?") ? "&" : "?";
        const url = query ? `${this.url}${separator}${query}` : this.url;
        return await openWebSocket(WebSocketClass, url, this.options.protocols, headers, this.options.timeoutMs);
      } catch (error) {
        failure = error instanceof Error ? error : new Error(String(error));
      }
    }
    throw failure;
  }

  private onRaw(raw: Incoming): void {
    const frame = classify(raw);
    if (this.awaitingFirstFrame) {
      this.awaitingFirstFrame = false;
      this.onFirstFrame(frame);
      return;
    }
    if (this.options.resume) this.received += 1;
    switch (frame.kind) {
      case "ack":
        this.acks.shift()?.resolve(frame.messageId);
        return;
      case "error":
        return this.onErrorFrame(frame.message);
      case "joined": {
        const waiter = this.joins.get(frame.room);
        const room = waiter?.room ?? this.rooms.get(frame.room);
        if (!room) return;
        this.joins.delete(frame.room);
        room.joined(frame.epoch, frame.offset, frame.recovered, room.rejoining);
        room.rejoining = false;
        waiter?.resolve(room);
        return;
      }
      case "room": {
        const room = this.rooms.get(frame.room);
        if (room) room.deliver(frame.data, frame.offset);
        return;
      }
      case "presence":
        this.rooms.get(frame.room)?.presenceChanged(frame.event);
        return;
      case "presenceList":
        this.presences.get(frame.room)?.shift()?.resolve(frame.list);
        return;
      case "welcome":
      case "resumed":
      case "data":
        this.emit("message", frame.kind === "data" ? frame.data : raw);
    }
  }

  private onFirstFrame(frame: Frame): void {
    const waiter = this.firstFrame;
    this.firstFrame = null;
    if (frame.kind === "resumed") {
      this.resumeToken = frame.resumeToken;
      this.sendAgainUnhandled(frame.handled);
    } else if (frame.kind === "welcome") {
      const previous = this.connectionId;
      const hadSession = this.resumeToken !== null;
      this.connectionId = frame.connectionId;
      this.resumeToken = frame.resumeToken;
      this.received = 0;
      if (hadSession) {
        this.startOver(frame.reason ?? "unknown", previous);
        queueMicrotask(() => this.rejoinRooms());
      }
    } else {
      waiter?.reject(new ConnectError("the first frame was not a welcome: is resume on in the gateway?"));
      return;
    }
    waiter?.resolve();
  }

  /** After a resume: what the gateway never handled is sent again, in order. */
  private sendAgainUnhandled(handled: number | undefined): void {
    if (handled === undefined) {
      this.failAcks("the connection was lost before the ack");
      return;
    }
    const unhandled = this.sent.filter((message) => message.index > handled);
    const lost = this.sentCount - handled - unhandled.length;
    if (lost > 0) {
      // Past the resend buffer: their acks will not come (those up to `handled` still will).
      const never = (ack: { index: number }) => ack.index > handled && ack.index <= handled + lost;
      for (const ack of this.acks.filter(never)) ack.reject(new AckError(`${lost} messages were lost with the connection`, "lost"));
      this.acks = this.acks.filter((ack) => !never(ack));
    }
    for (const message of unhandled) this.transport?.send(message.data);
  }

  /** A new session replaced the lost one: nothing pending will be answered. */
  private startOver(reason: string, previousConnectionId: string | null = this.connectionId): void {
    this.sentCount = 0;
    this.sent = [];
    this.failAcks("the session was lost before the ack");
    this.failPresences("the session was lost");
    this.emit("reset", { reason, previousConnectionId });
  }

  private rejoinRooms(): void {
    for (const room of this.rooms.values()) {
      this.sendJoin(room, true).catch((error) => this.emit("error", error));
    }
  }

  /** Presence requests that will not be answered. */
  private failPresences(why: string): void {
    for (const [name, waiting] of this.presences) {
      for (const waiter of waiting.splice(0)) waiter.reject(new Error(`presence of ${name}: ${why}`));
    }
  }

  private failAcks(message: string, upTo = Infinity): void {
    while (this.acks.length > 0 && this.acks[0].index <= upTo) {
      this.acks.shift()?.reject(new AckError(message, "lost"));
    }
  }

  /** The gateway's error frames carry no route: told apart by what they say. */
  private onErrorFrame(message: string): void {
    const error = new Error(message);
    if ((message.startsWith("Service unavailable: queue") || message === "Internal server error") && this.acks.length) {
      this.acks.shift()?.reject(new AckError(message, "refused"));
      return;
    }
    const about = (name: string) => message.includes(` ${name}`) || message.endsWith(name);
    if (/^(Bad request|Forbidden: room|Limit exceeded)/.test(message) && this.joins.size > 0) {
      const [name, waiter] = [...this.joins].find(([name]) => about(name)) ?? [...this.joins][0];
      this.joins.delete(name);
      this.rooms.delete(name);
      waiter.reject(error);
      return;
    }
    for (const [name, waiting] of this.presences) {
      if (waiting.length > 0 && message.startsWith("Forbidden") && about(name)) {
        waiting.shift()?.reject(error);
        return;
      }
    }
    this.emit("error", error);
  }

  private onClose(transport: Transport, code: number, reason: string): void {
    if (this.transport !== transport) return;
    this.transport = null;
    if (this.firstFrame) {
      // Still opening: the attempt fails, and whoever made it (connect or the retry loop)
      // decides what comes next.
      this.firstFrame.reject(new ConnectError(`closed before the welcome (${code})`));
      this.firstFrame = null;
      return;
    }
    if (this.closing) return this.finish(new Error("closed"));
    if (!this.options.resume) this.failAcks("the connection was lost before the ack");
    if (this.options.reconnect === false || FINAL_CLOSE_CODES.has(code)) {
      return this.finish(new Error(`closed by the gateway (${code}${reason ? ": " + reason : ""})`));
    }
    this.setState("reconnecting");
    void this.reconnect();
  }

  private async reconnect(): Promise<void> {
    const options = this.options.reconnect || {};
    const initial = options.initialDelayMs ?? 250;
    const max = options.maxDelayMs ?? 10_000;
    const attempts = options.maxAttempts ?? Infinity;
    let failure: Error = new Error("gave up reconnecting");
    for (let attempt = 0; attempt < attempts && !this.closing; attempt += 1) {
      // Full jitter: a whole room reconnecting at once spreads over the window.
      await sleep(Math.random() * Math.min(max, initial * 2 ** attempt));
      if (this.closing) break;
      try {
        await this.open(true);
        return;
      } catch (error) {
        failure = error instanceof Error ? error : new Error(String(error));
        const status = error instanceof ConnectError ? error.status : undefined;
        // Refused credentials: only a token provider can do better next time.
        if ((status === 401 || status === 403) && typeof this.options.token !== "function") break;
      }
    }
    this.finish(failure);
  }

  private finish(error: Error): void {
    this.transport = null;
    this.firstFrame = null;
    // A later connect() starts a new session.
    this.resumeToken = null;
    this.rooms.clear();
    this.failAcks("the connection was closed before the ack");
    this.failPresences(error.message);
    for (const waiter of this.connectedWaiters.splice(0)) waiter.reject(error);
    for (const [name, waiter] of this.joins) waiter.reject(new Error(`join ${name}: ${error.message}`));
    this.joins.clear();
    this.setState("closed");
    this.closed?.();
    this.closed = null;
  }
}

function encode(data: unknown): string | Uint8Array {
  if (typeof data === "string" || data instanceof Uint8Array) return data;
  return JSON.stringify(data);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
