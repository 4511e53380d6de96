"""The session store at scale: bounded memory on the in-process store, sessions whole or
gone on both stores, resume at a constant cost, and readiness that tells the truth.

Real parts: real redis-server processes started here, real servers and WebSocket
clients. The in-process store runs on a fake clock; costs are counted in Redis commands
and bytes (``INFO commandstats`` on a private server), never in wall time.
"""

from __future__ import annotations

from test_server import running_server, server_config

from mmchat.client import Client
from mmchat.config import SessionsConfig
from mmchat.sessions import MemoryStore as MemoryStoreFromSessions
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
