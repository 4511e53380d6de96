"""Scale-out: several ``mmchat serve`` nodes share one Redis (started here on a free port).

Two nodes run in this process (two engines, two Redis stores, two servers on their own
ports), except where a node must die or drain for real: there it is a
``mmchat serve`` subprocess, killed with SIGKILL or stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from conftest import TINY_MODEL
from test_redis_store import RoundTrips, needs_redis, redis_server  # noqa: F401  (a fixture)
from test_server import check_reply, running_server, server_config

from mmchat.client import Client, ConnectionLost
from mmchat.config import Config

pytestmark = needs_redis

#: Seconds a test that runs ``mmchat serve`` subprocesses may take before it fails (below
#: pytest-timeout's limit, so the failure names the line that was waiting).
SUBPROCESS_TEST_S = 240


def node_config(url: str, prefix: str, **sections) -> Config:
    sessions = {"backend": "redis", "url": url, "prefix": prefix, "lock_lease_seconds": 1.0,
                **sections.pop("sessions", {})}
    return server_config(sessions=sessions, **sections)


@pytest.fixture
def redis_url(request) -> str:
    """The Redis that test_redis_store starts for the session, on a free port."""
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def serve_argv() -> list[str]:
    """``mmchat serve``, or its click command directly while the CLI does not list it."""
    from mmchat.cli import build_cli

    if "serve" in build_cli().commands:
        return [sys.executable, "-m", "mmchat", "serve"]
    return [sys.executable, "-c", "import sys; from mmchat.commands.serve import "
            "serve_command; serve_command.main(sys.argv[1:], prog_name='mmchat serve')"]


def node_env(url: str, prefix: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    env.update({f"MMCHAT_MODEL__{k.upper()}": str(v) for k, v in TINY_MODEL.items()})
    env.update({"MMCHAT_SESSIONS__BACKEND": "redis", "MMCHAT_SESSIONS__URL": url,
                "MMCHAT_SESSIONS__PREFIX": prefix,
                "MMCHAT_SESSIONS__LOCK_LEASE_SECONDS": "1",
                "MMCHAT_SERVER__MESSAGES_PER_SECOND": "100",
                "MMCHAT_SERVER__PING_INTERVAL_SECONDS": "0",
                "MMCHAT_GENERATION__LOOP_NGRAM": "0",  # the untrained model repeats itself
                **settings})
    return env


@contextlib.asynccontextmanager
async def node_process(env: dict[str, str], tmp_path) -> AsyncIterator[tuple[object, str]]:
    """A ``mmchat serve --port 0`` subprocess and its URL (from its "ready" line)."""
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(), "--untrained", "--host", "127.0.0.1", "--port", "0", env=env,
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        while line := await proc.stderr.readline():
            lines.append(line.decode(errors="replace"))
            found = re.search(r"ready on (ws://\S+)", lines[-1])
            if found and not url.done():
                url.set_result(found.group(1))
        if not url.done():
            url.set_exception(RuntimeError("mmchat serve exited:\n" + "".join(lines)))

    reader = asyncio.create_task(drain())
    try:
        yield proc, await asyncio.wait_for(url, 120)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await reader
        proc.log = "".join(lines)


def _stream_append(write: list[str]) -> bool:
    """Whether one write to Redis only appends reply events and asks whether the reply
    was cancelled (MULTI XADD... PEXPIRE SMISMEMBER EXEC)."""
    return "XADD" in write and set(write) <= {"MULTI", "XADD", "PEXPIRE", "SMISMEMBER",
                                              "EXEC"}


async def test_a_turn_takes_two_round_trips_besides_its_stream_appends(redis_url, prefix,
                                                                      monkeypatch):
    """Counted at the socket: each write to Redis is one round trip (a pipeline is one
    write). Health-check PINGs of idle pooled connections are not the turn's; the lease
    is long enough that no renewal falls inside the count."""
    from mmchat.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=prefix, lock_lease=600)
    async with running_server(node_config(redis_url, prefix), store=store) as server:
        async with await Client.connect(server.url) as client:
            await client.reply("warm up", timeout=60)
            trips = RoundTrips(store, monkeypatch)
            reply = await client.reply("hello", timeout=60)
            check_reply(reply)
            writes = [w for w in trips.writes if w != ["PING"]]
            others = [w for w in writes if not _stream_append(w)]
            assert len(others) == 2, writes
            begin, end = others
            assert begin == ["EVAL"]  # claim the id, lock, read state, memory, tail
            # the engine's write, the reply's last events with its done, the unlock
            assert end[:2] == ["MULTI", "SET"] and end[-2:] == ["EVAL", "EXEC"], end
            assert "XADD" in end and writes[-1] == end
            assert writes[0] == begin and len(writes) >= 3  # a started/delta append

            # The embedded engine: hold, then save and unlock.
            del trips.writes[:]
            await server.engine.reply("embedded", "hello")
            assert [w[0] for w in trips.writes if w != ["PING"]] == ["EVAL", "MULTI"]
        assert [t["text"] for t in await server.engine.history(client.session_id)][::2] == [
            "warm up", "hello"]


async def test_a_session_started_on_one_node_continues_on_another(redis_url, prefix):
    config = node_config(redis_url, prefix)
    async with running_server(config) as a, running_server(config) as b:
        on_a = await Client.connect(a.url)
        first = await on_a.reply("hello")
        await on_a.close()
        on_b = await Client.connect(b.url, session_id=on_a.session_id, last_seq=on_a.last_seq)
        assert on_b.ready.resumed
        second = await on_b.reply("and then?")
        await on_b.close()
        assert second.started.seq == first.done.seq + 1
        history = await a.engine.history(on_a.session_id)
        assert [t["text"] for t in history[::2]] == ["hello", "and then?"]
        # The model state travelled: node A alone gives the same second reply.
        alone = await Client.connect(a.url)
        await alone.reply("hello")
        assert (await alone.reply("and then?")).done.text == second.done.text
        await alone.close()


async def test_concurrent_messages_through_two_nodes_run_in_order(redis_url, prefix):
    config = node_config(redis_url, prefix)
    async with running_server(config) as a, running_server(config) as b:
        one = await Client.connect(a.url)
        two = await Client.connect(b.url, session_id=one.session_id)
        texts, sent = {}, []
        for i in range(3):
            for name, client in (("a", one), ("b", two)):
                sent.append(await client.send(f"{name}{i}"))
                texts[sent[-1].message_id] = f"{name}{i}"
        for reply in sent:
            await reply.wait(60)
            check_reply(reply)
        await one.close()
        await two.close()
        history = await a.engine.history(one.session_id)
        users = [t["text"] for t in history[::2]]
        assert sorted(users) == sorted(texts.values())
        assert [u for u in users if u[0] == "a"] == ["a0", "a1", "a2"]
        assert [u for u in users if u[0] == "b"] == ["b0", "b1", "b2"]
        assert [t["role"] for t in history] == ["user", "assistant"] * 6
        entries = await a.store.read_stream(one.session_id)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        order = []
        for entry in entries:  # each reply's events are contiguous: started ... done
            if entry.kind == "started":
                order.append(entry.response_id)
            assert entry.response_id == order[-1]
        replies = [next(r for r in sent if r.response_id == rid) for rid in order]
        assert [texts[r.message_id] for r in replies] == users
        assert [r.done.text for r in replies] == [t["text"] for t in history[1::2]]


async def test_a_cancel_sent_to_another_node_stops_the_reply(redis_url, prefix):
    """The reply runs on node A; a second connection of the session, on node B, follows
    it (resume) and cancels it. B does not generate it, so the cancel goes through Redis.
    Unstopped, the reply would run to 4000 tokens and end ``length``."""
    config = node_config(redis_url, prefix, generation={"max_new_tokens": 4000})
    async with running_server(config) as a, running_server(config) as b:
        on_a = await Client.connect(a.url)
        reply = await on_a.send("hello there")
        seen = [await reply.__anext__() for _ in range(3)]

        on_b = await Client.connect(b.url, session_id=on_a.session_id, last_seq=0)
        assert on_b.ready.resumed
        followed = await on_b.next_reply(60)
        await followed.__anext__()
        assert followed.message_id == reply.message_id
        assert not b.turns.running(on_a.session_id)  # B follows, A generates
        await on_b.cancel(reply.message_id)

        done = await reply.wait(60)
        assert done.finish_reason == "cancelled"
        assert 3 <= done.usage.completion_tokens < 4000
        check_reply(reply)
        assert reply.deltas[:3] == seen
        assert await followed.wait(60) == done
        assert followed.started == reply.started and followed.deltas == reply.deltas
        entries = await a.store.read_stream(on_a.session_id)
        assert [e.seq for e in entries] == [reply.started.seq,
                                            *(d.seq for d in reply.deltas), done.seq]

        # The cancel is spent: the next reply of the session runs to its end.
        after = await on_b.reply("hello there", timeout=120)
        assert after.done.finish_reason == "length"
        check_reply(after, after_seq=done.seq)
        history = await a.engine.history(on_a.session_id)
        assert [t["finish_reason"] for t in history[1::2]] == ["cancelled", "length"]
        await on_a.close()
        await on_b.close()


async def test_a_reply_resumes_on_another_node_when_its_node_is_killed(
        redis_url, prefix, tmp_path):
    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="4096")
    config = node_config(redis_url, prefix, server={"resume_idle_seconds": 1.0})
    async with (asyncio.timeout(SUBPROCESS_TEST_S), running_server(config) as b,
                node_process(env, tmp_path) as (proc, url_a)):
        client = await Client.connect(url_a)
        first = await client.reply("hello", timeout=60)
        reply = await client.send("tell me a long story")
        seen = [await reply.__anext__() for _ in range(3)]
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(ConnectionLost):
            async for delta in reply:
                seen.append(delta)
        assert reply.done is None

        ready = await client.resume(b.url)
        assert ready.resumed
        rest = [d async for d in reply]
        assert reply.done.finish_reason == "error"
        assert [e.code for e in reply.errors] == ["reply_lost"]
        check_reply(reply, after_seq=first.done.seq)
        assert [d.seq for d in seen + rest] == [d.seq for d in reply.deltas]
        entries = await b.store.read_stream(client.session_id, first.done.seq)
        assert [e.seq for e in entries] == [reply.started.seq, *(d.seq for d in reply.deltas),
                                            reply.done.seq]
        assert entries[-1].text == "".join(d.text for d in seen + rest)

        after = await client.reply("are you there?", timeout=60)
        assert after.started.seq == reply.done.seq + 1
        history = await b.engine.history(client.session_id)
        assert [t["text"] for t in history[::2]] == ["hello", "are you there?"]
        await client.close()


async def test_sigterm_drains_a_node_then_closes_with_1001(redis_url, prefix, tmp_path):
    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="300")
    async with asyncio.timeout(SUBPROCESS_TEST_S), node_process(env, tmp_path) as (proc, url):
        client = await Client.connect(url)
        reply = await client.send("hello")
        await reply.__anext__()
        proc.send_signal(signal.SIGTERM)
        done = await reply.wait(120)
        assert done.finish_reason == "length" and done.usage.completion_tokens == 300
        check_reply(reply)
        event = await client.next_event(60)
        assert (event.code, event.fatal) == ("going_away", True)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert client.close_code == 1001
    assert "draining: 1 replies in flight" in proc.log and "mmchat stopped" in proc.log
