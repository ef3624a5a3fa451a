/**
 * What the gateway sends, told apart. The gateway's own frames carry a `type` (welcome,
 * resumed, ack, joined, message, presence); its error frame and a `room_presence` reply
 * have none and are known by their fields. Everything else is the application's.
 */

export type Frame =
  | { kind: "welcome"; connectionId: string; resumeToken: string; resumed?: boolean; reason?: string }
  | { kind: "resumed"; connectionId: string; replayed: number; handled?: number; resumeToken: string }
  | { kind: "ack"; messageId: string }
  | { kind: "joined"; room: string; epoch: string; offset: number; recovered: boolean }
  | { kind: "room"; room: string; offset: number; data: unknown }
  | { kind: "presence"; room: string; event: PresenceEvent }
  | { kind: "presenceList"; room: string; list: Presence }
  | { kind: "error"; message: string; requestId?: string }
  | { kind: "data"; data: unknown };

/** A `presence` frame: a member joined or left, or many changed at once (ask again). */
export type PresenceEvent =
  | { event: "join" | "leave"; connectionId: string; user: string | null }
  | { event: "many"; joined: number; left: number };

/** A room's members, as `room_presence` and `GET @rooms/{room}/presence` give them. */
export interface Presence {
  room: string;
  count: number;
  users: number;
  members: { connectionId: string; user: string | null; joinedAt: number }[];
}

type Json = Record<string, unknown>;

export function classify(raw: string | Uint8Array): Frame {
  if (typeof raw !== "string") return { kind: "data", data: raw };
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    return { kind: "data", data: raw };
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return { kind: "data", data: value };
  const json = value as Json;
  switch (json.type) {
    case "welcome":
      return { kind: "welcome", ...(json as { connectionId: string; resumeToken: string }) };
    case "resumed":
      return { kind: "resumed", ...(json as { connectionId: string; replayed: number; resumeToken: string }) };
    case "ack":
      return { kind: "ack", messageId: String(json.messageId) };
    case "joined":
      return { kind: "joined", ...(json as { room: string; epoch: string; offset: number; recovered: boolean }) };
    case "message":
      if (typeof json.room === "string" && typeof json.offset === "number") {
        const data = "data_base64" in json ? base64Bytes(String(json.data_base64)) : json.data;
        return { kind: "room", room: json.room, offset: json.offset, data };
      }
      break;
    case "presence":
      if (typeof json.room === "string") {
        const { type: _type, room, ...event } = json;
        return { kind: "presence", room, event: event as PresenceEvent };
      }
      break;
    case undefined:
      if (typeof json.message === "string" && "requestId" in json && "connectionId" in json) {
        return { kind: "error", message: json.message, requestId: String(json.requestId) };
      }
      if (typeof json.room === "string" && Array.isArray(json.members) && typeof json.count === "number") {
        return { kind: "presenceList", room: json.room, list: json as unknown as Presence };
      }
  }
  return { kind: "data", data: value };
}

function base64Bytes(text: string): Uint8Array {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}
