"""Session stores: one behavioural contract for MemoryStore and RedisStore, plus what only
Redis has (TTLs, key layout, round trips, the lease lock, outages, Cluster, Sentinel).

Redis tests run against real ``redis-server`` processes started here on free ports.
Nothing asserts on wall-clock durations: waits are bounded polls for a condition.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmchat.config import SessionsConfig
from mmchat.errors import (
    ConfigError,
    DuplicateMessage,
    SessionBusy,
    SessionExpired,
    SessionForbidden,
    StateError,
    StoreUnavailable,
    TurnLost,
)
from mmchat.sessions import MemoryStore, SessionData, SessionStore, SessionTurn, StreamEntry
from mmchat.stores import open_store
from mmchat.subjects import Erased

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
ROOT = Path(__file__).resolve().parent.parent
SID = "sess-1"
TTL = 100  # seconds; tests shorten single keys' TTLs by hand instead of sleeping


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = random.randrange(20_000, 40_000)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """A throwaway redis-server without persistence."""

    def __init__(self, directory: Path, port: int | None = None, *args: str) -> None:
        self.directory = directory
        self.port = port or _free_port()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *self.args, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--logfile", str(self.directory / f"redis-{self.port}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def wait_ready(self, limit: float = 10.0) -> None:
        end = time.monotonic() + limit
        while not _answers_ping(self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited")
            if time.monotonic() > end:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    """Poll ``check`` until it is true; fail if it never becomes true within ``limit``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not await check():
        assert loop.time() < end, "condition never became true"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def _redis_store(url: str, prefix: str, **options: Any):
    from mmchat.stores.redis import RedisStore

    settings = {"ttl_seconds": TTL, "lock_wait": 10.0, "lock_lease": 5.0,
                "stream_max_len": 50, **options}
    return RedisStore(url, prefix=prefix, **settings)


@dataclass
class Harness:
    """One backend under test. ``twin()`` is a second store over the same data (another
    RedisStore on the same Redis; the same MemoryStore, as processes cannot share it)."""

    kind: str
    store: SessionStore
    make: Callable[..., SessionStore]
    clock: list[float] = field(default_factory=lambda: [0.0])
    made: list[SessionStore] = field(default_factory=list)

    def twin(self, **options: Any) -> SessionStore:
        if self.kind == "memory" and not options:
            return self.store
        store = self.make(**options)
        self.made.append(store)
        return store

    async def expire(self, session_id: str) -> None:
        """Let the session's TTL run out."""
        if self.kind == "memory":
            self.clock[0] += TTL + 1
            return
        client, keys = self.store.client, self.store.keys(session_id)
        for key in keys.data:
            await client.pexpire(key, 1)
        await eventually(lambda: _none_exist(client, keys.data))


async def _none_exist(client, keys) -> bool:
    return await client.exists(*keys) == 0


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def harness(request):
    if request.param == "memory":
        clock = [0.0]

        def make(lock_wait: float = 10.0) -> MemoryStore:
            return MemoryStore(ttl_seconds=TTL, clock=lambda: clock[0], lock_timeout=lock_wait,
                               stream_max_len=50)

        h = Harness("memory", make(), make, clock)
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"t{uuid.uuid4().hex[:10]}"
        h = Harness("redis", _redis_store(server.url, prefix),
                    lambda **kw: _redis_store(server.url, prefix, **kw))
    yield h
    for store in [h.store, *h.made]:
        await store.close()


@pytest.fixture
async def redis_store(redis_server):
    store = _redis_store(redis_server.url, f"t{uuid.uuid4().hex[:10]}")
    yield store
    await store.close()


def _entries(first: int, count: int, response_id: str = "r-1", *,
             done: bool = False) -> list[StreamEntry]:
    out = [StreamEntry(seq, response_id, "delta", f"t{seq}")
           for seq in range(first, first + count)]
    if done:
        out[-1] = StreamEntry(out[-1].seq, response_id, "done", "all",
                              {"finish_reason": "stop", "usage": {"prompt_tokens": 1}})
    return out


async def _turn(store: SessionStore, session_id: str = SID, n: int = 0, *,
                memory: tuple[bytes, ...] = (), max_memory: int = 8) -> None:
    await store.save_turn(session_id, state=f"state-{n}".encode(), memory_added=list(memory),
                          turns=[{"role": "user", "text": f"q{n}"},
                                 {"role": "bot", "text": f"a{n}", "attention": {"image": 0.5}}],
                          max_memory=max_memory)


# The contract, for both backends.

async def test_missing_session_loads_as_none(harness):
    assert await harness.store.load("nobody") is None


async def test_save_and_load(harness):
    store = harness.store
    await _turn(store, n=0, memory=(b"\x00m0", b"m1"))
    await _turn(store, n=1, memory=(b"m2",))
    data = await store.load(SID)
    assert data == SessionData(SID, b"state-1", [b"\x00m0", b"m1", b"m2"], [
        {"role": "user", "text": "q0"},
        {"role": "bot", "text": "a0", "attention": {"image": 0.5}},
        {"role": "user", "text": "q1"},
        {"role": "bot", "text": "a1", "attention": {"image": 0.5}},
    ], None)


async def test_loaded_data_is_a_copy(harness):
    await _turn(harness.store)
    data = await harness.store.load(SID)
    data.history.append({"x": 1})
    data.memory.append(b"x")
    again = await harness.store.load(SID)
    assert len(again.history) == 2 and again.memory == []


async def test_unicode_and_nested_turns_survive(harness):
    turn = {"text": "caf\u00e9 \u6f22\u5b57 \U0001f600", "nested": {"a": [1, 2.5, None, True]}}
    await harness.store.save_turn(SID, state=b"", memory_added=[], turns=[turn], max_memory=1)
    assert (await harness.store.load(SID)).history == [turn]


async def test_memory_is_trimmed_to_the_newest(harness):
    store = harness.store
    await _turn(store, n=0, memory=(b"a", b"b", b"c"), max_memory=2)
    assert (await store.load(SID)).memory == [b"b", b"c"]
    await _turn(store, n=1, memory=(b"d",), max_memory=2)
    assert (await store.load(SID)).memory == [b"c", b"d"]
    await _turn(store, n=2, memory=(), max_memory=1)
    assert (await store.load(SID)).memory == [b"d"]
    await _turn(store, n=3, memory=(b"e",), max_memory=0)
    assert (await store.load(SID)).memory == []
    with pytest.raises(ValueError):
        await _turn(store, max_memory=-1)


async def test_delete(harness):
    store = harness.store
    await _turn(store)
    await store.claim_session(SID, "alice")
    await store.append_stream(SID, _entries(1, 2))
    await store.claim_message(SID, "m-1")
    await store.delete(SID)
    assert await store.load(SID) is None
    assert await store.read_stream(SID) == []
    assert await store.claim_message(SID, "m-1")
    await store.delete("never-existed")


