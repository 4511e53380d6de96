"""Bad input and faults, over real connections: every one gets an error event with a code,
and the server, the connection where that is promised, and every other session carry on
with nothing already stored lost. Ends with a hypothesis fuzz of the server's parser
path over a live connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import _event_objects, _json
from test_redis_store import REDIS_SERVER, RedisProcess, needs_redis
from test_server import (
    check_reply,
    collect,
    eventually,
    http_get,
    raw_hello,
    recv_event,
    running_server,
    server_config,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from mmchat import Engine
from mmchat.client import Client, ServerError
from mmchat.errors import PluginError
from mmchat.protocol import (
    ERROR_CODES,
    Error,
    Ping,
    Pong,
    close_code_for,
    parse_server_event,
    serialize,
)
from mmchat.server import ChatServer


async def closed_with(ws) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 20)
    return ws.close_code


@pytest.fixture
async def server():
    async with running_server() as s:
        yield s


BAD_EVENTS = [
    ("not json at all", "malformed_json"),
    ('{"type": "ping", "type": "ping"}', "malformed_json"),
    ('{"type": "ping", "nonce": NaN}', "malformed_json"),
    ("[1, 2]", "bad_type"),
    ('{"type": "message", "id": 5}', "bad_type"),
    ('{"type": "message", "id": "m", "text": ["a"]}', "bad_type"),
    ('{"type": "nope"}', "unknown_event"),
    ('{"type": "message"}', "missing_field"),
    ('{"type": "message", "id": "m", "colour": 1}', "unknown_field"),
    ('{"type": "message", "id": "bad id!"}', "bad_value"),
    ('{"type": "hello", "version": "1"}', "bad_value"),
    ('{"type": "message", "id": "m", "attachments": [{"mime_type": "image/png", '
     '"data": "***"}]}', "invalid_base64"),
    ('{"type": "message", "id": "m", "attachments": ' + json.dumps(
        [{"mime_type": "image/png", "data": "AA=="}] * 5) + "}", "too_many_attachments"),
]


async def test_bad_events_get_error_codes_and_the_connection_carries_on(server):
    ws, ready = await raw_hello(server.url)
    async with ws:
        for frame, code in BAD_EVENTS:
            await ws.send(frame)
            event = await recv_event(ws)
            assert isinstance(event, Error) and (event.code, event.fatal) == (code, False), frame
        await ws.send(json.dumps({"type": "message", "id": "m", "text": "still here"}))
        events = await collect(ws)
        assert events[0].type == "started" and events[-1].finish_reason in ("stop", "length")
    assert [t["text"] for t in (await server.engine.history(ready.session_id))[::2]] == [
        "still here"]


async def test_a_text_frame_that_is_not_utf8_is_malformed_json_not_a_close(server):
    """websockets alone would close with 1007; the protocol promises an error event."""
    from websockets.asyncio.client import connect

    async with connect(server.url, compression=None) as ws:
        await ws.send(b'{"type": "ping", "nonce": "\xff\xfe"}', text=True)  # before hello
        event = await recv_event(ws)
        assert isinstance(event, Error) and (event.code, event.fatal) == ("malformed_json",
                                                                          False)
    ws, ready = await raw_hello(server.url)
    async with ws:
        await ws.send(b"\xc3\x28 not utf-8", text=True)
        event = await recv_event(ws)
        assert isinstance(event, Error) and (event.code, event.fatal) == ("malformed_json",
                                                                          False)
        await ws.send(json.dumps({"type": "message", "id": "m", "text": "still here"}))
        events = await collect(ws)
        assert events[0].type == "started" and events[-1].type == "done"


async def test_bad_media_is_refused_and_the_session_is_intact(server, image_dir):
    png = (image_dir / "circle.png").read_bytes()
    corrupt = (image_dir / "corrupt.png").read_bytes()
    async with await Client.connect(server.url) as client:
        good = await client.reply("first", [(png, "image/png")])
        history = await server.engine.history(client.session_id)
        for attachment, code in [((corrupt, "image/png"), "corrupt_media"),
                                 ((b"GIF89a", "image/gif"), "corrupt_media"),
                                 ((b"hello", "application/x-nope"), "unsupported_media")]:
            refused = await client.send("look", [attachment], message_id="m-bad")
            with pytest.raises(ServerError) as caught:
                await refused.wait(30)
            assert caught.value.code == code and caught.value.ref == "m-bad"
        assert await server.engine.history(client.session_id) == history
        retry = await client.reply("look", [(png, "image/png")], message_id="m-bad")
        check_reply(retry, after_seq=good.done.seq)
        assert retry.started.seq == good.done.seq + 1


async def test_attachments_over_their_modality_limit(image_dir):
    config = server_config(plugins={"image": {"max_bytes": 100}})
    async with running_server(config) as server:
        async with await Client.connect(server.url) as client:
            assert next(m for m in client.modalities if m.name == "image").max_bytes == 100
            reply = await client.send("big", [image_dir / "circle.png"])
            with pytest.raises(ServerError, match="limit is 100") as caught:
                await reply.wait(20)
            assert caught.value.code == "media_too_large"


@pytest.fixture
async def small_server():
    config = server_config(server={"max_event_bytes": 1024, "max_attachment_bytes": 2048,
                                   "max_message_bytes": 3000})
    async with running_server(config) as s:
        yield s


def _announce(frames: int) -> str:
    return json.dumps({"type": "message", "id": "m-1", "attachments": [
        {"mime_type": "image/png", "frame": i} for i in range(frames)]})


@pytest.mark.parametrize("frames, code, close", [
    (["x" * 1500], "frame_too_large", 1009),
    ([_announce(1), b"x" * 2500], "frame_too_large", 1009),
    ([_announce(2), b"x" * 2000, b"x" * 2000], "frame_too_large", 1009),
    ([b"\x89PNG"], "unexpected_frame", 1008),
    ([_announce(1), _announce(1)], "frames_pending", 1008),
    (['{"type": "hello", "version": "9"}'], "unsupported_version", 1008),
])
async def test_frames_that_break_the_limits_or_the_framing_close(small_server, frames, code,
                                                                 close):
    other = await Client.connect(small_server.url)
    ws, _ = await raw_hello(small_server.url)
    async with ws:
        for frame in frames:
            await ws.send(frame)
        event = await recv_event(ws)
        assert (event.code, event.fatal) == (code, True)
        assert await closed_with(ws) == close
    assert (await other.reply("unaffected")).done.finish_reason in ("stop", "length")
    await other.close()


async def test_a_frame_beyond_the_transport_limit_is_cut_with_1009(small_server):
    ws, _ = await raw_hello(small_server.url)
    async with ws:
        await ws.send(b"x" * 5000)
        assert await closed_with(ws) == 1009
    async with await Client.connect(small_server.url) as client:
        await client.reply("fine")


async def test_a_flood_is_rate_limited_then_dropped_and_others_carry_on():
    config = server_config(server={"messages_per_second": 1.0, "burst": 3, "max_strikes": 5})
    async with running_server(config) as server:
        calm = await Client.connect(server.url)
        ws, ready = await raw_hello(server.url)
        async with ws:
            with contextlib.suppress(ConnectionClosed):  # it may hang up before the end
                for i in range(20):
                    await ws.send(json.dumps({"type": "message", "id": f"f-{i}", "text": "x"}))
            events = []
            with pytest.raises(ConnectionClosed):
                while True:
                    events.append(parse_server_event(await asyncio.wait_for(ws.recv(), 20)))
            assert ws.close_code == 1008
        errors = [e for e in events if isinstance(e, Error)]
        assert all(e.code == "rate_limited" for e in errors)
        assert errors[-1].fatal and not any(e.fatal for e in errors[:-1])
        assert len(errors) >= 6
        taken = {e.id for e in events if e.type == "started"}
        assert {e.ref for e in errors[:-1]}.isdisjoint(taken)
        reply = await calm.reply("hello, anyone?")
        check_reply(reply)
        await calm.close()
        await eventually(lambda: server.turns.active == 0)
        history = await server.engine.history(ready.session_id)
        assert len(history) // 2 <= 4  # at most the burst (and a refill), never the flood


class _FailsMidway:
    """A reply stream that gives two deltas, then fails as a broken plugin would."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.reply = None
        self.given = 0

    def cancel(self) -> None:
        self.stream.cancel()

    async def take(self, at_least: int = 1):
        if self.given == 2:
            self.stream.cancel()
            await self.stream.wait()
            return [], PluginError("toy", "exploded mid-reply")
        self.given += 1
        return [await self.stream.__anext__()], None


