export { Switchboard, AckError } from "./switchboard.js";
export type { State, SwitchboardOptions, ReconnectOptions, Actions, ResetInfo } from "./switchboard.js";
export { Room } from "./room.js";
export type { JoinOptions, MessageMeta, RecoveryInfo } from "./room.js";
export type { Presence, PresenceEvent } from "./frames.js";
export { ConnectError } from "./transport.js";
export type { WebSocketLike } from "./transport.js";
