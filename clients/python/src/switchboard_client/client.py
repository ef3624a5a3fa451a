"""A connection to the gateway that survives lost networks.

It reconnects with backoff and full jitter, resumes its session (the same connectionId,
every message once and in order, counting what it received), sends again what the gateway
never handled, and when a session cannot be resumed starts a new one, rejoins its rooms from
where they were and says what could not be recovered.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Union

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .events import Emitter
from .frames import Frame, classify
from .room import Room

TokenProvider = Union[str, Callable[[], Union[str, Awaitable[str]]]]

#: Close codes after which reconnecting would not help.
FINAL_CLOSE_CODES = {1000, 1002, 1003, 1007, 1009, 1010}


@dataclass
class Reconnect:
    """The first retry waits up to ``initial_delay`` seconds (full jitter), doubling up to
    ``max_delay``; ``max_attempts`` before giving up (state ``closed``)."""

    initial_delay: float = 0.25
    max_delay: float = 10.0
    max_attempts: Optional[int] = None


class ConnectError(Exception):
    """An attempt to connect failed before it opened; ``status`` is the handshake's."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class AckError(Exception):
    """An acked send that did not get its ack. ``reason``: ``refused`` (the gateway
    answered with an error) or ``lost`` (the session was lost before the ack; the message
    may or may not have been stored)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Switchboard(Emitter):
    """Events: ``state`` (connecting, connected, reconnecting, closed), ``message`` (data
    of a direct push or reply), ``reset`` (a dict with reason and previous_connection_id:
    the session was replaced), ``error`` (an error frame nothing waited for)."""

    def __init__(
        self,
        url: str,
        *,
        resume: bool = True,
        token: Optional[TokenProvider] = None,
        token_source: str = "header:Authorization",
        protocols: Optional[list[str]] = None,
        reconnect: Union[Reconnect, bool] = True,
        actions: Optional[dict[str, str]] = None,
        timeout: float = 10.0,
        resend_buffer: int = 256,
    ):
        super().__init__()
        self.url = url
        self.resume = resume
        self.token = token
        self.token_source = token_source
        self.protocols = protocols
        self.reconnect_options: Optional[Reconnect] = (
            Reconnect() if reconnect is True else reconnect if isinstance(reconnect, Reconnect) else None
        )
        self.actions = {"join": "join", "leave": "leave", "publish": "publish", "presence": "presence", **(actions or {})}
        self.timeout = timeout
        self.resend_buffer = resend_buffer
        self.connection_id: Optional[str] = None
        self.state = "closed"
        self._socket: Optional[ClientConnection] = None
        self._reader: Optional[asyncio.Task] = None
        self._resume_token: Optional[str] = None
        self._received = 0
        self._sent_count = 0
        self._sent: deque[tuple[int, Union[str, bytes]]] = deque(maxlen=resend_buffer)
        self._acks: deque[tuple[int, asyncio.Future]] = deque()
        self._joins: dict[str, tuple[asyncio.Future, Room]] = {}
        self._presences: dict[str, deque[asyncio.Future]] = {}
        self._rooms: dict[str, Room] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self._reconnecting: Optional[asyncio.Task] = None
        self._tasks: set[asyncio.Task] = set()

    # The application's side.

    async def connect(self) -> None:
        """Connects; returns once connected (after the welcome frame when resuming is on)."""
        if self.state == "connected":
            return
        self._closing = False
        self._set_state("connecting")
        try:
            await self._open(reconnecting=False)
        except Exception as error:
            self._finish(error)
            raise

    async def close(self) -> None:
        """Closes for good (a close frame: the gateway ends the session)."""
        self._closing = True
        if self._reconnecting:
            self._reconnecting.cancel()
        socket = self._socket
        if socket is not None:
            await socket.close()
            if self._reader:
                await asyncio.wait([self._reader], timeout=2)
        self._finish(ConnectionError("closed"))

    async def send(self, data: Any) -> None:
        """Sends ``data`` (anything but str or bytes goes as JSON text); waits while reconnecting."""
        await self._when_connected()
        await self._send_data(_encode(data))

    async def send_acked(self, data: Any) -> str:
        """Sends to a ``queue`` route with ``ack = true``; returns the stored message's
        ``messageId``, raises :class:`AckError`."""
        encoded = _encode(data)  # first: a value JSON cannot take leaves no waiter behind
        await self._when_connected()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._acks.append((self._sent_count + 1, future))
        await self._send_data(encoded)
        return await future

    async def join(self, name: str, *, history: Optional[int] = None, since: Optional[int] = None, epoch: Optional[str] = None) -> Room:
        """Joins ``name``; returns after the gateway's ``joined`` frame (a join of a room
        already joined, or being joined, returns as that one does)."""
        pending = self._joins.get(name)
        if pending is not None and not pending[0].done():
            return await asyncio.shield(pending[0])
        if name in self._rooms:
            return self._rooms[name]
        await self._when_connected()
        room = Room(name, self, history, since, epoch)
        self._rooms[name] = room
        return await self._send_join(room, rejoin=False)

    @property
    def rooms(self) -> list[Room]:
        return list(self._rooms.values())

    def simulate_drop(self) -> None:
        """For tests and diagnostics: drops the connection without a close frame, as a lost
        network would; the client then reconnects and resumes."""
        if self._socket is not None:
            self._socket.transport.abort()

    # Rooms.

    def _forget(self, name: str) -> None:
        self._rooms.pop(name, None)

    async def _send_join(self, room: Room, rejoin: bool) -> Room:
        fields: dict[str, Any] = {"action": self.actions["join"], "room": room.name}
        if rejoin and room.epoch:
            fields.update(since=room.offset, epoch=room.epoch)
        elif not rejoin and room.since is not None:
            fields["since"] = room.since
            if room.requested_epoch:
                fields["epoch"] = room.requested_epoch
        else:
            # A join with `history` (0 included) is answered with `joined`; a plain one is not.
            fields["history"] = room.history or 0
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        previous = self._joins.pop(room.name, None)
        if previous and not previous[0].done():
            # A join still waiting (a rejoin after a new session overtook it) ends as this one does.
            future.add_done_callback(lambda done: _settle_like(previous[0], done))
        self._joins[room.name] = (future, room)
        room._rejoining = rejoin

        def expire() -> Exception:
            if self._joins.get(room.name, (None, None))[0] is future:
                del self._joins[room.name]
                if not rejoin:
                    self._rooms.pop(room.name, None)
            return TimeoutError(f'join {room.name}: no joined frame (is "{self.actions["join"]}" a room_join route?)')

        await self._send_data(_encode(fields))
        return await self._answer_within_timeout(future, expire)

    async def _request_presence(self, room: str) -> dict:
        await self._when_connected()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        waiting = self._presences.setdefault(room, deque())
        waiting.append(future)

        def expire() -> Exception:
            if future in waiting:
                waiting.remove(future)
            return TimeoutError(f'presence of {room}: no answer (is "{self.actions["presence"]}" a room_presence route?)')

        await self._send_data(_encode({"action": self.actions["presence"], "room": room}))
        return await self._answer_within_timeout(future, expire)

    async def _answer_within_timeout(self, future: asyncio.Future, expire: Callable[[], Exception]) -> Any:
        """``future``'s result; past ``timeout`` seconds, ``expire()`` says why it fails
        (for everyone waiting on it)."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except asyncio.TimeoutError:
            if not future.done():
                future.set_exception(expire())
            return await future

    # Sending.

    async def _send_data(self, data: Union[str, bytes]) -> None:
        self._sent_count += 1
        self._sent.append((self._sent_count, data))
        socket = self._socket
        if socket is None:
            return  # sent again after the resume, if the gateway never handled it
        try:
            await socket.send(data)
        except ConnectionClosed:
            pass  # likewise

    async def _when_connected(self) -> None:
        if self.state == "closed":
            raise ConnectionError("not connected: call connect()")
        if self.state != "connected":
            await self._connected.wait()
            if self.state != "connected":
                raise ConnectionError("the connection was closed")

    def _set_state(self, state: str) -> None:
        if self.state == state:
            return
        self.state = state
        if state == "connected":
            self._connected.set()
        else:
            self._connected.clear()
        self._emit("state", state)

    # Connecting.

    async def _open(self, reconnecting: bool) -> None:
        url, headers = await self._handshake(reconnecting)
        try:
            socket = await connect(
                url,
                additional_headers=headers,
                subprotocols=self.protocols,
                open_timeout=self.timeout,
                max_size=None,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            raise ConnectError(f"the gateway answered {status}", status) from error
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as error:
            raise ConnectError(f"the connection failed: {error}") from error
        if self._closing:
            await socket.close()
            raise ConnectError("closed while connecting")
        self._socket = socket
        if self.resume:
            try:
                first = await asyncio.wait_for(socket.recv(), self.timeout)
            except (asyncio.TimeoutError, ConnectionClosed) as error:
                self._socket = None
                socket.transport.abort()
                raise ConnectError("no welcome frame: is resume on in the gateway ([api] resume)?") from error
            if not self._on_first_frame(classify(first)):
                self._socket = None
                socket.transport.abort()
                raise ConnectError("the first frame was not a welcome: is resume on in the gateway?")
        elif reconnecting:
            self._start_over("not resumable")
            self._rejoin_rooms()
        self._reader = asyncio.create_task(self._read(socket))
        self._set_state("connected")

    async def _handshake(self, reconnecting: bool) -> tuple[str, dict[str, str]]:
        headers: dict[str, str] = {}
        query: dict[str, str] = {}
        if self.token is not None:
            token = self.token() if callable(self.token) else self.token
            if inspect.isawaitable(token):
                token = await token
            where, _, name = self.token_source.partition(":")
            if where == "query":
                query[name] = str(token)
            else:
                headers[name] = f"Bearer {token}" if name.lower() == "authorization" else str(token)
        if reconnecting and self.resume and self._resume_token:
            # Headers, not the URL: URLs end up in access logs.
            headers["X-Switchboard-Resume"] = self._resume_token
            headers["X-Switchboard-Received"] = str(self._received)
        url = self.url
        if query:
            from urllib.parse import urlencode

            url += ("&" if "?" in url else "?") + urlencode(query)
        return url, headers

    def _on_first_frame(self, frame: Frame) -> bool:
        if frame.kind == "resumed":
            self._resume_token = frame.fields["resumeToken"]
            self._send_again_unhandled(frame.fields.get("handled"))
            return True
        if frame.kind != "welcome":
            return False
        previous = self.connection_id
        had_session = self._resume_token is not None
        self.connection_id = frame.fields["connectionId"]
        self._resume_token = frame.fields["resumeToken"]
        self._received = 0
        if had_session:
            self._start_over(frame.fields.get("reason", "unknown"), previous)
            # Before anything waiting to send goes: a publish must find its room joined.
            self._rejoin_rooms()
        return True

    def _send_again_unhandled(self, handled: Optional[int]) -> None:
        """After a resume: what the gateway never handled is sent again, in order."""
        if handled is None:
            self._fail_acks("the connection was lost before the ack")
            return
        unhandled = [(index, data) for index, data in self._sent if index > handled]
        lost = self._sent_count - handled - len(unhandled)
        if lost > 0:
            # Past the resend buffer: their acks will not come (those up to `handled` still will).
            kept = deque()
            for index, future in self._acks:
                if handled < index <= handled + lost:
                    if not future.done():
                        future.set_exception(AckError(f"{lost} messages were lost with the connection", "lost"))
                else:
                    kept.append((index, future))
            self._acks = kept
        if unhandled and self._socket is not None:
            self._spawn(_send_all(self._socket, [data for _, data in unhandled]))

    def _start_over(self, reason: str, previous: Optional[str] = None) -> None:
        """A new session replaced the lost one: nothing pending will be answered."""
        self._sent_count = 0
        self._sent.clear()
        self._fail_acks("the session was lost before the ack")
        self._fail_presences("the session was lost")
        self._emit("reset", {"reason": reason, "previous_connection_id": previous or self.connection_id})

    def _rejoin_rooms(self) -> None:
        for room in list(self._rooms.values()):
            self._spawn(self._send_join(room, rejoin=True))

    def _spawn(self, work) -> None:
        """Runs ``work`` in the background, kept until done; a failure becomes an ``error`` event."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self._emit("error", task.exception())

        task.add_done_callback(done)

    def _fail_presences(self, why: str) -> None:
        """Presence requests that will not be answered."""
        for name, waiting in self._presences.items():
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_exception(ConnectionError(f"presence of {name}: {why}"))

    def _fail_acks(self, message: str, up_to: float = float("inf")) -> None:
        while self._acks and self._acks[0][0] <= up_to:
            _, future = self._acks.popleft()
            if not future.done():
                future.set_exception(AckError(message, "lost"))

    # Receiving.

    async def _read(self, socket: ClientConnection) -> None:
        try:
            async for raw in socket:
                try:
                    self._on_raw(raw)
                except Exception as error:  # a malformed frame must not stop the reading
                    self._emit("error", error)
        except ConnectionClosed:
            pass
        finally:
            code = socket.close_code if socket.close_code is not None else 1006
            self._on_close(socket, code, socket.close_reason or "")

    def _on_raw(self, raw: Union[str, bytes]) -> None:
        if self.resume:
            self._received += 1
        frame = classify(raw)
        fields = frame.fields
        if frame.kind == "ack":
            if self._acks:
                _, future = self._acks.popleft()
                if not future.done():
                    future.set_result(fields["messageId"])
        elif frame.kind == "error":
            self._on_error_frame(fields["message"])
        elif frame.kind == "joined":
            name = fields["room"]
            waiter = self._joins.pop(name, None)
            room = waiter[1] if waiter else self._rooms.get(name)
            if room is None:
                return
            room._joined(fields["epoch"], fields["offset"], fields["recovered"])
            if waiter and not waiter[0].done():
                waiter[0].set_result(room)
        elif frame.kind == "room":
            room = self._rooms.get(fields["room"])
            if room is not None:
                room._deliver(frame.data, fields["offset"])
        elif frame.kind == "presence":
            room = self._rooms.get(fields["room"])
            if room is not None:
                room._emit("presence", frame.data)
        elif frame.kind == "presence_list":
            waiting = self._presences.get(fields["room"])
            if waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_result(frame.data)
        else:
            self._emit("message", frame.data if frame.kind == "data" else raw)

    def _on_error_frame(self, message: str) -> None:
        """The gateway's error frames carry no route: told apart by what they say."""
        error = RuntimeError(message)
        if (message.startswith("Service unavailable: queue") or message == "Internal server error") and self._acks:
            _, future = self._acks.popleft()
            if not future.done():
                future.set_exception(AckError(message, "refused"))
            return

        def about(name: str) -> bool:
            return f" {name}" in message or message.endswith(name)

        if message.startswith(("Bad request", "Forbidden: room", "Limit exceeded")) and self._joins:
            name = next((n for n in self._joins if about(n)), next(iter(self._joins)))
            future, _ = self._joins.pop(name)
            self._rooms.pop(name, None)
            if not future.done():
                future.set_exception(error)
            return
        for name, waiting in self._presences.items():
            if waiting and message.startswith("Forbidden") and about(name):
                future = waiting.popleft()
                if not future.done():
                    future.set_exception(error)
                return
        self._emit("error", error)

    def _on_close(self, socket: ClientConnection, code: int, reason: str) -> None:
        if self._socket is not socket:
            return
        self._socket = None
        if self._closing:
            self._finish(ConnectionError("closed"))
            return
        if not self.resume:
            self._fail_acks("the connection was lost before the ack")
        if self.reconnect_options is None or code in FINAL_CLOSE_CODES:
            self._finish(ConnectionError(f"closed by the gateway ({code}{': ' + reason if reason else ''})"))
            return
        self._set_state("reconnecting")
        self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        options = self.reconnect_options or Reconnect()
        failure: Exception = ConnectionError("gave up reconnecting")
        attempt = 0
        while not self._closing and (options.max_attempts is None or attempt < options.max_attempts):
            # Full jitter: a whole room reconnecting at once spreads over the window.
            await asyncio.sleep(random.random() * min(options.max_delay, options.initial_delay * 2**attempt))
            attempt += 1
            if self._closing:
                break
            try:
                await self._open(reconnecting=True)
                return
            except Exception as error:  # a token provider's too: the next attempt may do better
                failure = error
                # Refused credentials: only a token provider can do better next time.
                if isinstance(error, ConnectError) and error.status in (401, 403) and not callable(self.token):
                    break
        self._finish(failure)

    def _finish(self, error: BaseException) -> None:
        self._socket = None
        # A later connect() starts a new session.
        self._resume_token = None
        self._rooms.clear()
        self._fail_acks("the connection was closed before the ack")
        self._fail_presences(str(error))
        for name, (future, _) in list(self._joins.items()):
            if not future.done():
                future.set_exception(ConnectionError(f"join {name}: {error}"))
        self._joins.clear()
        self._set_state("closed")
        self._connected.set()  # wakes waiters, who find it closed
        self._connected.clear()


def _encode(data: Any) -> Union[str, bytes]:
    if isinstance(data, (str, bytes)):
        return data
    return json.dumps(data, separators=(",", ":"))


async def _send_all(socket: ClientConnection, messages: list[Union[str, bytes]]) -> None:
    """Sends in order; a socket lost meanwhile leaves the rest to the next resume."""
    try:
        for data in messages:
            await socket.send(data)
    except ConnectionClosed:
        pass


def _settle_like(target: asyncio.Future, source: asyncio.Future) -> None:
    """Ends ``target`` as ``source`` ended."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())