class _FlakyEngine(Engine):
    async def stream(self, *args, **kwargs):
        return _FailsMidway(await super().stream(*args, **kwargs))


async def test_a_reply_that_fails_midway_ends_with_error_and_done():
    config = server_config(generation={"max_new_tokens": 50})
    engine = _FlakyEngine(config)
    server = await ChatServer(config, engine=engine).start("127.0.0.1", 0)
    try:
        async with await Client.connect(server.url) as client:
            reply = await client.send("hello")
            done = await reply.wait(30)
            assert (done.finish_reason, len(reply.deltas)) == ("error", 2)
            assert [(e.code, e.ref) for e in reply.errors] == [
                ("plugin_error", reply.message_id)]
            check_reply(reply)
            entries = await engine.store.read_stream(client.session_id)
            assert [e.kind for e in entries] == ["started", "delta", "delta", "done"]
            assert entries[-1].text == done.text
            later = await client.send("again")
            assert (await later.wait(30)).finish_reason == "error"
            assert later.started.seq == done.seq + 1
    finally:
        await server.shutdown()
        await engine.close()


# Redis going away.

class DurableRedis(RedisProcess):
    """A redis-server whose data survives a restart: append-only file, fsync always."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always",
             "--dir", str(self.directory),
             "--logfile", str(self.directory / f"redis-{self.port}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()


@needs_redis
async def test_redis_killed_and_restarted_mid_conversation(tmp_path):
    redis = DurableRedis(tmp_path)
    redis.start()
    config = server_config(
        generation={"max_new_tokens": 4000},
        sessions={"backend": "redis", "url": redis.url, "prefix": "faults",
                  "connect_timeout_seconds": 0.5, "socket_timeout_seconds": 2.0,
                  "lock_wait_seconds": 2.0, "pool_timeout_seconds": 1.0,
                  "lock_lease_seconds": 1.0})
    ready_url = None
    try:
        async with running_server(config) as server:
            ready_url = f"http://127.0.0.1:{server.port}/readyz"
            client = await Client.connect(server.url)
            bystander = await Client.connect(server.url)

            async def short(c: Client, text: str, **options):
                reply = await c.send(text, **options)
                await reply.__anext__()
                await reply.cancel()
                await reply.wait(30)
                return reply

            first = await short(client, "hello")
            await short(bystander, "again")
            stored = await server.engine.history(client.session_id)

            streaming = await client.send("tell me more")  # visible text, untrained
            await streaming.__anext__()
            redis.stop()  # SIGKILL, mid-reply
            await streaming.cancel()
            done = await streaming.wait(30)
            assert done.finish_reason == "error"
            assert [e.code for e in streaming.errors] == ["store_unavailable"]
            check_reply(streaming, after_seq=first.done.seq)

            assert (await client.ping()).nonce  # the connection is still open
            refused = await client.send("while down", message_id="m-down")
            with pytest.raises(ServerError) as caught:
                await refused.wait(30)
            assert caught.value.code == "store_unavailable"
            with pytest.raises(ServerError) as caught:
                await Client.connect(server.url)
            assert caught.value.code == "store_unavailable"
            status, _, body = await asyncio.to_thread(http_get, ready_url)
            assert status == 503 and "session store unreachable" in body

            redis.start()  # same port and files: what was stored comes back
            await eventually(lambda: asyncio.to_thread(
                lambda: http_get(ready_url)[0] == 200))
            # A pooled connection that went stale with the restart reconnects on its
            # health check; a client still retries store_unavailable, to be safe.
            for attempt in range(8):
                try:
                    back = await short(client, "back again",
                                       message_id="m-down" if attempt == 0 else None)
                except ServerError as exc:  # refused before it started
                    assert exc.code == "store_unavailable"
                    continue
                assert back.started.seq > streaming.done.seq
                if back.done.finish_reason != "error":
                    break
                assert [e.code for e in back.errors] == ["store_unavailable"]
            assert back.done.finish_reason == "cancelled"
            history = await server.engine.history(client.session_id)
            assert history[:len(stored)] == stored  # nothing stored before the kill is lost
            assert [t["text"] for t in history[::2]] == ["hello", "back again"]
            again = await short(bystander, "still me")
            assert again.started.seq > 1
            metrics = (await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{server.port}/metrics"))[2]
            assert 'mmchat_errors_total{code="store_unavailable"}' in metrics
            await client.close()
            await bystander.close()
    finally:
        redis.stop()


# Fuzzing the server's parser path over one live connection.

class ServerThread:
    """A server on its own event loop in a thread, for synchronous hypothesis tests."""

    def __init__(self, config) -> None:
        self.config = config
        self.url = ""
        self._started = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with running_server(self.config) as server:
            self.url = server.url
            self._started.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._started.wait(120), "the server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


class FuzzClient:
    """One connection that the fuzz reuses, reconnecting after a fatal error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = None

    def connection(self):
        if self.ws is None:
            self.ws = sync_connect(self.url, compression=None, max_size=None).__enter__()
            self.ws.send(json.dumps({"type": "hello", "version": "1"}))
            assert parse_server_event(self.ws.recv(20)).type == "ready"
        return self.ws

    def exchange(self, frame: str | bytes) -> list:
        """Send ``frame`` then a ping; the events up to its pong (or to the close)."""
        ws = self.connection()
        nonce = uuid.uuid4().hex
        events = []
        with contextlib.suppress(ConnectionClosed):  # the frame may have closed it
            ws.send(frame)
            ws.send(serialize(Ping(nonce)))
        try:
            while True:
                event = parse_server_event(ws.recv(30))
                events.append(event)
                if isinstance(event, Pong) and event.nonce == nonce:
                    return events
        except ConnectionClosed:
            self.ws = None
            fatal = [e for e in events if isinstance(e, Error) and e.fatal]
            assert fatal, f"closed ({ws.close_code}) without a fatal error: {events}"
            assert ws.close_code == close_code_for(fatal[-1].code)
            return events