async def test_sessions_expire(harness):
    store = harness.store
    await _turn(store, n=0, memory=(b"old",))
    await store.claim_session(SID, "alice")
    await harness.expire(SID)
    assert await store.load(SID) is None
    await _turn(store, n=1)
    assert await store.load(SID) == SessionData(SID, b"state-1", [], [
        {"role": "user", "text": "q1"},
        {"role": "bot", "text": "a1", "attention": {"image": 0.5}}])


async def test_memory_store_ttl_slides():
    clock = [0.0]
    store = MemoryStore(ttl_seconds=TTL, clock=lambda: clock[0])
    await _turn(store)
    for _ in range(3):
        clock[0] += TTL * 0.8
        assert await store.load(SID) is not None
    clock[0] += TTL * 0.8
    await store.read_stream(SID)  # reading the stream does not slide the TTL
    clock[0] += TTL * 0.3
    assert await store.load(SID) is None


async def test_bad_session_ids_are_refused(harness):
    for bad in ["", "a{b}", "a b", "x" * 129, "\u00e9"]:
        with pytest.raises(ValueError):
            await harness.store.load(bad)
        with pytest.raises(ValueError):
            await _turn(harness.store, bad)


async def test_ownership(harness):
    store = harness.store
    assert await store.claim_session(SID, "alice") == "alice"
    assert await store.claim_session(SID, "bob") == "alice"
    data = await store.load(SID)
    assert data == SessionData(SID, owner="alice")
    await _turn(store)
    assert (await store.load(SID)).owner == "alice"
    assert await store.claim_session(SID, "alice") == "alice"
    with pytest.raises(ValueError):
        await store.claim_session("other", "")


async def test_a_turn_for_an_owner_needs_the_session_to_be_theirs(harness):
    """Checked under the lock, on every turn: a missing session is SessionExpired (and
    is not created), another owner's is SessionForbidden; without an owner (the
    embedded engine) a turn may create the session."""
    store = harness.store
    with pytest.raises(SessionExpired):
        async with store.turn(SID, message_id="m-1", owner="alice"):
            pass
    assert await store.load(SID) is None
    await store.claim_session(SID, "alice")
    with pytest.raises(SessionForbidden):
        async with store.turn(SID, owner="bob"):
            pass
    async with store.turn(SID, message_id="m-2", owner="alice") as held:
        _save(held, 1)
    assert (await store.load(SID)).state == b"state-1"
    await harness.expire(SID)
    with pytest.raises(SessionExpired):
        async with store.turn(SID, owner="alice"):
            pass
    assert await store.load(SID) is None
    async with store.turn("embedded") as held:
        _save(held, 2)
    assert (await store.load("embedded")).owner is None


async def test_idempotent_message_claims(harness):
    store = harness.store
    assert await store.claim_message(SID, "m-1")
    assert not await store.claim_message(SID, "m-1")
    assert await store.claim_message(SID, "m-2")
    assert await store.claim_message("other", "m-1")
    await store.release_message(SID, "m-1")
    assert await store.claim_message(SID, "m-1")
    assert not await store.claim_message(SID, "m-1")
    await store.release_message("nobody", "m-9")


async def test_claims_alone_do_not_make_a_session(harness):
    await harness.store.claim_message(SID, "m-1")
    await harness.store.append_stream(SID, _entries(1, 1))
    assert await harness.store.load(SID) is None


async def test_stream_append_and_read(harness):
    store = harness.store
    assert await store.read_stream(SID) == []
    assert await store.stream_tail(SID) is None
    started = StreamEntry(1, "r-1", "started", data={"id": "m-1"})
    await store.append_stream(SID, [started])
    await store.append_stream(SID, _entries(2, 3, done=True))
    await store.append_stream(SID, [])
    entries = await store.read_stream(SID)
    assert entries == [started, *_entries(2, 3, done=True)]
    assert [e.seq for e in await store.read_stream(SID, 2)] == [3, 4]
    assert [e.seq for e in await store.read_stream(SID, 1, limit=2)] == [2, 3]
    assert await store.read_stream(SID, 4) == []
    assert await store.stream_tail(SID) == entries[-1]
    assert entries[-1].final and not entries[0].final
    assert await store.read_stream("other") == []


async def test_stream_seqs_must_rise(harness):
    store = harness.store
    await store.append_stream(SID, _entries(1, 3))
    for bad in ([StreamEntry(3, "r", "delta")], [StreamEntry(2, "r", "delta")],
                [StreamEntry(5, "r", "delta"), StreamEntry(5, "r", "delta")],
                [StreamEntry(0, "r", "delta")], [StreamEntry(9, "r", "bogus")]):
        with pytest.raises(ValueError):
            await store.append_stream(SID, bad)
    assert [e.seq for e in await store.read_stream(SID)] == [1, 2, 3]


async def test_stream_keeps_the_newest(harness):
    store = harness.store
    for first in range(1, 301, 30):
        await store.append_stream(SID, _entries(first, 30))
    seqs = [e.seq for e in await store.read_stream(SID)]
    assert 50 <= len(seqs) < 300  # Redis trims approximately (MAXLEN ~)
    assert seqs == list(range(301 - len(seqs), 301))


async def test_wait_stream_times_out_empty(harness):
    await harness.store.append_stream(SID, _entries(1, 1))
    assert await harness.store.wait_stream(SID, 1, timeout=0.05) == []
    assert len(await harness.store.wait_stream(SID, 0, timeout=0.05)) == 1


async def test_wait_stream_wakes_on_append_from_another_store(harness):
    reader, writer = harness.store, harness.twin()
    waiting = asyncio.create_task(reader.wait_stream(SID, 0, timeout=5.0))
    await asyncio.sleep(0.05)
    await writer.append_stream(SID, _entries(1, 2))
    got = await waiting
    assert [e.seq for e in got] in ([1], [1, 2])


async def test_follow_replays_then_follows_until_done(harness):
    reader, writer = harness.store, harness.twin()
    await writer.append_stream(SID, [StreamEntry(1, "r-1", "started", data={"id": "m-1"}),
                                     *_entries(2, 2)])
    seen: list[int] = []
    two_seen = asyncio.Event()

    async def follow():
        async for entry in reader.follow_stream(SID, 1, idle_timeout=10.0):
            seen.append(entry.seq)
            if entry.seq == 3:
                two_seen.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(two_seen.wait(), 10)
    await writer.append_stream(SID, _entries(4, 2))
    await writer.append_stream(SID, _entries(6, 1, done=True))
    await asyncio.wait_for(task, 10)
    assert seen == [2, 3, 4, 5, 6]


