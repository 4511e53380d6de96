"""Session ownership that cannot lapse: a session that expires (or that a Redis restart
without persistence loses) under an open connection is never re-created there, so
nobody can take it over and its seqs never start again at 1.

Real servers, real WebSocket connections, real redis-server processes (started here).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from test_redis_store import RedisProcess, eventually, needs_redis
from test_server import SECRET, running_server, server_config

from mmchat.client import Client, ServerError
from mmchat.protocol import make_token
from mmchat.sessions import MemoryStore

TTL = 100.0


def token(subject: str) -> str:
    return make_token(SECRET, subject, 4_000_000_000)


@contextlib.asynccontextmanager
async def memory_store() -> AsyncIterator[tuple[MemoryStore, Callable[[str], Awaitable[None]]]]:
    clock = [0.0]

    async def expire(session_id: str) -> None:
        clock[0] += TTL + 1

    yield MemoryStore(ttl_seconds=TTL, clock=lambda: clock[0]), expire


@contextlib.asynccontextmanager
async def redis_store(tmp_path, how: str):
    from mmchat.stores.redis import RedisStore

    redis = RedisProcess(tmp_path)
    redis.start()
    store = RedisStore(redis.url, prefix=f"t{uuid.uuid4().hex[:8]}", ttl_seconds=TTL)

    async def lose(session_id: str) -> None:
        if how == "restart":  # no persistence: every key is gone
            redis.stop()
            redis.start()
            # what this tests is ownership, not how stale pooled connections recover
            await store.client.connection_pool.disconnect()
            return
        client, keys = store.client, store.keys(session_id)
        for key in keys.data:
            await client.pexpire(key, 1)

        async def gone() -> bool:
            return await client.exists(*keys.data) == 0

        await eventually(gone)

    try:
        yield store, lose
    finally:
        redis.stop()


@pytest.fixture(params=["memory", pytest.param("redis-expiry", marks=needs_redis),
                        pytest.param("redis-restart", marks=needs_redis)])
async def lapsing(request, tmp_path):
    """A server with auth, and a function that makes one of its sessions vanish."""
    if request.param == "memory":
        made = memory_store()
    else:
        made = redis_store(tmp_path, request.param.removeprefix("redis-"))
    async with made as (store, lose):
        config = server_config(server={"auth_secret_env": "TEST_MMCHAT_SECRET"})
        async with running_server(config, store=store,
                                  env={"TEST_MMCHAT_SECRET": SECRET}) as server:
            yield server, lose


async def test_a_lapsed_session_is_not_recreated_nor_taken_over(lapsing):
    server, lose = lapsing
    store = server.store
    async with await Client.connect(server.url, token=token("alice")) as alice:
        first = await alice.reply("my secret")
        session_id, seen = alice.session_id, alice.last_seq
        assert seen >= 3
        await lose(session_id)

        # Alice's connection is still open: her next message does not re-create it.
        again = await alice.send("another secret")
        with pytest.raises(ServerError) as caught:
            await again.wait(30)
        assert (caught.value.code, caught.value.fatal) == ("session_expired", False)
        assert await store.load(session_id) is None
        assert await store.read_stream(session_id) == []

        # Bob, with a valid token of his own, cannot get into it ...
        async with await Client.connect(server.url, token=token("bob"),
                                        session_id=session_id, last_seq=0) as bob:
            assert [n.code for n in bob.notices] == ["unknown_session"]
            assert bob.session_id != session_id and not bob.ready.resumed
            await bob.reply("hello")
        # ... nor can another message of Alice's open it for him.
        retry = await alice.send("one more")
        with pytest.raises(ServerError) as caught:
            await retry.wait(30)
        assert caught.value.code == "session_expired"
        assert await store.load(session_id) is None

    # Alice herself comes back to a new session, not to `forbidden`.
    async with await Client.connect(server.url, token=token("alice"),
                                    session_id=session_id, last_seq=seen) as back:
        assert [n.code for n in back.notices] == ["unknown_session"]
        assert back.session_id not in (session_id, bob.session_id)
        reply = await back.reply("hello again")
        assert reply.started.seq == 1
    assert first.done.seq == seen
    # No event was ever numbered again under the lapsed id.
    assert await store.read_stream(session_id) == []


async def test_an_ownerless_session_is_nobodys_to_claim(lapsing):
    """A session that exists without an owner (written by the embedded API) cannot be
    claimed through a hello."""
    server, _ = lapsing
    await server.engine.reply("embedded-1", "hello")
    with pytest.raises(ServerError) as caught:
        await Client.connect(server.url, token=token("bob"), session_id="embedded-1",
                             last_seq=0)
    assert (caught.value.code, caught.value.fatal) == ("forbidden", True)
