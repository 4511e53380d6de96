"""The session store at scale: bounded memory on the in-process store, sessions whole or
gone on both stores, resume at a constant cost, and readiness that tells the truth.

Real parts: real redis-server processes started here, real servers and WebSocket
clients. The in-process store runs on a fake clock; costs are counted in Redis commands
and bytes (``INFO commandstats`` on a private server), never in wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_redis_store import REDIS_SERVER, RedisProcess, needs_redis
from test_server import eventually, http_get, recv_event, running_server, server_config
from websockets.asyncio.client import connect

from mmchat.client import Client, ServerError
from mmchat.config import SessionsConfig
from mmchat.errors import SessionLost, StoreUnavailable, TurnLost
from mmchat.protocol import to_json
from mmchat.server.auth import owner_for
from mmchat.server.episodes import Episodes
from mmchat.sessions import MemoryStore as MemoryStoreFromSessions
from mmchat.sessions import SessionHead, StreamEntry
from mmchat.stores import open_store
from mmchat.stores.memory import MemoryStore

TTL = 100.0


def _memory(clock: list[float], **options) -> MemoryStore:
    return MemoryStore(ttl_seconds=TTL, clock=lambda: clock[0], **options)


async def _session(store, session_id: str, n: int = 0) -> None:
    await store.claim_session(session_id, "alice")
    await store.claim_message(session_id, f"m-{n}")
    await store.save_turn(session_id, state=b"s" * 100, memory_added=[b"m" * 100],
                          turns=[{"role": "user", "text": "hi"}], max_memory=4)


# 1. The in-process store frees what it no longer needs.

def test_the_memory_store_is_still_importable_from_sessions():
    assert MemoryStoreFromSessions is MemoryStore
    assert isinstance(open_store(SessionsConfig(max_sessions=7)), MemoryStore)
    assert open_store(SessionsConfig(max_sessions=7))._max_sessions == 7


async def test_expired_sessions_are_freed_without_being_looked_up():
    clock = [0.0]
    store = _memory(clock)
    for phase in range(3):
        for i in range(300):
            await _session(store, f"p{phase}-{i}")
        assert store.held == 300  # the phase before expired, and nobody asked for it
        clock[0] += TTL + 1
    await _session(store, "last")
    assert store.held == 1
    assert await store.load("p2-0") is None


async def test_a_session_in_use_slides_and_is_kept():
    clock = [0.0]
    store = _memory(clock)
    await _session(store, "kept")
    await _session(store, "idle")
    for _ in range(3):
        clock[0] += TTL * 0.6
        assert await store.load("kept") is not None
    await _session(store, "new")
    assert await store.load("kept") is not None
    assert await store.load("idle") is None


async def test_max_sessions_drops_the_least_recently_used_whole():
    clock = [0.0]
    store = _memory(clock, max_sessions=3)
    for name in ("a", "b", "c"):
        await _session(store, name)
        clock[0] += 1
    await store.load("a")  # a is used again: b is now the least recently used
    await _session(store, "d")
    assert store.held == 3
    assert await store.load("b") is None
    for name in ("a", "c", "d"):
        assert (await store.load(name)).owner == "alice"
    # dropped whole: its message ids and stream went with it
    assert await store.read_stream("b") == []
    assert await store.claim_message("b", "m-0")


async def test_a_session_whose_turn_runs_is_not_dropped():
    clock = [0.0]
    store = _memory(clock, max_sessions=1)
    await _session(store, "busy")
    async with store.turn("busy", owner="alice") as held:
        await _session(store, "other")
        held.save(state=b"after", memory_added=[], turns=[], max_memory=4)
    assert (await store.load("busy")).state == b"after"


async def test_a_client_of_a_dropped_session_is_told_unknown_session():
    store = MemoryStore(max_sessions=1)
    async with running_server(server_config(), store=store) as server:
        async with await Client.connect(server.url) as first:
            await first.reply("hello")
            dropped = first.session_id
        async with await Client.connect(server.url) as second:
            await second.reply("hello")
        async with await Client.connect(server.url, session_id=dropped, last_seq=0) as back:
            assert [n.code for n in back.notices] == ["unknown_session"]
            assert back.session_id != dropped
            assert (await back.reply("again")).started.seq == 1


# 2. A session is whole or it is gone.

@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis-scale"))
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def redis_store(redis, **options: Any) -> AsyncIterator[Any]:
    from mmchat.stores.redis import RedisStore

    store = RedisStore(redis.url, prefix=f"t{uuid.uuid4().hex[:10]}", ttl_seconds=TTL,
                       **options)
    try:
        yield store
    finally:
        await store.close()


async def _none_left(store, session_id: str) -> bool:
    keys = store.keys(session_id)
    return await store.client.exists(*keys.data) == 0


@needs_redis
@pytest.mark.parametrize("part", ["state", "memory", "history", "meta", "stream", "msgids"])
async def test_a_session_missing_a_part_is_lost_whole_on_redis(redis, part):
    async with redis_store(redis) as store:
        await _session(store, "s1")
        await store.append_stream("s1", [StreamEntry(1, "r", "started"),
                                         StreamEntry(2, "r", "done", "hi")])
        assert await store.head("s1") == SessionHead("s1", "alice")
        await store.client.delete(getattr(store.keys("s1"), part))
        with pytest.raises(SessionLost):
            await store.head("s1")
        assert await _none_left(store, "s1")
        assert await store.head("s1") is None


@needs_redis
@pytest.mark.parametrize("owner", ["alice", None])
async def test_a_turn_of_a_session_missing_a_part_is_refused_and_its_remains_deleted(
        redis, owner):
    async with redis_store(redis) as store:
        await _session(store, "s1")
        await store.client.delete(store.keys("s1").memory)
        with pytest.raises(SessionLost):
            await store.begin_turn("s1", message_id="m-9", owner=owner)
        assert await _none_left(store, "s1")


@needs_redis
async def test_a_part_lost_during_a_turn_makes_its_end_write_nothing(redis):
    async with redis_store(redis) as store:
        await _session(store, "s1")
        turn = await store.begin_turn("s1", message_id="m-1", owner="alice")
        await turn.append([StreamEntry(1, "r", "started")])
        await store.client.delete(store.keys("s1").history)  # evicted meanwhile
        turn.save(state=b"new", memory_added=[b"x"], turns=[{"role": "user"}], max_memory=4)
        with pytest.raises(TurnLost):
            await turn.end([StreamEntry(2, "r", "done", "hi")])
        assert await _none_left(store, "s1")
        assert await store.client.exists(store.keys("s1").lock) == 0


@needs_redis
@pytest.mark.parametrize("part", ["state", "stream", "meta"])
async def test_a_client_returning_to_a_partly_lost_session_gets_session_lost(
        redis, part):
    async with redis_store(redis) as store, running_server(server_config(),
                                                           store=store) as server:
        async with await Client.connect(server.url) as first:
            await first.reply("hello")
            await first.reply("again")
            session_id, seen = first.session_id, first.last_seq
        await store.client.delete(getattr(store.keys(session_id), part))
        async with await Client.connect(server.url, session_id=session_id,
                                        last_seq=seen) as back:
            assert [n.code for n in back.notices] == ["session_lost"]
            assert back.session_id != session_id and not back.ready.resumed
            assert (await back.reply("hi")).started.seq == 1
        assert await _none_left(store, session_id)


@needs_redis
async def test_a_turn_on_an_open_connection_to_a_partly_lost_session(redis):
    async with redis_store(redis) as store, running_server(server_config(),
                                                           store=store) as server:
        async with await Client.connect(server.url) as client:
            first = await client.reply("hello")
            session_id = client.session_id
            await store.client.delete(store.keys(session_id).stream)
            again = await client.send("again")
            with pytest.raises(ServerError) as caught:
                await again.wait(30)
            assert (caught.value.code, caught.value.fatal) == ("session_lost", False)
        assert await _none_left(store, session_id)
        # the id's seqs never start again: nothing is numbered under it
        assert await store.read_stream(session_id) == []
        assert first.done.seq >= 3


@needs_redis
async def test_a_failed_end_of_turn_leaves_the_session_as_it_was(tmp_path):
    """Redis full under noeviction refuses the end of a turn whole: state, memory and
    history stay those of the turn before (the reply it streamed is closed by
    reply_lost on the next resume)."""
    redis = RedisProcess(tmp_path, None, "--maxmemory-policy", "noeviction")
    redis.start()
    try:
        async with redis_store(redis) as store:
            await _session(store, "s1")
            keys = store.keys("s1")
            before = [await store.client.get(keys.state),
                      await store.client.lrange(keys.memory, 0, -1),
                      await store.client.lrange(keys.history, 0, -1)]
            turn = await store.begin_turn("s1", message_id="m-1", owner="alice")
            await turn.append([StreamEntry(1, "r", "started")])
            await store.client.config_set("maxmemory", 1)  # full from now on
            turn.save(state=b"new", memory_added=[b"x"], turns=[{"role": "user"}],
                      max_memory=4)
            with pytest.raises(StoreUnavailable):
                await turn.end([StreamEntry(2, "r", "done", "hi")])
            after = [await store.client.get(keys.state),
                     await store.client.lrange(keys.memory, 0, -1),
                     await store.client.lrange(keys.history, 0, -1)]
            assert after == before
            await store.client.config_set("maxmemory", 0)
            assert (await store.head("s1")).owner == "alice"
    finally:
        redis.stop()


# 3. Resume at a constant cost.

async def _long_session(store, session_id: str, turns: int) -> int:
    """A session of ``turns`` turns written through the store, each with a reply of
    three stream events; returns its last seq."""
    await store.claim_session(session_id, owner_for(None))
    seq = 0
    for n in range(turns):
        await store.save_turn(session_id, state=b"s" * 400, memory_added=[],
                              turns=[{"role": "user", "text": f"question {n} " * 4},
                                     {"role": "assistant", "text": f"answer {n} " * 8}],
                              max_memory=4)
        await store.append_stream(session_id, [
            StreamEntry(seq + 1, f"r{n}", "started", data={"message_id": f"m{n}"}),
            StreamEntry(seq + 2, f"r{n}", "delta", "answer"),
            StreamEntry(seq + 3, f"r{n}", "done", "answer", {"finish_reason": "stop"})])
        seq += 3
    return seq


async def _resume_cost(store, server, session_id: str, last_seq: int) -> tuple[int, int]:
    """Redis commands run and bytes sent while a client resumes ``session_id``: from
    before its hello to after the server has finished the resume (ready comes first,
    the replay after it) and let the connection go."""
    async def stats() -> tuple[int, int]:
        info = await store.client.info("stats")
        return info["total_commands_processed"], info["total_net_output_bytes"]

    commands, sent = await stats()
    async with await Client.connect(server.url, session_id=session_id,
                                    last_seq=last_seq) as back:
        assert back.ready.resumed
        await eventually(lambda: all(c.idle for c in server.connections))
    await eventually(lambda: not server.connections)
    commands_after, sent_after = await stats()
    return commands_after - commands, sent_after - sent


@needs_redis
async def test_resume_costs_the_same_at_2000_turns_as_at_one(redis):
    async with redis_store(redis) as store, running_server(server_config(),
                                                           store=store) as server:
        short_seq = await _long_session(store, "short", 1)
        long_seq = await _long_session(store, "long", 2000)
        await _resume_cost(store, server, "short", short_seq)  # scripts loaded
        short = await _resume_cost(store, server, "short", short_seq)
        long = await _resume_cost(store, server, "long", long_seq)
        assert long[0] == short[0]
        assert long[1] <= 1.3 * short[1], (short, long)
        # and the session's size is bounded by its settings, not by its length
        keys = store.keys("long")
        assert await store.client.llen(keys.history) == store.history_max_len


# 4. Pictures held: the client is told which ones drop out of the memory bank.

async def test_done_names_the_pictures_pushed_out_of_the_memory_bank(tmp_path):
    from PIL import Image

    from mmchat.modality import Attachment

    pictures = []
    for n, colour in enumerate(("red", "green", "blue")):
        path = tmp_path / f"p{n}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        pictures.append(path)
    ids = [Attachment.from_path(p).id for p in pictures]
    async with running_server(server_config(fusion={"max_memory": 2})) as server:
        async with await Client.connect(server.url) as client:
            first = await client.reply("one", [pictures[0]])
            second = await client.reply("two", [pictures[1]])
            third = await client.reply("three", [pictures[2]])
            plain = await client.reply("and now?")
    assert first.done.dropped is None and second.done.dropped is None
    assert third.done.dropped == (ids[0],)
    assert plain.done.dropped is None
    assert "dropped" not in to_json(first.done)


# 5. Readiness and logs tell the truth.

def _episode_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mmchat.server.episodes" and r.levelno == logging.WARNING]


@needs_redis
async def test_readyz_is_503_while_redis_is_full_and_refuses_writes(tmp_path, caplog):
    redis = RedisProcess(tmp_path, None, "--maxmemory-policy", "noeviction")
    redis.start()
    caplog.set_level(logging.WARNING, "mmchat.server.episodes")
    config = server_config(sessions={"backend": "redis", "url": redis.url,
                                     "prefix": "full"})
    try:
        async with running_server(config) as server:
            ready = f"http://127.0.0.1:{server.port}/readyz"
            assert (await asyncio.to_thread(http_get, ready))[0] == 200
            store = server.store.inner
            await store.client.config_set("maxmemory", 1)  # full: every write refused
            assert await store.client.ping()  # ... while it still answers pings
            status, _, body = await asyncio.to_thread(http_get, ready)
            assert status == 503
            assert "refusing writes" in body and "OutOfMemoryError" in body, body
            for _ in range(3):  # every hello fails, but the log says so once
                with pytest.raises(ServerError) as caught:
                    await Client.connect(server.url)
                assert caught.value.code == "store_unavailable"
            lines = _episode_lines(caplog)
            assert len(lines) == 1 and lines[0].startswith("session store: trouble began")
            await store.client.config_set("maxmemory", 0)
            assert (await asyncio.to_thread(http_get, ready))[0] == 200
            lines = _episode_lines(caplog)
            assert len(lines) == 2
            assert lines[1].startswith("session store: back to normal after 4 failures")
            async with await Client.connect(server.url) as client:
                await client.reply("hello")
    finally:
        redis.stop()


async def test_refused_connections_are_logged_once_per_episode(caplog):
    caplog.set_level(logging.WARNING, "mmchat.server.episodes")
    config = server_config(server={"max_connections": 1})
    async with running_server(config) as server:
        first = await Client.connect(server.url)
        for _ in range(3):
            async with connect(server.url) as ws:
                assert (await recv_event(ws)).code == "too_many_connections"
        lines = _episode_lines(caplog)
        assert len(lines) == 1 and lines[0].startswith("connections: trouble began")
        await first.close()
        await eventually(lambda: not server.connections)
        async with await Client.connect(server.url):
            pass
    lines = _episode_lines(caplog)
    assert len(lines) == 2
    assert lines[1].startswith("connections: back to normal after 3 failures")


def test_a_long_episode_is_reported_with_its_count_now_and_then(caplog):
    caplog.set_level(logging.WARNING, "mmchat.server.episodes")
    clock = [0.0]
    episodes = Episodes(every=60, clock=lambda: clock[0])
    for _ in range(100):
        episodes.failed("session store", "refused")
        clock[0] += 1
    assert episodes.failing("session store") == 100
    episodes.succeeded("session store")
    episodes.succeeded("session store")
    assert _episode_lines(caplog) == [
        "session store: trouble began: refused",
        "session store: still failing: 61 failures in 60s, the last: refused",
        "session store: back to normal after 100 failures in 100.0s"]


@needs_redis
async def test_under_lru_eviction_no_session_is_served_with_parts_missing(tmp_path):
    """Redis at maxmemory under volatile-lru (deploy/): sessions lose keys at random;
    each comes back whole or not at all."""
    redis = RedisProcess(tmp_path, None, "--maxmemory-policy", "volatile-lru")
    redis.start()
    try:
        async with redis_store(redis) as store:
            client = store.client
            used = (await client.info("memory"))["used_memory"]
            await client.config_set("maxmemory", used + 1_000_000)
            names = [f"s{n}" for n in range(300)]
            for name in names:  # about 3 MB in all: much of it is evicted
                await store.claim_session(name, "alice")
                await store.save_turn(name, state=b"s" * 2000, memory_added=[b"m" * 4000],
                                      turns=[{"role": "user", "text": "x" * 1000}],
                                      max_memory=4)
                await store.append_stream(name, [StreamEntry(1, "r", "started"),
                                                 StreamEntry(2, "r", "done", "y" * 1000)])
            assert (await client.info("stats"))["evicted_keys"] > 0
            await client.config_set("maxmemory", 0)
            outcomes = {"whole": 0, "lost": 0, "gone": 0}
            for name in names:
                try:
                    head = await store.head(name)
                except SessionLost:
                    outcomes["lost"] += 1
                    assert await _none_left(store, name)
                    continue
                if head is None:
                    outcomes["gone"] += 1
                    continue
                outcomes["whole"] += 1
                keys = store.keys(name)
                parts = (keys.state, keys.memory, keys.history, keys.meta, keys.stream)
                assert await client.exists(*parts) == len(parts), name
            assert outcomes["whole"] > 0 and outcomes["lost"] > 0, outcomes
    finally:
        redis.stop()


@needs_redis
async def test_message_ids_are_capped_and_a_released_first_one_loses_nothing(redis):
    async with redis_store(redis, message_ids_max_len=4) as store:
        await store.claim_session("s1", "alice")
        assert await store.claim_message("s1", "m-0")
        await store.release_message("s1", "m-0")  # its only id, released: still whole
        assert await store.head("s1") == SessionHead("s1", "alice")
        for n in range(20):
            turn = await store.begin_turn("s1", message_id=f"m-{n}", owner="alice")
            await turn.end()
        keys = store.keys("s1")
        kept = await store.client.scard(keys.msgids) + await store.client.scard(
            keys.msgids_old)
        assert 4 <= kept <= 9
        for n in range(16, 20):  # the newest are still refused as retries
            assert not await store.claim_message("s1", f"m-{n}")
        assert await store.head("s1") == SessionHead("s1", "alice")


async def test_the_memory_store_caps_history_and_message_ids():
    store = MemoryStore(history_max_len=6, message_ids_max_len=4)
    for n in range(10):
        assert await store.claim_message("s1", f"m-{n}")
        await store.save_turn("s1", state=b"s", memory_added=[],
                              turns=[{"n": n, "role": "user"}, {"n": n, "role": "bot"}],
                              max_memory=4)
    history = (await store.load("s1")).history
    assert [t["n"] for t in history] == [7, 7, 8, 8, 9, 9]
    assert not await store.claim_message("s1", "m-9")
    assert await store.claim_message("s1", "m-0")  # forgotten: the newest 4 are kept


@needs_redis
async def test_loading_a_session_missing_a_part_raises_and_deletes_it(redis):
    async with redis_store(redis) as store:
        await _session(store, "s1")
        assert (await store.load("s1")).state == b"s" * 100
        await store.client.delete(store.keys("s1").state)
        with pytest.raises(SessionLost):
            await store.load("s1")
        assert await _none_left(store, "s1")
        assert await store.load("s1") is None