async def test_follow_ends_at_once_without_an_open_reply(harness):
    store = harness.store
    assert [e async for e in store.follow_stream(SID, 0)] == []
    await store.append_stream(SID, _entries(1, 3, done=True))
    assert [e.seq async for e in store.follow_stream(SID, 0)] == [1, 2, 3]
    assert [e async for e in store.follow_stream(SID, 3)] == []
    await store.append_stream(SID, _entries(4, 2, "r-2", done=True))
    assert [e.seq async for e in store.follow_stream(SID, 2)] == [3, 4, 5]


async def test_follow_gives_up_on_a_stalled_reply(harness):
    await harness.store.append_stream(SID, _entries(1, 2))
    with pytest.raises(TimeoutError):
        async for _ in harness.store.follow_stream(SID, 2, idle_timeout=0.05):
            pass


@pytest.mark.parametrize("via", ["lock", "turn"])
async def test_lock_serialises_turns_across_stores(harness, via):
    stores = {"a": harness.store, "b": harness.twin()}
    events: list[tuple[str, str, int]] = []

    async def turn(who: str, i: int) -> None:
        store = stores[who]
        if via == "turn":
            async with store.turn(SID) as held:
                events.append(("enter", who, i))
                n = int(held.state or b"-1") + 1
                await asyncio.sleep(0)
                held.save(state=str(n).encode(), memory_added=[],
                          turns=[{"n": n, "who": who}], max_memory=1)
                events.append(("exit", who, i))
            return
        async with store.lock(SID):
            events.append(("enter", who, i))
            data = await store.load(SID)
            n = len(data.history) if data else 0
            await asyncio.sleep(0)
            await store.save_turn(SID, state=str(n).encode(), memory_added=[],
                                  turns=[{"n": n, "who": who}], max_memory=1)
            events.append(("exit", who, i))

    await asyncio.gather(*(turn(who, i) for i in range(5) for who in stores))
    assert len(events) == 20
    for enter, leave in zip(events[::2], events[1::2], strict=True):
        assert (enter[0], leave[0]) == ("enter", "exit") and enter[1:] == leave[1:]
    assert [t["n"] for t in (await harness.store.load(SID)).history] == list(range(10))


async def test_lock_is_per_session(harness):
    store = harness.store
    async with store.lock(SID), store.lock("other"):
        pass


async def test_busy_lock_raises_session_busy(harness):
    store = harness.twin(lock_wait=0.05)
    async with store.lock(SID):
        with pytest.raises(SessionBusy):
            async with store.lock(SID):
                pass
    async with store.lock(SID):
        pass


async def test_lock_is_released_when_the_turn_fails(harness):
    store = harness.twin(lock_wait=0.05)
    with pytest.raises(RuntimeError):
        async with store.lock(SID):
            raise RuntimeError("turn failed")
    async with store.lock(SID):
        pass


# The turn: lock and load on the way in, save, append and unlock on the way out.

def _save(held: SessionTurn, n: int, memory: tuple[bytes, ...] = ()) -> None:
    held.save(state=f"state-{n}".encode(), memory_added=list(memory),
              turns=[{"role": "user", "text": f"q{n}"}], max_memory=3)


async def test_a_turn_reads_then_writes_and_unlocks(harness):
    store = harness.twin(lock_wait=0.05)
    await _turn(store, memory=(b"m0", b"m1"))
    await store.append_stream(SID, _entries(1, 2, done=True))
    async with store.turn(SID, message_id="m-1") as held:
        assert (held.session_id, held.state, held.memory) == (SID, b"state-0", [b"m0", b"m1"])
        assert held.tail == _entries(1, 2, done=True)[-1]
        with pytest.raises(SessionBusy):
            await store.begin_turn(SID)
        _save(held, 1, (b"m2", b"m3"))
        assert (await store.load(SID)).state == b"state-0"  # staged, not sent yet
        await held.end(_entries(3, 2, "r-2", done=True))
        assert held.ended
        assert (await store.load(SID)).state == b"state-1"
        async with store.turn(SID) as again:  # unlocked by end(), before the exit
            assert again.tail.seq == 4
    data = await store.load(SID)
    assert (data.state, data.memory) == (b"state-1", [b"m1", b"m2", b"m3"])
    assert [t["text"] for t in data.history] == ["q0", "a0", "q1"]
    assert [e.seq for e in await store.read_stream(SID)] == [1, 2, 3, 4]
    assert not await store.claim_message(SID, "m-1")


async def test_a_new_session_has_nothing_to_read(harness):
    async with harness.store.turn("fresh") as held:
        assert (held.state, held.memory, held.tail) == (None, [], None)
    assert await harness.store.load("fresh") is None


async def test_a_taken_message_id_is_refused_without_locking(harness):
    store = harness.twin(lock_wait=0.05)
    assert await store.claim_message(SID, "m-1")
    with pytest.raises(DuplicateMessage) as caught:
        await store.begin_turn(SID, message_id="m-1")
    assert caught.value.code == "duplicate_message"
    async with store.turn(SID):  # not locked
        # A busy session refuses a taken id at once too, and claims a new one anyway.
        with pytest.raises(DuplicateMessage):
            await store.begin_turn(SID, message_id="m-1")
        with pytest.raises(SessionBusy):
            await store.begin_turn(SID, message_id="m-2")
    assert not await store.claim_message(SID, "m-2")


async def test_leaving_a_turn_by_an_exception_unlocks_and_sends_what_was_staged(harness):
    store = harness.twin(lock_wait=0.05)
    with pytest.raises(RuntimeError):
        async with store.turn(SID):
            raise RuntimeError("before the write")
    assert await store.load(SID) is None
    with pytest.raises(RuntimeError):
        async with store.turn(SID) as held:
            _save(held, 1)
            raise RuntimeError("after the write")
    assert (await store.load(SID)).state == b"state-1"
    async with store.turn(SID):
        pass


async def test_a_turn_ends_once(harness):
    store = harness.store
    held = await store.begin_turn(SID)
    with pytest.raises(ValueError):
        held.save(state=b"", memory_added=[], turns=[], max_memory=-1)
    with pytest.raises(ValueError):  # seqs must rise; the turn stays open
        await held.end([StreamEntry(2, "r", "delta"), StreamEntry(1, "r", "delta")])
    _save(held, 1)
    await held.end()
    await held.end()
    with pytest.raises(RuntimeError):
        await held.end(_entries(1, 1))
    with pytest.raises(RuntimeError):
        _save(held, 2)
    assert (await store.load(SID)).state == b"state-1"
    assert await store.read_stream(SID) == []


