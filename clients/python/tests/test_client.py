"""The SDK against the real gateway: connect and resume, acked sends across a lost
connection, rooms with the envelope, presence, recovery after a restart, and the rules for
when not to reconnect. The same behaviour as clients/js, test for test."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from gateway import Gateway, Proxy, eventually, in_thread
from switchboard_client import AckError, ConnectError, Reconnect, Switchboard

FAST = Reconnect(initial_delay=0.02, max_delay=0.2)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_connects_after_the_welcome_echoes_and_closes_for_good(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        states: list[str] = []
        sb.on("state", states.append)
        await sb.connect()
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", sb.connection_id or "")
        heard: list = []
        sb.on("message", heard.append)
        await sb.send({"hello": "world"})
        await eventually("the echo", lambda: len(heard) == 1)
        assert heard == [{"hello": "world"}]
        await sb.close()
        assert states == ["connecting", "connected", "closed"]
        with pytest.raises(ConnectionError, match="not connected"):
            await sb.send("after close")

    run(main())


def test_a_lost_connection_resumes_with_the_same_id_and_every_push_once_in_order(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        heard: list = []
        sb.on("message", heard.append)
        push = lambda n: gateway.request("POST", f"/@connections/{sb.connection_id}", f"m{n}")  # noqa: E731
        for n in range(1, 6):
            assert (await in_thread(push, n))[0] == 200
        await eventually("the first five", lambda: len(heard) == 5)
        states: list[str] = []
        sb.on("state", states.append)
        identity = sb.connection_id
        sb.simulate_drop()
        for n in range(6, 21):
            assert (await in_thread(push, n))[0] == 200
        await eventually("all twenty", lambda: len(heard) >= 20)
        await asyncio.sleep(0.1)
        assert heard == [f"m{n}" for n in range(1, 21)]
        assert sb.connection_id == identity
        assert states == ["reconnecting", "connected"]
        await sb.close()

    run(main())


def test_acked_sends_resolve_once_each_across_a_lost_connection(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        # A value JSON cannot take is refused at once and leaves no waiter behind.
        with pytest.raises(TypeError):
            await sb.send_acked({"action": "enqueue", "at": object()})
        first = await sb.send_acked({"action": "enqueue", "order": 0})
        sends = [asyncio.ensure_future(sb.send_acked({"action": "enqueue", "order": n})) for n in range(1, 21)]
        await asyncio.sleep(0)
        sb.simulate_drop()
        ids = await asyncio.gather(*sends)
        assert len({first, *ids}) == 21
        stored = await in_thread(gateway.get_json, "/@queues/sdk/messages?group=sdk-py&max=200")
        events = [m["event"] if isinstance(m["event"], dict) else json.loads(m["event"]) for m in stored["messages"]]
        mine = [e for e in events if e["requestContext"]["connectionId"] == sb.connection_id]
        assert [json.loads(e["body"])["order"] for e in mine] == list(range(21))
        assert [e["requestContext"]["messageId"] for e in mine] == [first, *ids]
        await sb.close()

    run(main())


def test_rooms_join_with_history_offsets_publish_presence_leave(gateway):
    async def main():
        for n in (1, 2, 3):
            await in_thread(gateway.request, "POST", "/@rooms/pylobby", json.dumps({"n": n}))
        alice = Switchboard(gateway.ws, reconnect=FAST)
        await alice.connect()
        room = await alice.join("pylobby", history=2)
        heard: list = []
        room.on("message", lambda data, meta: heard.append((data, meta.offset)))
        await eventually("the replay", lambda: len(heard) == 2)
        assert heard == [({"n": 2}, 2), ({"n": 3}, 3)]
        assert room.epoch
        events: list = []
        room.on("presence", events.append)
        bob = Switchboard(gateway.ws, reconnect=FAST)
        await bob.connect()
        bobs = await bob.join("pylobby")
        await eventually("bob's join", lambda: len(events) == 1)
        assert events[0] == {"event": "join", "connectionId": bob.connection_id, "user": None}
        await bobs.publish({"text": "hi from bob"})
        await eventually("bob's message", lambda: len(heard) == 3)
        assert heard[2] == ({"text": "hi from bob"}, 4)
        presence = await room.presence()
        assert presence["count"] == 2
        assert sorted(m["connectionId"] for m in presence["members"]) == sorted([alice.connection_id, bob.connection_id])
        await bobs.leave()
        await eventually("bob's leave", lambda: len(events) == 2)
        assert events[1]["event"] == "leave"
        with pytest.raises(RuntimeError, match="invalid room name"):
            await alice.join("not a room name")
        await alice.close()
        await bob.close()

    run(main())


def test_two_joins_of_one_room_share_it_and_unanswered_requests_time_out(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        first, second = await asyncio.gather(sb.join("pyshared", history=0), sb.join("pyshared"))
        assert first is second
        assert first.epoch, "both returned after the joined frame"
        await sb.close()
        # Routes that are not room integrations (the echo answers them): a clear error, in time.
        misrouted = Switchboard(gateway.ws, reconnect=FAST, timeout=0.5, actions={"join": "not-a-join"})
        await misrouted.connect()
        error = re.escape('join lost: no joined frame (is "not-a-join" a room_join route?)')
        with pytest.raises(TimeoutError, match=error):
            await misrouted.join("lost")
        assert misrouted.rooms == [], "a join that failed leaves no room behind"
        with pytest.raises(TimeoutError, match=error):
            await misrouted.join("lost")
        await misrouted.close()
        unanswered = Switchboard(gateway.ws, reconnect=FAST, timeout=0.5, actions={"presence": "not-a-presence"})
        await unanswered.connect()
        room = await unanswered.join("asked")
        with pytest.raises(TimeoutError, match=re.escape('presence of asked: no answer (is "not-a-presence" a room_presence route?)')):
            await room.presence()
        await unanswered.close()

    run(main())


def test_a_session_the_gateway_forgot_starts_over_and_recovers_its_rooms(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        kept = await sb.join("pykept")
        volatile = await sb.join("volatile:pyprices")
        heard: list = []
        kept.on("message", lambda data, meta: heard.append(data))
        await in_thread(gateway.request, "POST", "/@rooms/pykept", "before")
        await eventually("before", lambda: len(heard) == 1)
        resets: list = []
        sb.on("reset", resets.append)
        recovered: list = []
        kept.on("recovered", lambda info: recovered.append(info["room"]))
        reset: list = []
        volatile.on("reset", lambda info: reset.append(info["room"]))
        before = sb.connection_id
        await in_thread(gateway.restart)
        await in_thread(gateway.request, "POST", "/@rooms/pykept", "while away")
        await eventually("the rejoin", lambda: recovered == ["pykept"] and reset == ["volatile:pyprices"], 15)
        await eventually("the missed message", lambda: len(heard) == 2)
        assert heard == ["before", "while away"]
        assert sb.connection_id != before
        assert resets == [{"reason": "unknown", "previous_connection_id": before}]
        await sb.close()

    run(main())


def test_acked_sends_pending_when_a_session_is_lost_fail_as_lost(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        await sb.send_acked({"action": "enqueue", "warm": True})
        reset = asyncio.get_running_loop().create_future()
        sb.on("reset", lambda info: reset.done() or reset.set_result(info))
        pending = asyncio.ensure_future(sb.send_acked({"action": "enqueue", "during": "restart"}))
        await in_thread(gateway.restart)
        try:
            await pending
        except AckError as error:
            assert error.reason == "lost"
        await reset
        await eventually("connected again", lambda: sb.state == "connected", 15)
        assert await sb.send_acked({"action": "enqueue", "after": "restart"})
        await sb.close()

    run(main())


def test_cut_by_the_network_while_pushes_keep_coming_every_message_once_in_order(gateway):
    proxy = Proxy(gateway.ws_port)

    async def main():
        sb = Switchboard(proxy.url(), reconnect=FAST)
        await sb.connect()
        identity = sb.connection_id
        heard: list = []
        sb.on("message", heard.append)
        for n in range(1, 201):
            status, _ = await in_thread(gateway.request, "POST", f"/@connections/{identity}", f"m{n}")
            assert status == 200
            if n % 50 == 0:
                proxy.cut()
        await eventually("all two hundred", lambda: len(heard) >= 200)
        await asyncio.sleep(0.1)
        assert heard == [f"m{n}" for n in range(1, 201)]
        assert sb.connection_id == identity
        await sb.close()

    try:
        run(main())
    finally:
        proxy.stop()


def test_away_past_the_resume_window_a_new_session_recovers_rooms_by_since():
    # The gateway says `expired` for one more window after it ended the session.
    short = Gateway(resume_window_secs=3)
    proxy = Proxy(short.ws_port)

    async def main():
        sb = Switchboard(proxy.url(), reconnect=Reconnect(initial_delay=0.05, max_delay=0.2))
        await sb.connect()
        room = await sb.join("pyticker")
        heard: list = []
        room.on("message", lambda data, meta: heard.append(data))
        await in_thread(short.request, "POST", "/@rooms/pyticker", "1")
        await eventually("the first tick", lambda: len(heard) == 1)
        resets: list = []
        sb.on("reset", resets.append)
        recovered: list = []
        room.on("recovered", lambda info: recovered.append(info["room"]))
        proxy.blocked = True
        proxy.cut()
        await in_thread(short.request, "POST", "/@rooms/pyticker", "2")
        await asyncio.sleep(4)
        proxy.blocked = False
        await eventually("recovered", lambda: recovered == ["pyticker"], 15)
        await eventually("the tick sent while away", lambda: len(heard) == 2)
        assert heard == [1, 2]
        assert [r["reason"] for r in resets] == ["expired"]
        await sb.close()

    try:
        run(main())
    finally:
        proxy.stop()
        short.stop()


def test_a_connection_the_backend_deletes_is_not_reconnected(gateway):
    async def main():
        sb = Switchboard(gateway.ws, reconnect=FAST)
        await sb.connect()
        status, _ = await in_thread(gateway.request, "DELETE", f"/@connections/{sb.connection_id}")
        assert status == 204
        await eventually("closed", lambda: sb.state == "closed")
        await asyncio.sleep(0.3)
        assert sb.state == "closed"

    run(main())


def test_a_refused_token_is_not_retried_and_a_provider_is_asked_again():
    secured = Gateway(extra='[authorizer]\ntype = "api_key"\nkeys = ["good-key"]\ntoken = "header:X-Api-Key"\n')

    async def main():
        refused = Switchboard(secured.ws, token="bad-key", token_source="header:X-Api-Key", reconnect=FAST)
        with pytest.raises(ConnectError) as error:
            await refused.connect()
        assert error.value.status == 403
        assert refused.state == "closed"
        asked = []

        def provider() -> str:
            asked.append(1)
            return "good-key"

        sb = Switchboard(secured.ws, token=provider, token_source="header:X-Api-Key", reconnect=FAST)
        await sb.connect()
        sb.simulate_drop()
        await eventually("resumed", lambda: len(asked) == 2 and sb.state == "connected")
        await sb.close()

    try:
        run(main())
    finally:
        secured.stop()
