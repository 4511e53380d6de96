"""Sessions belong to subjects: list, export (JSON Lines) and erase them on both stores
(Redis: the server at 127.0.0.1:6379, under a prefix of this test's own), and a session
can start with a system text."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mmchat import Attachment, Engine, Erased, InputError, SessionForbidden
from mmchat.sessions import SessionStore, StreamEntry
from mmchat.stores.memory import MemoryStore

TOY = Attachment(bytes(range(16)), "application/x-toy")
REDIS_URL = "redis://127.0.0.1:6379/0"
SUBJECTS = ["a@b.com", "José", "🦊 fox", "x" * 256, "with/slash and ?query#"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _redis_store(prefix: str) -> Any:
    from mmchat.stores.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        await store.ping()
    except Exception as exc:  # StoreUnavailable
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    return store


async def _redis_keys(store: Any) -> list[str]:
    return sorted([k.decode() async for k in store.client.scan_iter(f"{store.prefix}:*")])


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield MemoryStore(clock=Clock())
        return
    prefix = f"test-subjects-{uuid.uuid4().hex[:12]}"
    made = await _redis_store(prefix)
    try:
        yield made
    finally:
        keys = await _redis_keys(made)
        if keys:
            await made.client.delete(*keys)
        await made.close()


async def _expire(store: SessionStore, session_id: str) -> None:
    """What a session's TTL running out does."""
    if isinstance(store, MemoryStore):
        store._clock.now += store._ttl + 1  # type: ignore[attr-defined]
    else:
        keys = store.keys(session_id)  # type: ignore[attr-defined]
        await store.client.delete(*keys.data)  # type: ignore[attr-defined]