async def test_a_cancel_after_its_reply_touches_no_later_reply(harness):
    store, other = harness.store, harness.twin()
    async with store.turn(SID, message_id="m-1") as held:
        assert not held.cancel_requested
        await held.end(_entries(1, 2, done=True))
    await other.request_cancel(SID, "m-1")  # too late
    await other.request_cancel(SID)  # no reply runs
    async with store.turn(SID, message_id="m-2") as held:
        assert not held.cancel_requested
        assert not await held.append(_entries(3, 1))
        await held.end(_entries(4, 1, done=True))
    assert [e.seq for e in await store.read_stream(SID)] == [1, 2, 3, 4]


@needs_redis
async def test_a_cancel_through_another_store_reaches_the_reply_it_names(redis_server):
    """Node B asks, node A's turn hears it with its next append (or as it begins)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    a, b = _redis_store(redis_server.url, prefix), _redis_store(redis_server.url, prefix)
    try:
        await b.request_cancel(SID, "m-3")  # before its turn begins
        held = await a.begin_turn(SID, message_id="m-1")
        assert not held.cancel_requested
        assert not await held.append(_entries(1, 1))
        await b.request_cancel(SID, "m-2")  # another message's
        assert not await held.append(_entries(2, 1))
        await b.request_cancel(SID, "m-1")
        assert await held.append(_entries(3, 1))
        assert held.cancel_requested
        await held.end(_entries(4, 1, done=True))

        async with a.turn(SID, message_id="m-3") as held:
            assert held.cancel_requested
        async with a.turn(SID, message_id="m-4") as held:
            assert not await held.append(_entries(5, 1))
            await b.request_cancel(SID)  # no id: the turn that holds the session now
            assert await held.append(_entries(6, 1))
            await held.end(_entries(7, 1, done=True))
        async with a.turn(SID, message_id="m-5") as held:  # the next turn is not touched
            assert not held.cancel_requested
            assert not await held.append(_entries(8, 1))

        # A retry of a released message runs (its cancel was for the failed attempt).
        await b.request_cancel(SID, "m-6")
        await a.release_message(SID, "m-6")
        async with a.turn(SID, message_id="m-6") as held:
            assert not held.cancel_requested
        # Turns forget their cancels; m-2 never began, so its cancel waits out its TTL.
        cancel_key = a.keys(SID).cancel
        assert await a.client.smembers(cancel_key) == {b"m:m-2"}
        assert 0 < await a.client.pttl(cancel_key) <= 60_000
    finally:
        await a.close()
        await b.close()


class _MinimalStore(SessionStore):
    """A third-party store with only the abstract methods (over a MemoryStore)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.calls: list[str] = []

    async def load(self, session_id):
        self.calls.append("load")
        return await self.inner.load(session_id)

    async def save_turn(self, session_id, **write):
        self.calls.append("save_turn")
        await self.inner.save_turn(session_id, **write)

    async def delete(self, session_id):
        await self.inner.delete(session_id)

    def lock(self, session_id):
        self.calls.append("lock")
        return self.inner.lock(session_id)


async def test_a_minimal_store_gets_turns_from_its_own_methods():
    store = _MinimalStore()
    for n in range(2):
        async with store.turn(SID, message_id="same") as held:  # no dedup: no claims
            assert held.tail is None
            _save(held, n)
            await held.end(_entries(1, 1))  # no stream: nothing kept
    assert (await store.load(SID)).state == b"state-1"
    assert store.calls == ["lock", "load", "save_turn"] * 2 + ["load"]


# Redis only: TTLs, layout, encoding, round trips.

DATA_KEYS = ("state", "memory", "history", "meta", "stream", "msgids")


async def _pttls(store, session_id=SID) -> dict[str, int]:
    keys = store.keys(session_id)
    return {name: await store.client.pttl(getattr(keys, name)) for name in DATA_KEYS}


@needs_redis
async def test_every_key_gets_the_ttl(redis_store):
    store = redis_store
    await store.claim_session(SID, "alice")
    await store.claim_message(SID, "m-1")
    await store.append_stream(SID, _entries(1, 2))
    await _turn(store, memory=(b"m",))
    pttls = await _pttls(store)
    assert all(0 < ttl <= TTL * 1000 for ttl in pttls.values()), pttls


@needs_redis
@pytest.mark.parametrize("refresh", ["load", "save_turn", "claim_session", "turn"])
async def test_ttl_slides(redis_store, refresh):
    store = redis_store
    await store.claim_session(SID, "alice")
    await store.claim_message(SID, "m-1")
    await store.append_stream(SID, _entries(1, 2))
    await _turn(store, memory=(b"m",))
    for key in store.keys(SID).data:
        await store.client.pexpire(key, 60_000)
    assert all(ttl <= 60_000 for ttl in (await _pttls(store)).values())
    if refresh == "load":
        await store.load(SID)
    elif refresh == "save_turn":
        await _turn(store, n=1)
    elif refresh == "turn":
        async with store.turn(SID, message_id="m-2"):
            pass
    else:
        await store.claim_session(SID, "bob")
    pttls = await _pttls(store)
    assert all(ttl > 60_000 for ttl in pttls.values()), pttls


@needs_redis
async def test_stream_and_claims_refresh_their_own_key(redis_store):
    store = redis_store
    keys = store.keys(SID)
    await store.append_stream(SID, _entries(1, 1))
    await store.claim_message(SID, "m-1")
    await store.client.pexpire(keys.stream, 60_000)
    await store.client.pexpire(keys.msgids, 60_000)
    await store.append_stream(SID, _entries(2, 1))
    await store.claim_message(SID, "m-2")
    assert await store.client.pttl(keys.stream) > 60_000
    assert await store.client.pttl(keys.msgids) > 60_000


async def _everything(store, session_id=SID):
    await store.claim_session(session_id, "alice")
    await store.claim_message(session_id, "m-1")
    async with store.lock(session_id):
        await _turn(store, session_id, memory=(b"\x80\x04\x95pretend", b"m"))
        await store.append_stream(session_id, [
            StreamEntry(1, "r-1", "started", data={"id": "m-1"}), *_entries(2, 2, done=True)])
        lock_key = store.keys(session_id).lock
        assert await store.client.get(lock_key) is not None


@needs_redis
async def test_keys_are_namespaced_with_a_hash_tag(redis_store):
    store = redis_store
    await _everything(store)
    await _everything(store, "x.y:z-1")
    prefix = store.keys(SID).state.split(":s:")[0]
    found = [k.decode() async for k in store.client.scan_iter(match=f"{prefix}:*")]
    assert len(found) == 12
    pattern = re.compile(rf"{re.escape(prefix)}:s:\{{(sess-1|x\.y:z-1)\}}:"
                         rf"({'|'.join(DATA_KEYS)})")
    assert all(pattern.fullmatch(k) for k in found), found


