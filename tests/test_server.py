"""``mmchat serve`` over real WebSocket connections on 127.0.0.1: streaming, sessions,
attachments, idempotency, cancel, resume, auth, limits, HTTP endpoints and draining.

The harness here (:func:`server_config`, :func:`running_server`, :func:`collect`) is
shared by the other server test modules. Nothing asserts on wall-clock time; waits are
bounded waits for a condition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import TINY_MODEL
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from mmchat import Attachment, Engine
from mmchat.client import CannotConnect, Client, ConnectionLost, ServerError
from mmchat.config import Config, from_dict
from mmchat.protocol import (
    Done,
    Error,
    Hello,
    Message,
    Ready,
    ServerEvent,
    Started,
    make_token,
    parse_server_event,
    serialize,
)
from mmchat.server import ChatServer

SECRET = "0123456789abcdef-server-test"
FAST = {"messages_per_second": 100.0, "burst": 50, "ping_interval_seconds": 0.0}


def server_config(**sections: dict[str, Any]) -> Config:
    """A tiny untrained model, greedy, short replies, generous rate limits; no loop guard
    (the untrained model repeats itself, and the guard would replace its replies)."""
    data: dict[str, Any] = {"model": dict(TINY_MODEL),
                            "generation": {"max_new_tokens": 6, "loop_ngram": 0},
                            "server": dict(FAST)}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data, env={})


@contextlib.asynccontextmanager
async def running_server(config: Config | None = None, *, store=None,
                         env: dict[str, str] | None = None) -> AsyncIterator[ChatServer]:
    config = config or server_config()
    engine = Engine(config, store=store)
    server = ChatServer(config, engine=engine, env=env)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(drain_seconds=10)
        await engine.close()


async def eventually(check, limit: float = 20.0) -> None:
    """Wait until ``check()`` (sync or async) is true; fail after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert loop.time() < end, "condition never became true"
        await asyncio.sleep(0.01)


async def recv_event(ws, timeout: float = 20.0) -> ServerEvent:
    return parse_server_event(await asyncio.wait_for(ws.recv(), timeout))


async def collect(ws, until=lambda e: isinstance(e, Done), timeout: float = 30.0
                  ) -> list[ServerEvent]:
    """Events from a raw websocket up to and including the first that ``until`` accepts."""
    events = []
    while True:
        events.append(await recv_event(ws, timeout))
        if until(events[-1]):
            return events


async def raw_hello(url: str, **hello: Any):
    """A raw websocket after a successful hello, and its ready event."""
    ws = await connect(url, compression=None)
    await ws.send(serialize(Hello("1", **hello)))
    ready = await recv_event(ws)
    return ws, ready


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def check_reply(reply, *, after_seq: int = 0) -> None:
    """Seqs of a finished client Reply are contiguous and its deltas add up to its text."""
    seqs = [reply.started.seq, *(d.seq for d in reply.deltas), reply.done.seq]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert seqs[0] > after_seq
    assert "".join(d.text for d in reply.deltas) == reply.done.text


@pytest.fixture
async def server():
    async with running_server() as s:
        yield s


# Streaming and sessions.

async def test_hello_ready_and_a_streamed_reply(server):
    async with await Client.connect(server.url) as client:
        ready = client.ready
        assert ready.version == "1" and not ready.resumed and len(ready.session_id) == 32
        assert {m.name for m in ready.modalities} >= {"image", "voice"}
        assert ready.limits.messages_per_second == 100.0
        reply = await client.send("hello there")
        deltas = [d async for d in reply]
        assert deltas and reply.started.id == reply.message_id
        check_reply(reply)
        done = reply.done
        assert done.finish_reason in ("stop", "length")
        assert done.usage.completion_tokens == len(deltas) <= 6
        assert done.usage.prompt_tokens > 0
        assert {"prefill", "first_token", "total", "queue"} <= set(done.timings)