async def test_any_utf8_subject_owns_sessions_and_lists_only_its_own(store, tiny_config,
                                                                     toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        for i, subject in enumerate(SUBJECTS):
            await engine.reply(f"s{i}", "hello", subject=subject)
        await engine.reply("s0b", "hello again", subject=SUBJECTS[0])
        await engine.reply("nobody", "hello")  # a session without a subject
        await store.claim_session("anon", "anonymous")  # the server's unauthenticated
        assert await engine.sessions(SUBJECTS[0]) == ["s0", "s0b"]
        for i, subject in enumerate(SUBJECTS[1:], 1):
            assert await engine.sessions(subject) == [f"s{i}"]
        assert await engine.sessions("nobody") == []
        assert await engine.sessions("anonymous") == []
        for bad in ["", "x" * 257, "\ud800"]:
            with pytest.raises(InputError, match="subject"):
                await engine.sessions(bad)
            with pytest.raises(InputError, match="subject"):
                await engine.reply("s9", "hi", subject=bad)
    if not isinstance(store, MemoryStore):  # subjects are hashed into keys, never raw
        keys = await _redis_keys(store)
        assert not [k for k in keys if "José" in k or "@" in k or "🦊" in k]
        assert sum(":o:{" in k for k in keys) == len(SUBJECTS)


async def test_another_subjects_session_is_refused(store, tiny_config, toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        await engine.reply("s", "mine", subject="alice")
        with pytest.raises(SessionForbidden):
            await engine.reply("s", "let me in", subject="bob")
        with pytest.raises(SessionForbidden):
            await engine.seed("s", system="be bob's", subject="bob")
        assert await engine.sessions("bob") == []
        assert len(await engine.history("s")) == 2
        await engine.reply("s", "a subject's session without one", subject=None)
        assert await engine.sessions("alice") == ["s"]


async def test_expired_sessions_drop_out_of_the_list(store, tiny_config, toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        await engine.reply("old", "hi", subject="alice")
        await _expire(store, "old")
        await engine.reply("new", "hi", subject="alice")
        assert await engine.sessions("alice") == ["new"]
        assert await engine.history("old") == []
    if not isinstance(store, MemoryStore):  # the index itself dropped it
        from mmchat.stores.redis.keys import owner_index

        index = owner_index(store.prefix, "sub:alice")
        assert await store.client.smembers(index) == {b"new"}


async def test_erase_takes_every_trace_and_counts_it(store, tiny_config, toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        for sid in ("a1", "a2"):
            await engine.reply(sid, "look", [TOY], subject="José")
            await engine.reply(sid, "and?", subject="José")
        await engine.seed("a3", system="You are brief.", subject="José")
        await engine.reply("b1", "mine", subject="bob")
        assert await store.claim_message("a1", "m-1")
        await store.append_stream("a1", [StreamEntry(1, "r", "started"),
                                         StreamEntry(2, "r", "done", "x")])
        before = await _redis_keys(store) if not isinstance(store, MemoryStore) else []

        erased = await engine.erase("José")

        assert erased == Erased(sessions=3, messages=9, memory=2, stream_events=2,
                                message_ids=1)
        assert await engine.sessions("José") == []
        for sid in ("a1", "a2", "a3"):
            assert await store.load(sid) is None
            assert await engine.history(sid) == []
            assert await store.read_stream(sid) == []
        assert await store.claim_message("a1", "m-1")  # the id was forgotten too
        await store.delete("a1")
        assert await engine.sessions("bob") == ["b1"]
        assert len(await engine.history("b1")) == 2
        assert await engine.erase("José") == Erased()
    if not isinstance(store, MemoryStore):
        left = await _redis_keys(store)
        assert [k for k in before if "{a" in k or ":o:{" in k]  # there was something
        assert not [k for k in left if "{a" in k]
        assert sum(":o:{" in k for k in left) == 1  # bob's index only


async def test_erase_waits_for_the_turn_that_holds_a_session(store, tiny_config,
                                                             toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        stream = await engine.stream("s", "hello", subject="alice")
        first = await stream.__anext__()  # the turn holds the session now
        erasing = asyncio.create_task(engine.erase("alice"))
        rest = [delta async for delta in stream]
        erased = await erasing
        assert stream.reply is not None and stream.reply.text == first.text + "".join(
            d.text for d in rest)
        assert erased == Erased(sessions=1, messages=2)  # the turn was saved, then erased
        assert await engine.history("s") == [] and await engine.sessions("alice") == []


async def test_erase_leaves_a_session_that_another_subject_holds(store):
    await store.claim_session("s", "sub:alice")
    await store.claim_session("s", "sub:mallory")  # refused: alice owns it, but indexed
    assert await store.owned_sessions("sub:mallory") == []
    assert await store.erase_owned("sub:mallory") == Erased()
    assert (await store.load("s")).owner == "sub:alice"


async def test_export_is_json_lines_of_whole_transcripts(store, tiny_config, toy_host):
    async with Engine(tiny_config, store=store, plugins=toy_host) as engine:
        await engine.seed("t1", system="You are kind.", subject="a@b.com")
        await engine.reply("t1", "look", [TOY], subject="a@b.com", strategy="sample",
                           seed=2, temperature=0.8)
        await engine.reply("t2", "hello", subject="a@b.com")
        await engine.reply("other", "hello", subject="bob")
        text = await engine.export(subject="a@b.com")
        one = await engine.export("t1")
        with pytest.raises(InputError, match="exactly one"):
            await engine.export()
    assert text.endswith("\n") and "José" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert [(r["session"], r["role"]) for r in records] == [
        ("t1", "system"), ("t1", "user"), ("t1", "assistant"), ("t2", "user"),
        ("t2", "assistant")]
    assert {r["subject"] for r in records} == {"a@b.com"}
    assert one == "".join(line + "\n" for line in text.splitlines()[:3])
    for record in records:
        assert len(record["id"]) == 32 and record["time"].endswith("+00:00")
    reply = records[2]
    assert reply["finish_reason"] in ("stop", "length")
    assert set(reply["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert set(reply["attention"]) <= {"toy", "text"} and reply["attention"]
    assert reply["generation"]["strategy"] == "sample" and reply["generation"]["seed"] == 2
    assert records[1]["attachments"] == [{"modality": "toy", "mime_type": TOY.mime_type,
                                          "id": TOY.id}]


async def test_a_system_text_starts_a_session_without_generating(tiny_config, toy_host):
    from mmchat.state import loads_state

    async with Engine(tiny_config, plugins=toy_host) as engine:
        added = await engine.seed("kind", system="You are kind.")
        assert [(t["role"], t["text"]) for t in added] == [("system", "You are kind.")]
        assert await engine.history("kind") == added
        await engine.seed("terse", system="Be terse, always.")
        states = {s: loads_state((await engine.store.load(s)).state)
                  for s in ("kind", "terse")}
        assert states["kind"].turns == 0 and states["kind"].pending == [
            engine.tokenizer.eos_id]
        assert (states["kind"].rnn - states["terse"].rnn).abs().max() > 1e-6
        # the same system text as a transcript's first entry: the same state
        await engine.seed("again", [added[0]])
        again = loads_state((await engine.store.load("again")).state)
        assert (again.rnn - states["kind"].rnn).abs().max() == 0
        # and with turns after it, as an export gives them back
        await engine.reply("kind", "hello")
        exported = [json.loads(line) for line in (await engine.export("kind")).splitlines()]
        await engine.seed("copy", exported)
        assert [t["role"] for t in await engine.history("copy")] == [
            "system", "user", "assistant"]
        assert (await engine.reply("copy", "and now?")).completion_tokens > 0
        with pytest.raises(InputError, match="has turns already"):
            await engine.seed("kind", system="too late")
        with pytest.raises(InputError, match="once"):
            await engine.seed("x", [added[0]], system="twice")
        with pytest.raises(InputError, match="non-empty"):
            await engine.seed("x", system="  ")
        assert len(await engine.history("kind")) == 3
        assert await engine.history("x") == []


def test_the_sync_twins(tiny_config, toy_host):
    from mmchat import SyncEngine

    with SyncEngine(tiny_config, plugins=toy_host) as engine:
        engine.seed("s", system="Hi there.", subject="José")
        engine.reply("s", "hello", subject="José")
        assert engine.sessions("José") == ["s"]
        assert len(engine.export(subject="José").splitlines()) == 3
        assert engine.erase("José") == Erased(sessions=1, messages=3)
        assert engine.history("s") == []
    embedded = Engine(tiny_config, plugins=toy_host)
    try:
        embedded.reply_sync("t", "hello", subject="ann")
        assert "".join(d.text for d in embedded.stream_sync("u", "hi", subject="ann"))
        assert embedded.sync().sessions("ann") == ["t", "u"]
    finally:
        embedded.close_sync()


async def test_redis_claims_keep_an_unread_index_near_its_live_sessions():
    from mmchat.stores.redis.keys import owner_index
    from mmchat.stores.redis.owners import PRUNE_FROM

    store = await _redis_store(f"test-subjects-{uuid.uuid4().hex[:12]}")
    index = owner_index(store.prefix, "sub:carol")
    try:
        for i in range(PRUNE_FROM - 1):  # sessions that expired without a list
            await store.claim_session(f"gone-{i}", "sub:carol")
            await store.delete(f"gone-{i}")
        assert await store.client.scard(index) == PRUNE_FROM - 1
        await store.claim_session("live", "sub:carol")
        assert await store.client.smembers(index) == {b"live"}
    finally:
        keys = await _redis_keys(store)
        if keys:
            await store.client.delete(*keys)
        await store.close()