@needs_redis
async def test_nothing_is_pickled(redis_store):
    store = redis_store
    await _everything(store)
    keys = store.keys(SID)
    client = store.client
    assert await client.get(keys.state) == b"state-0"
    assert await client.lrange(keys.memory, 0, -1) == [b"\x80\x04\x95pretend", b"m"]
    for raw in await client.lrange(keys.history, 0, -1):
        assert isinstance(json.loads(raw), dict)
    meta = await client.hgetall(keys.meta)
    assert {k: meta.pop(k) for k in (b"owner", b"fence")} == {b"owner": b"alice",
                                                              b"fence": b"1"}
    assert set(meta.values()) == {b"1"} and set(meta) <= {b"s", b"y", b"m", b"q", b"i"}
    assert await client.smembers(keys.msgids) == {b"m-1"}
    for entry_id, fields in await client.xrange(keys.stream):
        assert re.fullmatch(rb"\d+-0", entry_id)
        assert set(fields) <= {b"r", b"k", b"t", b"d"}
        for value in fields.values():
            value.decode("utf-8")
        if b"d" in fields:
            assert isinstance(json.loads(fields[b"d"]), dict)
    for path in [*(ROOT / "mmchat" / "stores" / "redis").glob("*.py"),
                 ROOT / "mmchat" / "sessions.py"]:
        assert "pickle" not in _imports(path)


@needs_redis
async def test_corrupt_history_is_a_state_error(redis_store):
    await _turn(redis_store)
    await redis_store.client.rpush(redis_store.keys(SID).history, b"\x80\x04not json")
    with pytest.raises(StateError, match="history entry 2"):
        await redis_store.load(SID)


def command_names(packed: Any) -> list[str]:
    """The command names in one write to a Redis socket (RESP arrays, back to back)."""
    chunks = [packed] if isinstance(packed, (bytes, str, memoryview)) else packed
    data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
    names, i = [], 0
    while i < len(data):
        end = data.index(b"\r\n", i)
        count, i = int(data[i + 1:end]), end + 2
        for k in range(count):
            end = data.index(b"\r\n", i)
            length, i = int(data[i + 1:end]), end + 2
            if k == 0:
                names.append(data[i:i + length].decode().upper())
            i += length + 2
    return names


class RoundTrips:
    """Counts writes to Redis sockets: a pipeline is one write, a command is one.
    ``writes`` holds the command names of each write."""

    def __init__(self, store, monkeypatch) -> None:
        self.count = 0
        self.writes: list[list[str]] = []
        cls = store.client.connection_pool.connection_class
        original = cls.send_packed_command

        async def counting(conn, command, check_health=True):
            self.count += 1
            self.writes.append(command_names(command))
            return await original(conn, command, check_health)

        monkeypatch.setattr(cls, "send_packed_command", counting)

    async def measure(self, action: Awaitable[Any]) -> int:
        before = self.count
        await action
        return self.count - before


@needs_redis
async def test_round_trips(redis_store, monkeypatch):
    store = redis_store
    await store.load_scripts()  # opens the connection too
    trips = RoundTrips(store, monkeypatch)
    assert await trips.measure(store.load(SID)) == 1
    assert await trips.measure(_turn(store, memory=(b"a", b"b"))) == 1
    assert await trips.measure(store.load(SID)) == 1
    assert await trips.measure(store.claim_session(SID, "alice")) == 1
    assert await trips.measure(store.claim_message(SID, "m-1")) == 1
    assert await trips.measure(store.append_stream(SID, _entries(1, 20))) == 1
    assert await trips.measure(store.read_stream(SID)) == 1

    async def locked_turn():
        async with store.lock(SID):
            await store.load(SID)
            await _turn(store, n=1)

    assert await trips.measure(locked_turn()) == 4  # take, load, save, release

    held = await store.begin_turn(SID, message_id="m-2")
    assert trips.writes[-1] == ["EVALSHA"]  # owner, claim, lock, TTLs, state, memory, tail
    before = trips.count
    _save(held, 2, (b"c",))  # staged: no round trip
    assert trips.count == before
    assert await trips.measure(held.append(_entries(21, 1))) == 1
    assert trips.writes[-1] == ["EVALSHA"]  # fence, XADD, PEXPIRE, cancelled?
    assert await trips.measure(held.end(_entries(22, 2, done=True))) == 1
    assert trips.writes[-1] == ["EVALSHA"]  # fence, write, XADDs, cancels, release
    assert await trips.measure(store.request_cancel(SID, "m-9")) == 1

    async def turn():
        async with store.turn(SID) as held:
            _save(held, 3)

    assert await trips.measure(turn()) == 2


@needs_redis
async def test_turns_that_append_together_share_one_round_trip(redis_store, monkeypatch):
    store = redis_store
    await store.load_scripts()
    sessions = [f"{SID}-{i}" for i in range(5)]
    held = [await store.begin_turn(sid, message_id="m-1") for sid in sessions]
    await store.request_cancel(sessions[2], "m-1")
    # Session 3's stream is ahead: its append's seq is refused, and only its append fails.
    await store.append_stream(sessions[3], _entries(1, 3))
    trips = RoundTrips(store, monkeypatch)
    results = await asyncio.gather(*(h.append(_entries(1, 2, f"r-{i}"))
                                     for i, h in enumerate(held)), return_exceptions=True)
    assert trips.count == 1  # five turns' appends
    assert trips.writes[0] == ["EVALSHA"] * 5
    assert results[:3] + results[4:] == [False, False, True, False]
    assert isinstance(results[3], ValueError) and "does not follow" in str(results[3])
    for i, h in enumerate(held):
        await h.end([] if i == 3 else _entries(3, 1, f"r-{i}", done=True))
    for i, sid in enumerate(sessions):
        entries = await store.read_stream(sid)
        expected = ["r-1"] * 3 if i == 3 else [f"r-{i}"] * 3
        assert [e.response_id for e in entries] == expected


@needs_redis
async def test_turns_that_begin_and_end_together_share_one_round_trip_each(redis_store,
                                                                          monkeypatch):
    store = redis_store
    await store.load_scripts()
    sessions = [f"{SID}-{i}" for i in range(6)]
    await store.append_stream(sessions[4], _entries(1, 1))  # its end's seq is refused
    trips = RoundTrips(store, monkeypatch)
    held = await asyncio.gather(*(store.begin_turn(sid, message_id="m-1")
                                  for sid in sessions))
    assert trips.writes == [["EVALSHA"] * 6]  # six turns begun in one round trip
    trips.writes.clear()
    for i, h in enumerate(held):
        _save(h, 1, (f"m{i}".encode(),))
    results = await asyncio.gather(*(h.end(_entries(1, 2, f"r-{i}", done=True))
                                     for i, h in enumerate(held)), return_exceptions=True)
    assert trips.writes == [["EVALSHA"] * 6]  # and ended in one
    assert isinstance(results[4], ValueError) and "does not follow" in str(results[4])
    assert results[:4] + results[5:] == [None] * 5  # one refused end fails only itself
    for i, sid in enumerate(sessions):
        data = await store.load(sid)
        assert data.memory[-1] == f"m{i}".encode()
        assert await store.client.get(store.keys(sid).lock) is None


