"""Scale-out: several ``mmchat serve`` nodes share one Redis (started here on a free port).

Two nodes run in this process (two engines, two Redis stores, two servers on their own
ports), except where a node must die or drain for real: there it is a
``mmchat serve`` subprocess, killed with SIGKILL, stalled with SIGSTOP or stopped
with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator

import pytest
from conftest import TINY_MODEL
from test_redis_store import (  # noqa: F401  (a fixture)
    RoundTrips,
    eventually,
    needs_redis,
    redis_server,
)
from test_server import check_reply, running_server, server_config

from mmchat.client import Client, ConnectionLost
from mmchat.config import Config
from mmchat.protocol import Error

pytestmark = needs_redis

#: Seconds a test that runs ``mmchat serve`` subprocesses may take before it fails (below
#: pytest-timeout's limit, so the failure names the line that was waiting).
SUBPROCESS_TEST_S = 240


def node_config(url: str, prefix: str, **sections) -> Config:
    sessions = {"backend": "redis", "url": url, "prefix": prefix, "lock_lease_seconds": 1.0,
                **sections.pop("sessions", {})}
    return server_config(sessions=sessions, **sections)


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


async def test_a_turn_takes_two_round_trips_besides_its_stream_appends(redis_url, prefix,
                                                                      monkeypatch):
    """Counted at the socket: each write to Redis is one round trip (a pipeline is one
    write). Health-check PINGs of idle pooled connections are not the turn's; the lease
    is long enough that no renewal falls inside the count. Each write is one script:
    begin (owner, claim, lock, reads), appends (fence, events, cancelled?), end (fence,
    write, last events, release)."""
    from mmchat.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=prefix, lock_lease=600)
    async with running_server(node_config(redis_url, prefix), store=store) as server:
        async with await Client.connect(server.url) as client:
            await client.reply("warm up", timeout=60)
            trips = RoundTrips(store, monkeypatch)
            reply = await client.reply("hello", timeout=60)
            check_reply(reply)
            writes = [w for w in trips.writes if w != ["PING"]]
            assert all(w == ["EVALSHA"] for w in writes), writes
            # begin, at least one append (started, deltas), end (with the done)
            assert 3 <= len(writes) <= 2 + len(reply.deltas) + 1, writes

            # The embedded engine: hold, then save and unlock.
            del trips.writes[:]
            await server.engine.reply("embedded", "hello")
            assert [w for w in trips.writes if w != ["PING"]] == [["EVALSHA"], ["EVALSHA"]]
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


# Fair, fenced turns: served in arrival order (the Redis lock is a queue), a node that
# stalls past its lease cannot overwrite newer state, and a dead node's sessions are
# usable again on the first message with the default settings.

ROUNDS = 25


async def test_turns_run_in_arrival_order_across_two_nodes(redis_url, prefix):
    """2 nodes x 4 connections (two on each) of one session: each round, a third party
    holds the session while the four messages arrive one after another (each waits in
    the queue before the next is sent), in a shuffled order of connections; then the
    turns must run in exactly that order."""
    from mmchat.stores.redis import RedisStore

    config = node_config(redis_url, prefix)
    rng = random.Random(15)
    holder_store = RedisStore(redis_url, prefix=prefix, lock_lease=60)
    try:
        async with running_server(config) as a, running_server(config) as b:
            first = await Client.connect(a.url)
            sid = first.session_id
            clients = [first, await Client.connect(a.url, session_id=sid),
                       await Client.connect(b.url, session_id=sid),
                       await Client.connect(b.url, session_id=sid)]
            queue = holder_store.keys(sid).queue
            expected: list[str] = []
            for n in range(ROUNDS):
                order = rng.sample(range(4), 4)
                async with holder_store.lock(sid):
                    replies = []
                    for place, i in enumerate(order, 1):
                        replies.append(await clients[i].send(f"round {n} from {i}"))
                        expected.append(f"round {n} from {i}")

                        async def queued(place: int = place) -> bool:
                            return await holder_store.client.llen(queue) == place

                        await eventually(queued, 60)
                for reply in replies:
                    await reply.wait(60)
                    check_reply(reply)
                seqs = [r.started.seq for r in replies]
                assert seqs == sorted(seqs), (n, order)
            history = await a.engine.history(sid)
            assert [t["text"] for t in history[::2]] == expected
            for client in clients:
                await client.close()
    finally:
        await holder_store.close()


async def test_a_stalled_node_cannot_overwrite_newer_state(redis_url, prefix, tmp_path):
    """Node A stalls (SIGSTOP) mid-reply past its 1 s lease; node B serves the next
    message, closing A's reply. When A wakes (SIGCONT), each write of its turn is
    refused: the session's state and history stay B's, and A's client gets
    ``reply_lost`` and a ``done`` with finish reason ``error``."""
    from mmchat.stores.redis import RedisStore

    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="4096")
    config = node_config(redis_url, prefix)
    store = RedisStore(redis_url, prefix=prefix)
    try:
        async with (asyncio.timeout(SUBPROCESS_TEST_S), running_server(config) as b,
                    node_process(env, tmp_path) as (proc, url_a)):
            on_a = await Client.connect(url_a)
            first = await on_a.reply("hello", timeout=60)
            sid = on_a.session_id
            keys = store.keys(sid)
            reply = await on_a.send("tell me a long story")
            seen = [await reply.__anext__() for _ in range(3)]
            proc.send_signal(signal.SIGSTOP)
            try:
                async def lease_ran_out() -> bool:
                    return not await store.client.exists(keys.lock)

                await eventually(lease_ran_out, 30)
                on_b = await Client.connect(b.url, session_id=sid)
                after = await on_b.reply("are you there?", timeout=60)
                check_reply(after)
                state = await store.client.get(keys.state)
                history = await b.engine.history(sid)
                assert [t["text"] for t in history[::2]] == ["hello", "are you there?"]
            finally:
                proc.send_signal(signal.SIGCONT)

            rest = [d async for d in reply]
            assert reply.done.finish_reason == "error"
            assert "reply_lost" in [e.code for e in reply.errors]
            assert [d.seq for d in reply.deltas] == [d.seq for d in seen + rest]
            # A's reply ends where B closed it in the stream, before B's own reply.
            entries = await store.read_stream(sid, first.done.seq)
            closed = [e for e in entries if e.response_id == reply.response_id and e.final]
            assert [e.seq for e in closed] == [reply.done.seq] == [after.started.seq - 1]
            assert [e.seq for e in entries] == list(range(first.done.seq + 1,
                                                          after.done.seq + 1))

            # A's turn has ended (its client got done), and wrote nothing.
            async def a_ended() -> bool:
                return await store.client.llen(keys.queue) == 0 and not await \
                    store.client.exists(keys.lock)

            await eventually(a_ended, 30)
            await on_a.ping()  # A is awake and has handled its turn's end
            assert await store.client.get(keys.state) == state
            assert await b.engine.history(sid) == history
            assert (await store.read_stream(sid))[-1].seq == after.done.seq
            await on_a.close()
            await on_b.close()
    finally:
        await store.close()


async def test_failover_with_default_settings_serves_the_first_message(redis_url, prefix,
                                                                       tmp_path):
    """Default lease and wait: after node A dies (SIGKILL) mid-reply, the next message
    of its session, on node B, waits out A's lease and is served (it was
    ``session_busy`` when the lease was longer than the wait), and a client that
    follows A's reply on B gets ``reply_lost`` before its ``done``."""
    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="4096")
    del env["MMCHAT_SESSIONS__LOCK_LEASE_SECONDS"]
    config = server_config(sessions={"backend": "redis", "url": redis_url, "prefix": prefix})
    async with (asyncio.timeout(SUBPROCESS_TEST_S), running_server(config) as b,
                node_process(env, tmp_path) as (proc, url_a)):
        on_a = await Client.connect(url_a)
        await on_a.reply("hello", timeout=60)
        reply = await on_a.send("tell me a long story")
        seen = [await reply.__anext__() for _ in range(3)]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

        follower = await Client.connect(b.url, session_id=on_a.session_id,
                                        last_seq=seen[-1].seq)  # not its message
        followed = await follower.next_reply(60)
        after = await Client.connect(b.url, session_id=on_a.session_id)
        served = await after.reply("are you there?", timeout=60)
        check_reply(served)
        await followed.wait(60)
        assert followed.response_id == reply.response_id
        assert followed.done.finish_reason == "error"
        lost = await follower.next_event(10)  # the error of a reply it did not ask for
        assert isinstance(lost, Error) and (lost.code, lost.ref) == ("reply_lost",
                                                                     reply.message_id)
        assert served.started.seq == followed.done.seq + 1
        await follower.close()
        await after.close()


async def test_a_waiter_gives_up_with_its_place_in_the_queue(redis_url, prefix):
    from mmchat.errors import SessionBusy
    from mmchat.stores.redis import RedisStore

    stores = [RedisStore(redis_url, prefix=prefix, lock_lease=1.0, lock_wait=w)
              for w in (60, 60, 0.2)]
    try:
        async with stores[0].lock("s"):
            second = asyncio.create_task(stores[1].lock("s").__aenter__())

            async def queued() -> bool:
                return await stores[0].client.llen(stores[0].keys("s").queue) == 1

            await eventually(queued)
            with pytest.raises(SessionBusy, match="place 2 of its queue"):
                async with stores[2].lock("s"):
                    pass
            assert await stores[0].client.llen(stores[0].keys("s").queue) == 1
        await second  # the first in line got it
        assert await stores[0].client.get(stores[0].keys("s").lock) is not None
    finally:
        for store in stores:
            await store.close()
