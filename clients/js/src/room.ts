/**
 * A room the client joined: its messages (with the envelope: `[rooms] envelope = true`),
 * presence, and where it is in the room's history (epoch and offset), which a rejoin after
 * a lost session uses to recover what it missed.
 */
import { Emitter } from "./emitter.js";
import type { Presence, PresenceEvent } from "./frames.js";

export interface MessageMeta {
  room: string;
  offset: number;
}

export interface JoinOptions {
  /** Replay the room's last N messages on joining. */
  history?: number;
  /** Replay what followed this offset (in `epoch`). */
  since?: number;
  epoch?: string;
}

/** What a rejoin after a lost session could recover (`recovered`) or not (`reset`). */
export interface RecoveryInfo {
  room: string;
  epoch: string;
  offset: number;
}

export type RoomEvents = {
  message: [data: unknown, meta: MessageMeta];
  presence: [event: PresenceEvent];
  recovered: [info: RecoveryInfo];
  reset: [info: RecoveryInfo];
};

/** What the room needs from its client. */
export interface RoomLink {
  sendAction(fields: Record<string, unknown>): Promise<void>;
  requestPresence(room: string): Promise<Presence>;
  forget(room: string): void;
  readonly actions: { leave: string; publish: string };
}

/** At most this many messages wait for a room's first listener. */
const EARLY_LIMIT = 10_000;

export class Room extends Emitter<RoomEvents> {
  /** The room's epoch, from its last `joined` frame ("" if the room keeps no offsets). */
  epoch = "";
  /** The offset of the last message of this room the client received. */
  offset = 0;
  /** @internal: the join in flight is a rejoin after a lost session. */
  rejoining = false;
  /** Messages that came before anyone listened (the replay follows `joined` at once). */
  private early: [unknown, MessageMeta][] = [];

  constructor(
    readonly name: string,
    private readonly link: RoomLink,
    readonly options: JoinOptions,
  ) {
    super();
  }

  /** Publishes `data` to the room (through the `publish` route). */
  async publish(data: unknown): Promise<void> {
    await this.link.sendAction({ action: this.link.actions.publish, room: this.name, data });
  }

  async leave(): Promise<void> {
    this.link.forget(this.name);
    await this.link.sendAction({ action: this.link.actions.leave, room: this.name });
  }

  /** Who is in the room (through a `room_presence` route). */
  presence(): Promise<Presence> {
    return this.link.requestPresence(this.name);
  }

  /** Listens to `event`; the first `message` listener also gets what came before it. */
  override on<K extends keyof RoomEvents>(event: K, listener: (...args: RoomEvents[K]) => void): () => void {
    const off = super.on(event, listener);
    if (event === "message") {
      for (const [data, meta] of this.early.splice(0)) this.emit("message", data, meta);
    }
    return off;
  }

  /** @internal */
  deliver(data: unknown, offset: number): void {
    this.offset = Math.max(this.offset, offset);
    const meta = { room: this.name, offset };
    if (this.listenerCount("message") > 0) this.emit("message", data, meta);
    else if (this.early.length < EARLY_LIMIT) this.early.push([data, meta]);
  }

  /** @internal */
  presenceChanged(event: PresenceEvent): void {
    this.emit("presence", event);
  }

  /** @internal: a `joined` frame; `rejoined` after a lost session. */
  joined(epoch: string, offset: number, recovered: boolean, rejoined: boolean): void {
    // The offset moves with the messages delivered, so a session lost in the middle of the
    // replay that follows asks for the rest of it: it starts where that replay starts.
    if (!recovered) {
      this.offset = offset; // nothing replayed: the room's top
    } else if (epoch !== this.epoch) {
      this.offset = this.options.since ?? Math.max(0, offset - (this.options.history ?? 0));
    }
    this.epoch = epoch;
    if (rejoined) {
      const info = { room: this.name, epoch, offset };
      this.emit(recovered ? "recovered" : "reset", info);
    }
  }
}