@needs_redis
async def test_a_failed_round_trip_fails_every_append_of_its_batch(redis_store, monkeypatch):
    store = redis_store
    held = [await store.begin_turn(f"{SID}-{i}") for i in range(3)]
    cls = store.client.connection_pool.connection_class

    async def broken(conn, command, check_health=True):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(cls, "send_packed_command", broken)
    results = await asyncio.gather(*(h.append(_entries(1, 1)) for h in held),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) and "append_stream" in str(r)
               for r in results)
    monkeypatch.undo()
    assert await held[0].append(_entries(1, 1)) is False  # the next batch goes through
    for h in held:
        await h.end()


@needs_redis
async def test_appends_of_a_cancelled_batch_are_cancelled_not_left_waiting(redis_store,
                                                                          monkeypatch):
    store = redis_store
    held = await store.begin_turn(SID)
    cls = store.client.connection_pool.connection_class
    stuck = asyncio.Event()

    async def hanging(conn, command, check_health=True):
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(cls, "send_packed_command", hanging)
    append = asyncio.create_task(held.append(_entries(1, 1)))
    await asyncio.wait_for(stuck.wait(), 10)
    for task in list(store.appends._sending):  # as asyncio.run does when it ends
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(append, 10)
    monkeypatch.undo()
    await held.end()


# Redis only: the lease lock.

@needs_redis
async def test_lock_release_only_by_its_owner(redis_store):
    store = redis_store
    lock_key = store.keys(SID).lock
    lock = store.lock(SID)
    async with lock:
        assert await store.client.get(lock_key) == lock.token.encode()
        # The lease ran out and another process took the lock meanwhile.
        await store.client.set(lock_key, "someone-else", px=60_000)
    assert await store.client.get(lock_key) == b"someone-else"
    assert not await lock.release()
    assert not await lock.renew()
    assert await store.client.pttl(lock_key) > 0


@needs_redis
async def test_lock_waits_for_a_dead_holders_lease(redis_store):
    store = redis_store
    await store.client.set(store.keys(SID).lock, "crashed-process", px=200)
    async with store.lock(SID):
        assert await store.client.get(store.keys(SID).lock) != b"crashed-process"


@needs_redis
async def test_lock_renew_extends_the_lease(redis_store):
    store = redis_store
    lock_key = store.keys(SID).lock
    lock = store.lock(SID)
    async with lock:
        await store.client.pexpire(lock_key, 1_000)
        assert await lock.renew()
        assert 1_000 < await store.client.pttl(lock_key) <= store.lock_lease * 1000


@needs_redis
@pytest.mark.parametrize("via", ["lock", "turn"])
async def test_lock_is_renewed_in_the_background(redis_server, caplog, via):
    store = _redis_store(redis_server.url, f"renew-{via}", lock_lease=0.3)
    lock_key = store.keys(SID).lock
    async def renewed() -> bool:
        return 0 < await store.client.pttl(lock_key) <= 300

    async def warned() -> bool:
        return "lost the lock" in caplog.text

    try:
        held = store.lock(SID) if via == "lock" else store.turn(SID)
        with caplog.at_level(logging.WARNING, logger="mmchat.stores.redis"):
            async with held:
                token = await store.client.get(lock_key)
                await store.client.pexpire(lock_key, 600_000)
                await eventually(renewed)
                assert await store.client.get(lock_key) == token
                await store.client.delete(lock_key)
                await eventually(warned)
    finally:
        await store.close()


@needs_redis
@pytest.mark.parametrize("via", ["lock", "turn"])
async def test_renewal_stops_even_if_the_driver_drops_its_cancellation(redis_server,
                                                                      monkeypatch, via):
    """Python 3.11's asyncio.wait_for, which redis-py writes through, returns normally
    when a cancellation lands as its write completes. Ending the turn used to wait for
    the renewer forever then (and the renewer kept the lock)."""
    from mmchat.stores.redis import RedisLock

    in_flight = asyncio.Event()

    async def renew_dropping_cancellation(lock) -> bool:
        in_flight.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # as the driver may
        return True

    monkeypatch.setattr(RedisLock, "renew", renew_dropping_cancellation)
    store = _redis_store(redis_server.url, f"drop-{via}", lock_lease=0.03)
    try:
        async with asyncio.timeout(10):
            for _ in range(3):
                in_flight.clear()
                async with store.lock(SID) if via == "lock" else store.turn(SID):
                    await in_flight.wait()
        assert await store.client.get(store.keys(SID).lock) is None
    finally:
        await store.close()


@needs_redis
async def test_a_turn_that_lost_its_session_to_another_writes_nothing(redis_server):
    """Turn A's lease runs out (it stalled) and turn B is granted the session: A's
    append and A's end (its staged write) are refused whole with TurnLost, B's state and
    stream stand, and B's lock is not released by A."""
    store = _redis_store(redis_server.url, f"fence-{uuid.uuid4().hex[:6]}", lock_lease=60)
    try:
        first = await store.begin_turn(SID)
        await first.append(_entries(1, 1))
        await first._lock.stop_renewal()
        await store.client.delete(store.keys(SID).lock)  # the lease ran out
        second = await store.begin_turn(SID)
        assert second.fence == first.fence + 1
        await second.append(_entries(2, 1, "r-2"))
        with pytest.raises(TurnLost):
            await first.append(_entries(2, 1))
        _save(first, 1)
        with pytest.raises(TurnLost):
            await first.end(_entries(3, 1, done=True))
        assert await store.client.get(store.keys(SID).lock) == second._lock.token.encode()
        _save(second, 2)
        await second.end(_entries(3, 1, "r-2", done=True))
        assert (await store.load(SID)).state == b"state-2"
        assert [(e.seq, e.response_id) for e in await store.read_stream(SID)] == [
            (1, "r-1"), (2, "r-2"), (3, "r-2")]
    finally:
        await store.close()


@needs_redis
async def test_a_turn_whose_lock_passed_on_still_saves_but_leaves_the_lock(redis_store, caplog):
    store = redis_store
    lock_key = store.keys(SID).lock
    with caplog.at_level(logging.WARNING, logger="mmchat.stores.redis"):
        async with store.turn(SID) as held:
            _save(held, 1)
            await store.client.set(lock_key, "someone-else", px=60_000)
    assert "had already passed to someone else" in caplog.text
    assert await store.client.get(lock_key) == b"someone-else"
    assert (await store.load(SID)).state == b"state-1"


# Redis only: outages.