def _frames_of_one_reply(events) -> tuple[list, str]:
    """The reply's frames, and the text its deltas cover, checking their seqs."""
    started, *deltas, done = events
    assert isinstance(started, Started) and isinstance(done, Done)
    covered = [s for d in deltas for s in range((d.first_seq or d.seq), d.seq + 1)]
    assert covered == list(range(started.seq + 1, done.seq)), covered
    assert "".join(d.text for d in deltas) == done.text
    return deltas, done


async def test_coalesced_deltas_make_a_short_reply_four_frames(server):
    ws, ready = await raw_hello(server.url, coalesce=8)
    async with ws:
        assert ready.coalesce == 8
        await ws.send(serialize(Message("m-1", "hello there")))
        deltas, done = _frames_of_one_reply(await collect(ws))
    tokens = done.usage.completion_tokens
    assert 2 <= tokens <= 6  # max_new_tokens 6: started, 1 delta, 1 more, done
    assert len(deltas) == 2 and deltas[0].first_seq is None  # the first at once
    assert deltas[1].seq - deltas[1].first_seq == tokens - 2
    per_token, ready = await raw_hello(server.url)
    async with per_token:
        assert ready.coalesce == 1
        await per_token.send(serialize(Message("m-1", "hello there")))
        deltas, again = _frames_of_one_reply(await collect(per_token))
    assert again.text == done.text
    assert len(deltas) == tokens and all(d.first_seq is None for d in deltas)


async def test_frames_waiting_together_go_in_one_socket_write(server, monkeypatch):
    from mmchat.server import app

    writes: list[bytes] = []
    made = app._ServerConnection.connection_made

    def counting(self, transport):
        made(self, transport)
        write = transport.write
        transport.write = lambda data: (writes.append(bytes(data)), write(data))[1]

    monkeypatch.setattr(app._ServerConnection, "connection_made", counting)
    ws, _ = await raw_hello(server.url, coalesce=8)
    async with ws:
        writes.clear()  # the handshake and ready
        await ws.send(serialize(Message("m-1", "hello there")))
        deltas, done = _frames_of_one_reply(await collect(ws))
    assert len(deltas) == 2
    texts = [w for w in writes if w[:1] == b"\x81"]  # text frames first (not the close)
    # started with the first delta, then the held delta with done: two writes, not four
    assert len(texts) == 2, texts
    assert b'"type":"started"' in texts[0] and b'"type":"done"' in texts[1]


def _sizes(tokens: int, coalesce: int) -> list[int]:
    rest = tokens - 1
    return [1, *[min(coalesce, rest - i) for i in range(0, rest, coalesce)]]


async def test_the_server_default_coalesces_and_a_resume_replays_coalesced():
    config = server_config(server={"coalesce": 3}, generation={"max_new_tokens": 12})
    async with running_server(config) as server:
        async with await Client.connect(server.url) as client:
            assert client.ready.coalesce == 3
            reply = await client.reply("hello")
            tokens = reply.done.usage.completion_tokens
            assert tokens >= 5
            assert [d.seq - (d.first_seq or d.seq) + 1 for d in reply.deltas] == _sizes(
                tokens, 3)
        async with await Client.connect(server.url, session_id=client.session_id,
                                        last_seq=0, coalesce=1) as again:
            replayed = await again.next_reply(20)
            await replayed.wait(20)
        assert len(replayed.deltas) == tokens and replayed.done == reply.done
        check_reply(replayed)


async def _one_token_at_a_time(tokens: int):
    """A reply stream whose turn puts one delta at a time, each once its reader waits
    (a reader that keeps up with the decode steps)."""
    from mmchat.replies import Delta, Reply, ReplyStream

    stream = ReplyStream(asyncio.Queue(), session_id="s")

    async def decode() -> None:
        for i in range(tokens):
            while stream._taker is None:
                await asyncio.sleep(0)
            stream._put(Delta(f" w{i}", i, i))
            await asyncio.sleep(0)
        stream._put(Reply("s", "".join(f" w{i}" for i in range(tokens)), "length", {}, 3,
                          tokens, {}))

    stream._task = asyncio.create_task(decode())
    return stream