@pytest.fixture(scope="module")
def fuzz_client():
    config = server_config(
        generation={"max_new_tokens": 2},
        server={"messages_per_second": 10_000.0, "burst": 10_000, "max_strikes": 1_000_000,
                "max_event_bytes": 4096, "max_attachment_bytes": 4096})
    with ServerThread(config) as thread:
        client = FuzzClient(thread.url)
        yield client
        if client.ws is not None:
            client.ws.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(
    st.text(max_size=64),
    st.binary(max_size=64),
    _json.map(json.dumps),
    _event_objects.map(json.dumps),
    _event_objects.map(lambda obj: json.dumps(obj).encode()),
    st.sampled_from(["x" * 5000, '{"type": "message", "id": "m-fuzz", "text": "hi"}']),
))
def test_fuzzed_frames_get_well_formed_answers(fuzz_client, frame):
    for event in fuzz_client.exchange(frame):
        if isinstance(event, Error):
            assert event.code in ERROR_CODES


def test_the_server_still_serves_after_the_fuzz(fuzz_client):
    ws = fuzz_client.connection()
    ws.send(json.dumps({"type": "message", "id": uuid.uuid4().hex, "text": "hello"}))
    while (event := parse_server_event(ws.recv(30))).type != "done":
        assert event.type in ("started", "delta", "done", "error", "pong"), event
    assert event.finish_reason in ("stop", "length")