UNAVAILABLE_CALLS: dict[str, Callable[[SessionStore], Awaitable[Any]]] = {
    "ping": lambda s: s.ping(),
    "load": lambda s: s.load(SID),
    "save_turn": lambda s: _turn(s, n=9),
    "delete": lambda s: s.delete(SID),
    "claim_session": lambda s: s.claim_session(SID, "alice"),
    "claim_message": lambda s: s.claim_message(SID, "m-9"),
    "release_message": lambda s: s.release_message(SID, "m-9"),
    "request_cancel": lambda s: s.request_cancel(SID),
    "append_stream": lambda s: s.append_stream(SID, _entries(100, 1)),
    "read_stream": lambda s: s.read_stream(SID),
    "wait_stream": lambda s: s.wait_stream(SID, 0, timeout=0.05),
    "stream_tail": lambda s: s.stream_tail(SID),
    "lock": lambda s: s.lock(SID).__aenter__(),
    "begin_turn": lambda s: s.begin_turn(SID, message_id="m-9"),
}


@needs_redis
@pytest.mark.parametrize("name", sorted({"BusyLoadingError", "ConnectionError", "TimeoutError",
                                         "ReadOnlyError", "ClusterDownError"}))
async def test_driver_errors_become_store_unavailable(redis_store, monkeypatch, name):
    from mmchat.stores.redis import UNAVAILABLE_ERRORS

    error = next(e for cls in UNAVAILABLE_ERRORS for e in cls.__subclasses__() + [cls]
                 if e.__name__ == name)
    pool = redis_store.client.connection_pool

    async def broken(*args, **kwargs):
        raise error("simulated")

    monkeypatch.setattr(pool, "get_connection", broken)
    for call in UNAVAILABLE_CALLS.values():
        with pytest.raises(StoreUnavailable, match=name):
            await call(redis_store)


@needs_redis
async def test_redis_restart_mid_conversation(tmp_path):
    server = RedisProcess(tmp_path)
    server.start()
    store = _redis_store(server.url, "restart", connect_timeout=0.5, socket_timeout=1.0,
                         lock_wait=0.5)
    try:
        await _turn(store, n=0, memory=(b"m0",))
        await store.claim_session(SID, "alice")
        server.stop()

        for name, call in UNAVAILABLE_CALLS.items():
            with pytest.raises(StoreUnavailable) as caught:
                await call(store)
            assert "Redis session store at redis://127.0.0.1" in str(caught.value), name
            assert caught.value.code == "store_unavailable"

        server.start()  # same port, no data: started with --save ""
        await eventually(_pings(store))
        data = await store.load(SID)
        assert data is None  # lost with the restart, but never half a session
        await _turn(store, n=1, memory=(b"m1",))
        await store.claim_session(SID, "bob")
        assert await store.load(SID) == SessionData(SID, b"state-1", [b"m1"], [
            {"role": "user", "text": "q1"},
            {"role": "bot", "text": "a1", "attention": {"image": 0.5}}], "bob")
        async with store.lock(SID):
            await store.append_stream(SID, _entries(1, 1, done=True))
        assert [e.seq for e in await store.read_stream(SID)] == [1]
    finally:
        await store.close()
        server.stop()


@pytest.mark.parametrize("args", [
    ("EVALSHA", "a" * 40, 2, "p:s:{x}:meta", "p:s:{x}:stream", 7, -3, 0.1, 1e300, "",
     "é ü ✓", b"\x00\xffbytes", memoryview(b"view"), bytearray(b"array")),
    ("CONFIG GET", "maxmemory"), (b"CLIENT SETNAME", "n")])