@pytest.mark.parametrize("groups", [[3], [1], [3, 1], []])
async def test_a_turn_stores_deltas_as_its_listeners_take_them(groups):
    """While every listener takes deltas 3 at a time (coalescing), the turn stores and
    publishes them 3 at a time, one append each; a per-token listener (or none) gets
    one append per delta. Either way every token is its own entry in the stream."""
    from mmchat.server.metrics import Metrics, TimedStore
    from mmchat.server.turns import Turn, TurnManager, TurnRequest
    from mmchat.stores.memory import MemoryStore

    store = TimedStore(MemoryStore(), Metrics())
    manager = TurnManager(None, store, Metrics())
    turn = Turn(manager, TurnRequest("grouped", "m-1", "hello"))
    heard: list[list[Any]] = []
    for tokens in groups:
        heard.append([])
        turn._listeners[heard[-1].append] = tokens
    held = await store.begin_turn("grouped", message_id="m-1")
    appended: list[list[str]] = []
    append = held._append

    async def counting(entries):
        appended.append([e.kind for e in entries])
        return await append(entries)

    held._append = counting
    await turn._pump(await _one_token_at_a_time(11), held, 0, 0.0)
    group = min(groups, default=1)
    deltas = [kinds.count("delta") for kinds in appended]
    assert appended[0][0] == "started" and deltas == [1, *[group] * (10 // group)]
    stored = await store.read_stream("grouped")
    assert [e.kind for e in stored] == ["started", *["delta"] * 11, "done"]
    assert [e.seq for e in stored] == list(range(1, 14))
    for events in heard:
        assert [e.seq for e in events] == list(range(1, 14))


async def test_done_carries_the_confidence_and_the_fallback():
    """The untrained model loops ("circle circle ..."): with the loop guard on, done says
    so and carries the fallback text instead of the streamed deltas, on resume too."""
    config = server_config(generation={"max_new_tokens": 30, "loop_ngram": 4})
    async with running_server(config) as server:
        async with await Client.connect(server.url) as client:
            reply = await client.send("hello there")
            await reply.wait(30)
            done = reply.done
            assert done.finish_reason == "loop" and done.fallback
            assert done.text == config.generation.fallback_text
            assert 0.0 < done.confidence < 1.0
            assert "".join(d.text for d in reply.deltas) != done.text
            ws, _ = await raw_hello(server.url, session_id=client.session_id, last_seq=0)
            replayed = [e for e in await collect(ws) if isinstance(e, Done)]
            await ws.close()
            assert replayed == [done]
    async with running_server() as server, await Client.connect(server.url) as client:
        done = await (await client.send("hello there")).wait(30)
        assert not done.fallback and 0.0 < done.confidence < 1.0


async def test_the_session_continues_and_seqs_run_on(server):
    async with await Client.connect(server.url) as client:
        first = await client.reply("hello")
        second = await client.reply("and then?")
        check_reply(first)
        check_reply(second, after_seq=first.done.seq)
        assert second.started.seq == first.done.seq + 1
        history = await server.engine.history(client.session_id)
        assert [t["role"] for t in history] == ["user", "assistant"] * 2
        assert [history[0]["text"], history[2]["text"]] == ["hello", "and then?"]
        assert history[3]["text"] == second.done.text


async def test_messages_on_one_connection_are_answered_in_order(server):
    async with await Client.connect(server.url) as client:
        replies = [await client.send(f"message {i}") for i in range(4)]
        for reply in replies:
            await reply.wait(30)
        starts = [r.started.seq for r in replies]
        assert starts == sorted(starts)
        history = await server.engine.history(client.session_id)
        assert [t["text"] for t in history[::2]] == [f"message {i}" for i in range(4)]


async def test_sessions_are_independent_and_concurrent(server):
    async def chat(i: int):
        async with await Client.connect(server.url) as client:
            reply = await client.reply(f"hi {i}", timeout=60)
            return client.session_id, reply

    results = await asyncio.gather(*(chat(i) for i in range(6)))
    assert len({sid for sid, _ in results}) == 6
    for _, reply in results:
        check_reply(reply)
        assert reply.started.seq == 1


async def test_image_attachments_inline_and_in_binary_frames(server, image_dir):
    png = (image_dir / "circle.png").read_bytes()
    async with await Client.connect(server.url) as client:
        inline = await client.reply("what colour?", [(png, "image/png")], binary=False)
        framed = await client.reply("and now?", [image_dir / "circle.jpg"], binary=True)
        for reply in (inline, framed):
            check_reply(reply)
            assert set(reply.done.attention) == {"image"}
        history = await server.engine.history(client.session_id)
        assert history[0]["attachments"][0]["mime_type"] == "image/png"
        assert history[2]["attachments"][0]["mime_type"] == "image/jpeg"


async def test_a_raw_message_with_base64_and_a_binary_frame(server, image_dir):
    png = (image_dir / "circle.png").read_bytes()
    ws, ready = await raw_hello(server.url)
    async with ws:
        assert isinstance(ready, Ready)
        await ws.send(json.dumps({"type": "message", "id": "m-1", "text": "look", "attachments": [
            {"mime_type": "image/png", "data": base64.b64encode(png).decode()},
            {"mime_type": "image/png", "modality": "image", "frame": 0}]}))
        await ws.send(png)
        events = await collect(ws)
        assert [e.type for e in events[:2]] == ["started", "delta"]
        assert events[-1].attention.keys() == {"image"}


# Idempotency and cancel.

async def test_a_repeated_message_id_is_not_processed_twice(server):
    async with await Client.connect(server.url) as client:
        first = await client.reply("hello", message_id="m-1")
        again = await client.send("hello", message_id="m-1")
        with pytest.raises(ServerError) as caught:
            await again.wait(20)
        assert caught.value.code == "duplicate_message" and caught.value.ref == "m-1"
        assert len(await server.engine.history(client.session_id)) == 2
        later = await client.reply("next")
        assert later.started.seq == first.done.seq + 1


async def test_a_duplicate_in_flight_is_refused_too(server):
    ws, ready = await raw_hello(server.url)
    async with ws:
        for _ in range(2):
            await ws.send(json.dumps({"type": "message", "id": "same", "text": "hello"}))
        events = await collect(ws, until=lambda e: isinstance(e, Done))
        events += await collect(ws, until=lambda e: isinstance(e, Error)) if not any(
            isinstance(e, Error) for e in events) else []
    errors = [e for e in events if isinstance(e, Error)]
    assert [(e.code, e.ref) for e in errors] == [("duplicate_message", "same")]
    assert sum(e.type == "started" for e in events) == 1
    assert len(await server.engine.history(ready.session_id)) == 2
    async with await Client.connect(server.url) as client:
        await client.send("x", message_id="twice")
        with pytest.raises(ValueError, match="already waiting"):
            await client.send("x", message_id="twice")


async def test_cancel_stops_the_reply_and_keeps_the_session():
    async with running_server(server_config(generation={"max_new_tokens": 4000})) as server:
        async with await Client.connect(server.url) as client:
            reply = await client.send("tell me everything")
            await reply.__anext__()
            await reply.cancel()
            done = await reply.wait(30)
            assert done.finish_reason == "cancelled"
            assert done.usage.completion_tokens < 4000
            check_reply(reply)
            history = await server.engine.history(client.session_id)
            assert history[-1]["finish_reason"] == "cancelled"


async def test_cancel_without_id_and_of_a_queued_message():
    async with running_server(server_config(generation={"max_new_tokens": 4000})) as server:
        async with await Client.connect(server.url) as client:
            # prompts the untrained model answers with visible text (some give only
            # pieces that decode to nothing, so no delta would ever arrive)
            running = await client.send("hello there")
            queued = await client.send("tell me more")
            await running.__anext__()
            await client.cancel(queued.message_id)
            await client.cancel()
            assert (await running.wait(30)).finish_reason == "cancelled"
            done = await queued.wait(30)
            assert done.finish_reason == "cancelled" and done.usage.completion_tokens == 0


async def test_a_failing_listener_does_not_end_the_reply_for_the_others():
    from mmchat.server.turns import TurnRequest

    def broken(event):
        raise RuntimeError("a listener's bug")

    async with running_server() as server:
        turn = server.turns.start(TurnRequest("listeners", "m-1", "hello"))
        got: list[Any] = []
        await asyncio.wait_for(asyncio.gather(turn.follow(broken), turn.follow(got.append)),
                               30)
    assert [e.type for e in got][0] == "started" and got[-1].type == "done"
    assert got[-1].finish_reason != "error" and got == turn.events


# Resume.

async def test_resume_replays_missed_deltas_without_doubles():
    async with running_server(server_config(generation={"max_new_tokens": 400})) as server:
        client = await Client.connect(server.url)
        reply = await client.send("hello")
        seen = [await reply.__anext__() for _ in range(3)]
        await client.close()
        with pytest.raises(ConnectionLost):
            async for delta in reply:  # what arrived before the close
                seen.append(delta)
        ready = await client.resume()
        assert ready.resumed and ready.session_id == client.session_id
        rest = [d async for d in reply]
        await client.close()
        assert [d.seq for d in seen + rest] == [d.seq for d in reply.deltas]
        check_reply(reply)


async def test_a_raw_resume_replays_after_last_seq(server):
    async with await Client.connect(server.url) as client:
        first = await client.reply("hello")
        await client.reply("again")
    ws, ready = await raw_hello(server.url, session_id=client.session_id,
                                last_seq=first.deltas[0].seq)
    async with ws:
        assert ready.resumed
        events = await collect(ws, until=lambda e: isinstance(e, Done) and
                               e.seq == client.last_seq)
    assert [e.seq for e in events] == list(range(first.deltas[0].seq + 1, client.last_seq + 1))


async def test_a_client_that_disconnects_mid_reply_leaks_nothing():
    async with running_server(server_config(generation={"max_new_tokens": 200})) as server:
        client = await Client.connect(server.url)
        reply = await client.send("hello")
        await reply.__anext__()
        await client.close()
        await eventually(lambda: server.turns.active == 0 and not server.connections)
        assert server.metrics.connections._value.get() == 0
        entries = await server.store.read_stream(client.session_id)
        assert entries[-1].kind == "done"
        history = await server.engine.history(client.session_id)
        assert history[-1]["text"] == entries[-1].text
        again = await Client.connect(server.url, session_id=client.session_id,
                                     last_seq=reply.deltas[-1].seq)
        late = await again.next_reply(20)
        await late.wait(20)
        assert late.response_id == reply.response_id
        assert late.done.text == entries[-1].text
        assert reply.text + "".join(d.text for d in late.deltas) == late.done.text
        await again.close()


async def test_an_unknown_session_gets_a_new_one(server):
    async with await Client.connect(server.url, session_id="no-such-session",
                                    last_seq=3) as client:
        assert [n.code for n in client.notices] == ["unknown_session"]
        assert client.session_id != "no-such-session" and not client.ready.resumed
        reply = await client.reply("hello")
        assert reply.started.seq == 1


async def test_a_session_resumes_without_last_seq_and_continues(server):
    async with await Client.connect(server.url) as client:
        first = await client.reply("hello")
    async with await Client.connect(server.url, session_id=client.session_id) as again:
        assert again.ready.resumed
        second = await again.reply("more")
        assert second.started.seq == first.done.seq + 1


# Authentication and origins.

@pytest.fixture
async def auth_server():
    config = server_config(server={"auth_secret_env": "TEST_MMCHAT_SECRET"})
    async with running_server(config, env={"TEST_MMCHAT_SECRET": SECRET}) as s:
        yield s


def _token(subject: str, expires: int = 4_000_000_000) -> str:
    return make_token(SECRET, subject, expires)


async def test_auth_needs_a_valid_token(auth_server):
    for token, why in [(None, "needs a token"), ("v1.nope", "malformed"),
                       (make_token("another-secret-16b", "alice", 4_000_000_000),
                        "bad signature"),
                       (_token("alice", expires=1), "expired")]:
        with pytest.raises(ServerError, match=why) as caught:
            await Client.connect(auth_server.url, token=token)
        assert caught.value.code == "unauthorized" and caught.value.fatal


async def test_a_session_belongs_to_its_subject(auth_server):
    async with await Client.connect(auth_server.url, token=_token("alice")) as alice:
        await alice.reply("my secret")
    with pytest.raises(ServerError) as caught:
        await Client.connect(auth_server.url, token=_token("bob"),
                             session_id=alice.session_id, last_seq=0)
    assert caught.value.code == "forbidden" and caught.value.fatal
    assert "alice" not in caught.value.message
    ws, _ = await raw_hello(auth_server.url, token=_token("bob"))
    async with ws:
        ws2 = await connect(auth_server.url)
        await ws2.send(serialize(Hello("1", _token("bob"), alice.session_id, 0)))
        assert (await recv_event(ws2)).code == "forbidden"
        with pytest.raises(ConnectionClosed):
            await ws2.recv()
        assert ws2.close_code == 1008
    async with await Client.connect(auth_server.url, token=_token("alice"),
                                    session_id=alice.session_id, last_seq=0) as again:
        assert again.ready.resumed
        replayed = await again.next_reply(20)
        assert (await replayed.wait(20)).seq == alice.last_seq


async def test_tokens_are_ignored_without_a_secret(server):
    async with await Client.connect(server.url, token="anything") as client:
        assert client.ready.session_id


async def test_origins_are_checked_against_the_allow_list():
    config = server_config(server={"origins": ["https://chat.example"]})
    async with running_server(config) as server:
        async with await Client.connect(server.url, origin="https://chat.example"):
            pass
        async with await Client.connect(server.url):  # no Origin: not a browser
            pass
        with pytest.raises(CannotConnect, match="403") as caught:
            await Client.connect(server.url, origin="https://evil.example")
        assert isinstance(caught.value.__cause__, InvalidStatus)


# Keepalive, limits, HTTP.

async def test_ping_pong(server):
    async with await Client.connect(server.url) as client:
        assert (await client.ping("n-1")).nonce == "n-1"


async def test_hello_must_come_first_and_in_time():
    async with running_server(server_config(server={"hello_timeout_seconds": 0.2})) as server:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            event = await recv_event(ws)
            assert (event.code, event.fatal) == ("hello_required", True)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
        async with connect(server.url) as ws:
            event = await recv_event(ws)
            assert event.code == "hello_required" and "no hello" in event.message
            with pytest.raises(ConnectionClosed):
                await ws.recv()


async def test_connections_over_the_limit_are_refused_with_1013():
    async with running_server(server_config(server={"max_connections": 2})) as server:
        async with await Client.connect(server.url), await Client.connect(server.url):
            async with connect(server.url) as ws:
                event = await recv_event(ws)
                assert (event.code, event.fatal) == ("too_many_connections", True)
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1013
        await eventually(lambda: not server.connections)
        async with await Client.connect(server.url):
            pass


async def test_health_readiness_and_metrics(server):
    base = f"http://127.0.0.1:{server.port}"
    async with await Client.connect(server.url) as client:
        await client.reply("hello")
        bad = await client.send("")
        with pytest.raises(ServerError):
            await bad.wait(20)
    assert await asyncio.to_thread(http_get, base + "/healthz") == (
        200, "text/plain; charset=utf-8", "ok\n")
    status, _, body = await asyncio.to_thread(http_get, base + "/readyz")
    assert (status, body) == (200, "ready\n")
    status, content_type, body = await asyncio.to_thread(http_get, base + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    for line in ['mmchat_turns_total{finish_reason="length"}', "mmchat_connections_opened_total",
                 "mmchat_time_to_first_token_seconds_count 1.0",
                 'mmchat_errors_total{code="empty_message"} 1.0', "mmchat_tokens_total",
                 "mmchat_active_sessions", "mmchat_reply_tokens_per_second_count 1.0",
                 'mmchat_store_latency_seconds_count{op="end_turn"}',
                 "mmchat_store_up 1.0",
                 # the process and platform collectors
                 "process_resident_memory_bytes ", "process_cpu_seconds_total ",
                 "process_open_fds ", "process_max_fds ", "python_info{"]:
        assert line in body, line
    assert (await asyncio.to_thread(http_get, base + "/nope"))[0] == 404


async def test_shutdown_drains_replies_then_closes_with_1001():
    config = server_config(generation={"max_new_tokens": 150})
    engine = Engine(config)
    server = ChatServer(config, engine=engine)
    await server.start("127.0.0.1", 0)
    try:
        client = await Client.connect(server.url)
        reply = await client.send("hello")
        await reply.__anext__()
        shutdown = asyncio.create_task(server.shutdown(drain_seconds=60))
        await eventually(lambda: server.draining)
        assert await server.ready() == (False, "shutting down")
        with pytest.raises(CannotConnect):  # the listener is closed: no new connections
            await Client.connect(server.url)
        done = await reply.wait(60)
        assert done.finish_reason == "length"
        check_reply(reply)
        event = await client.next_event(20)
        assert isinstance(event, Error) and (event.code, event.fatal) == ("going_away", True)
        await shutdown
        await eventually(lambda: client.close_code is not None)
        assert client.close_code == 1001
    finally:
        await server.shutdown()
        await engine.close()


async def test_shutdown_cancels_what_outlasts_the_drain():
    config = server_config(generation={"max_new_tokens": 4000})
    engine = Engine(config)
    server = await ChatServer(config, engine=engine).start("127.0.0.1", 0)
    try:
        client = await Client.connect(server.url)
        reply = await client.send("hello")
        await reply.__anext__()
        await server.shutdown(drain_seconds=0)
        done = await reply.wait(30)
        assert done.finish_reason == "cancelled"
        entries = await engine.store.read_stream(client.session_id)
        assert entries[-1].kind == "done" and entries[-1].seq == done.seq
    finally:
        await engine.close()


def test_auth_without_its_secret_fails_start_up():
    from mmchat.errors import ConfigError

    config = server_config(server={"auth_secret_env": "TEST_MMCHAT_UNSET"})
    with pytest.raises(ConfigError, match="TEST_MMCHAT_UNSET"):
        ChatServer(config, engine=object(), env={})
    with pytest.raises(ConfigError, match="16 bytes"):
        ChatServer(config, engine=object(), env={"TEST_MMCHAT_UNSET": "short"})


def test_the_server_package_alone_imports_websockets_server_side():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "mmchat"
    users = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "websockets" or n.startswith("websockets.") for n in names):
                users.add(path.relative_to(root).as_posix())
    assert users == {"server/app.py", "client.py"}


def test_attachment_types_are_checked_by_the_client():
    with pytest.raises(TypeError):
        from mmchat.client import _attachment

        _attachment(b"raw bytes without a type")
    assert Attachment(b"x", "image/png").mime_type == "image/png"


def test_metric_label_children_are_made_once_per_value(monkeypatch):
    from mmchat.server.metrics import Metrics

    metrics = Metrics()
    made = []
    for counter in (metrics.errors, metrics.turns, metrics.store_latency):
        original = counter.labels
        monkeypatch.setattr(counter, "labels",
                            lambda *values, original=original: made.append(values) or
                            original(*values))
    for _ in range(3):
        metrics.error("rate_limited")
        metrics.turn_ended("stop")
        metrics.store_call("end_turn", 0.001)
    metrics.turn_ended("length")
    assert made == [("rate_limited",), ("stop",), ("end_turn",), ("length",)]
    text = metrics.render().decode()
    assert 'mmchat_errors_total{code="rate_limited"} 3.0' in text
    assert 'mmchat_turns_total{finish_reason="stop"} 3.0' in text
    assert 'mmchat_store_latency_seconds_count{op="end_turn"} 3.0' in text