def test_connections_pack_commands_as_redis_py_does(args):
    """The store's connections pack with hiredis's C packer (as redis-py's sync client
    does), byte for byte what redis-py's asyncio packer writes, and refuse what it
    refuses."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from mmchat.stores.redis.client import reconnecting

    ours, plain = reconnecting(Connection)(), Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(plain.pack_command(*args))
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)


@needs_redis
@pytest.mark.parametrize("interval, stale_fails", [(0, True), (0.2, False)])
async def test_stale_pooled_connections_reconnect_after_a_restart(tmp_path, interval,
                                                                   stale_fails):
    server = RedisProcess(tmp_path)
    server.start()
    store = _redis_store(server.url, "stale", connect_timeout=0.5, socket_timeout=1.0,
                         health_check_interval=interval)
    try:
        await asyncio.gather(*(store.load(f"s{i}") for i in range(8)))  # 8 pooled connections
        server.stop()
        server.start()
        time.sleep(2 * interval + 0.1)  # idle, without the event loop seeing the old sockets close
        failed = 0
        for i in range(10):
            try:
                await store.load(f"t{i}")
            except StoreUnavailable:
                failed += 1
        assert (failed > 0) == stale_fails  # without the health check, stale ones fail once
    finally:
        await store.close()
        server.stop()


def _pings(store) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            await store.ping()
        except StoreUnavailable:
            return False
        return True

    return check


@needs_redis
async def test_release_while_redis_is_down_does_not_hide_the_turn(tmp_path, caplog):
    server = RedisProcess(tmp_path)
    server.start()
    store = _redis_store(server.url, "down", connect_timeout=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="mmchat.stores.redis"):
            async with store.lock(SID):
                server.stop()
        assert "could not release the lock" in caplog.text
    finally:
        await store.close()
        server.stop()


@needs_redis
async def test_pool_is_bounded_and_blocking(redis_server):
    store = _redis_store(redis_server.url, f"pool{uuid.uuid4().hex[:6]}", max_connections=1,
                         pool_timeout=0.05)
    writer = _redis_store(redis_server.url, store.keys(SID).state.split(":s:")[0])
    try:
        waiting = asyncio.create_task(store.wait_stream(SID, 0, timeout=4.0))

        async def blocked() -> bool:
            clients = await writer.client.client_list()
            return any(c.get("cmd") == "xread" for c in clients)

        await eventually(blocked)
        with pytest.raises(StoreUnavailable, match="No connection available"):
            await store.load(SID)
        await writer.append_stream(SID, _entries(1, 1))
        assert [e.seq for e in await waiting] == [1]
        assert await store.load(SID) is None
    finally:
        await store.close()
        await writer.close()


# Redis only: URLs, Sentinel, Cluster.

def test_url_forms():
    from mmchat.stores.redis import parse_redis_url

    single = parse_redis_url("rediss://:pw@cache:6380/2")
    assert (single.kind, single.ssl, single.display) == ("single", True, "rediss://cache:6380/2")
    assert parse_redis_url("unix:///run/redis.sock?db=1").kind == "single"

    cluster = parse_redis_url("redis+cluster://u:p%40ss@n1:7000,n2,[::1]:7002")
    assert (cluster.kind, cluster.hosts) == ("cluster", (("n1", 7000), ("n2", 6379),
                                                        ("::1", 7002)))
    assert (cluster.username, cluster.password, cluster.ssl) == ("u", "p@ss", False)
    assert cluster.display == "redis+cluster://n1:7000,n2,[::1]:7002"

    sentinel = parse_redis_url(
        "rediss+sentinel://:secret@s1,s2:26380/mymaster/3?sentinel_password=spw")
    assert (sentinel.kind, sentinel.hosts, sentinel.service, sentinel.db) == (
        "sentinel", (("s1", 26379), ("s2", 26380)), "mymaster", 3)
    assert (sentinel.password, sentinel.sentinel_password, sentinel.ssl) == (
        "secret", "spw", True)

    for bad in ["http://x", "redis+sentinel://s1:26379", "redis+sentinel://s1/m/x",
                "redis+cluster://n1/3", "redis+cluster://", "redis+cluster://n1:port"]:
        with pytest.raises(ConfigError):
            parse_redis_url(bad)


async def test_clients_for_each_url_form():
    from mmchat.stores.redis import RedisStore

    single = RedisStore("redis://127.0.0.1:1/0", max_connections=3, pool_timeout=0.5)
    pool = single.client.connection_pool
    assert type(pool).__name__ == "BlockingConnectionPool"
    assert (pool.max_connections, pool.timeout) == (3, 0.5)
    cluster = RedisStore("redis+cluster://127.0.0.1:1")
    assert type(cluster.client).__name__ == "RedisCluster"
    sentinel = RedisStore("redis+sentinel://127.0.0.1:1/mymaster")
    assert type(sentinel.client.connection_pool).__name__ == "SentinelConnectionPool"
    for store in (single, cluster, sentinel):
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await store.close()
    with pytest.raises(ConfigError):
        RedisStore(prefix="a{b}")


@pytest.fixture
def sentinel_port(redis_server, tmp_path):
    port = _free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n")
    sentinel = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        sentinel.kill()
        sentinel.wait()


@needs_redis
async def test_sentinel(sentinel_port):
    store = _redis_store(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster", "sentinel")
    try:
        await eventually(_pings(store))
        await _turn(store, "via-sentinel")
        assert (await store.load("via-sentinel")).state == b"state-0"
    finally:
        await store.close()


@pytest.fixture
def redis_cluster(tmp_path):
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")
    nodes = [RedisProcess(tmp_path, _free_cluster_port(), "--cluster-enabled", "yes",
                          "--cluster-config-file", f"nodes-{i}.conf") for i in range(3)]
    try:
        for node in nodes:
            node.start()
        subprocess.run([REDIS_CLI, "--cluster", "create",
                        *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@needs_redis
async def test_cluster(redis_cluster):
    ports = [n.port for n in redis_cluster]
    store = _redis_store(f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", "c")

    async def cluster_ok() -> bool:
        try:
            return (await store.client.cluster_info())["cluster_state"] == "ok"
        except Exception:  # noqa: BLE001 - the cluster is still forming
            return False

    try:
        await eventually(cluster_ok, limit=30)
        session_ids = [f"s{i}" for i in range(6)]  # spread over the three nodes
        for sid in session_ids:
            await _everything(store, sid)
            data = await store.load(sid)
            assert (data.owner, data.memory[-1]) == ("alice", b"m")
            assert [e.seq for e in await store.read_stream(sid)] == [1, 2, 3]
            assert [e.seq for e in await store.wait_stream(sid, 1, timeout=0.1)] == [2, 3]
            assert not await store.claim_message(sid, "m-1")
            async with store.turn(sid, message_id="m-2") as held:  # one node, one slot
                assert (held.state, held.memory, held.tail.seq) == (b"state-0",
                                                                    data.memory, 3)
                _save(held, 1, (b"n",))
                await held.end(_entries(4, 1, "r-2", done=True))
            data = await store.load(sid)
            assert (data.state, data.memory[-1]) == (b"state-1", b"n")
            assert (await store.stream_tail(sid)).seq == 4
            assert await store.client.get(store.keys(sid).lock) is None
            async with store.turn(sid, message_id="m-3") as held:  # appends, batched
                assert await held.append(_entries(5, 1, "r-3")) is False
                await held.end(_entries(6, 1, "r-3", done=True))
            assert (await store.stream_tail(sid)).seq == 6
            with pytest.raises(DuplicateMessage):
                await store.begin_turn(sid, message_id="m-2")
        keys = store.keys("s0")
        slots = {store.client.keyslot(key) for key in (*keys.data, keys.lock)}
        assert len(slots) == 1
        # a subject's sessions spread over the nodes: listed, then erased, slot by slot
        owned = [f"j{i}" for i in range(6)]
        for sid in owned:
            await store.claim_session(sid, "sub:José")
            await store.save_turn(sid, state=b"s", memory_added=[b"m"], max_memory=2,
                                  turns=[{"role": "user", "text": "hi"}])
        assert len({store.client.keyslot(store.keys(sid).meta) for sid in owned}) > 1
        await store.delete("j5")
        assert await store.owned_sessions("sub:José") == owned[:5]
        assert await store.erase_owned("sub:José") == Erased(5, 5, 5, 0, 0)
        assert await store.owned_sessions("sub:José") == []
        assert [await store.load(sid) for sid in owned] == [None] * 6
    finally:
        await store.close()


# Choosing a store, and what imports what.

def test_open_store_memory():
    store = open_store(SessionsConfig(backend="memory", ttl_seconds=5))
    assert isinstance(store, MemoryStore)


@needs_redis
async def test_open_store_redis(redis_server):
    store = open_store(SessionsConfig(backend="redis", url=redis_server.url, prefix="cfg",
                                      ttl_seconds=7, max_connections=2))
    try:
        assert type(store).__name__ == "RedisStore"
        assert store.client.connection_pool.max_connections == 2
        await _turn(store, "from-config")
        assert 0 < await store.client.pttl(store.keys("from-config").state) <= 7000
    finally:
        await store.close()


def test_redis_is_imported_lazily():
    code = ("import sys; from mmchat.config import SessionsConfig; "
            "from mmchat.stores import open_store; open_store(SessionsConfig()); "
            "import mmchat.protocol; "
            "assert 'redis' not in sys.modules and 'websockets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    return names


def test_only_the_redis_store_imports_redis():
    for path in (ROOT / "mmchat").rglob("*.py"):
        if path.parent != ROOT / "mmchat" / "stores" / "redis":
            assert "redis" not in _imports(path), path
    mine = [*(ROOT / "mmchat" / "protocol").rglob("*.py"), ROOT / "mmchat" / "sessions.py",
            *(ROOT / "mmchat" / "stores").rglob("*.py")]
    for path in mine:
        assert "websockets" not in _imports(path), path
