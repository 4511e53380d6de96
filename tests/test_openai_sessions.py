"""The OpenAI endpoint's sessions: whole histories continued or rebuilt (counted from
``/metrics``), the store's aliases (memory and real Redis) and two nodes sharing them."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from test_openai import clients, data_url, follow_up, openai_server, sessions_counted
from test_redis_store import TTL, harness, needs_redis, redis_server  # noqa: F401
from test_server import SECRET, running_server, server_config

from mmchat.protocol import make_token


@pytest.fixture
async def server():
    async with openai_server() as s:
        yield s


# -- whole histories onto sessions --------------------------------------------------------

async def test_a_conversation_continues_its_session_and_an_edited_one_is_rebuilt(
        server, image_dir):
    _, client = clients(server)
    picture = {"type": "image_url",
               "image_url": {"url": data_url(image_dir / "circle.png", "image/png")}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "look"}, picture]}]
    first = await client.chat.completions.create(model="mmchat", messages=messages)
    session = first.model_extra["mmchat"]["session_id"]
    follow_up(messages, first, "and the colour?")
    stream = await client.chat.completions.create(model="mmchat", messages=messages,
                                                  stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert sessions_counted(server) == {"new": 1, "continued": 1}
    follow_up(messages, streamed, "thanks")
    third = await client.chat.completions.create(model="mmchat", messages=messages)
    assert third.model_extra["mmchat"]["session_id"] == session
    assert sessions_counted(server) == {"new": 1, "continued": 2}
    history = await server.engine.history(session)
    assert [t["text"] for t in history[::2]] == ["look", "and the colour?", "thanks"]

    # the client edits an earlier reply: another conversation, seeded from the history
    messages[1] = {"role": "assistant", "content": "a red circle"}
    edited = await client.chat.completions.create(model="mmchat", messages=messages)
    rebuilt = edited.model_extra["mmchat"]["session_id"]
    assert rebuilt != session
    assert sessions_counted(server) == {"new": 1, "continued": 2, "rebuilt": 1}
    history = await server.engine.history(rebuilt)
    assert [t["text"] for t in history[:-1]] == [m["content"] if isinstance(
        m["content"], str) else "look" for m in messages]
    assert history[1]["finish_reason"] == "seeded"
    assert [a["modality"] for a in history[0]["attachments"]] == ["image"]

    # the same request again (a regenerated reply): the session moved on, so rebuilt
    await client.chat.completions.create(model="mmchat", messages=messages)
    assert sessions_counted(server)["rebuilt"] == 2
    await client.close()


async def test_a_rebuilt_session_replies_as_the_continued_one_would(server):
    _, client = clients(server)
    messages = [{"role": "user", "content": "hello"}]
    first = await client.chat.completions.create(model="mmchat", messages=messages)
    follow_up(messages, first, "and then?")
    continued = await client.chat.completions.create(model="mmchat", messages=messages)
    rebuilt = await client.chat.completions.create(model="mmchat", messages=messages)
    assert sessions_counted(server) == {"new": 1, "continued": 1, "rebuilt": 1}
    assert rebuilt.choices[0].message.content == continued.choices[0].message.content
    await client.close()


async def test_a_system_text_starts_the_session_and_a_changed_one_rebuilds(server):
    _, client = clients(server)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "answer in French"},
        {"role": "user", "content": "hello"}]
    first = await client.chat.completions.create(model="mmchat", messages=messages)
    session = first.model_extra["mmchat"]["session_id"]
    history = await server.engine.history(session)
    assert [(t["role"], t["text"]) for t in history[:2]] == [
        ("system", "answer in French"), ("user", "hello")]
    follow_up(messages, first, "and then?")
    again = await client.chat.completions.create(model="mmchat", messages=messages)
    assert again.model_extra["mmchat"]["session_id"] == session
    assert sessions_counted(server) == {"new": 1, "continued": 1}

    # the same turns under another system text: another conversation, rebuilt with it
    messages[0]["content"] = "answer in German"
    changed = await client.chat.completions.create(model="mmchat", messages=messages)
    rebuilt = changed.model_extra["mmchat"]["session_id"]
    assert rebuilt != session
    assert sessions_counted(server) == {"new": 1, "continued": 1, "rebuilt": 1}
    history = await server.engine.history(rebuilt)
    assert [(t["role"], t["text"]) for t in history[:3]] == [
        ("system", "answer in German"), ("user", "hello"),
        ("assistant", first.choices[0].message.content)]
    assert history[2]["finish_reason"] == "seeded"
    await client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_token_sessions_are_the_subjects_and_erasing_them_leaves_no_way_back(
        backend, request):
    """Sessions made with a token are its subject's (listed, exported, erased); the
    conversation's alias outlives the erase but only rebuilds, never reaches them."""
    sessions: dict[str, Any] = {}
    if backend == "redis":
        redis = request.getfixturevalue("redis_server")
        sessions = {"backend": "redis", "url": redis.url,
                    "prefix": f"oai{uuid.uuid4().hex[:8]}"}
    config = server_config(server={"http_port": 0, "auth_secret_env": "TEST_MMCHAT_SECRET"},
                           sessions=sessions)
    subject = "José/ö@example.com"
    async with running_server(config, env={"TEST_MMCHAT_SECRET": SECRET}) as server:
        _, client = clients(server, make_token(SECRET, subject, 4_000_000_000))
        messages = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello"}]
        first = await client.chat.completions.create(model="mmchat", messages=messages)
        session = first.model_extra["mmchat"]["session_id"]
        follow_up(messages, first, "and you?")
        second = await client.chat.completions.create(model="mmchat", messages=messages)
        assert second.model_extra["mmchat"]["session_id"] == session
        assert await server.engine.sessions(subject) == [session]
        exported = await server.engine.export(subject=subject)
        assert [json.loads(line)["role"] for line in exported.splitlines()] == [
            "system", "user", "assistant", "user", "assistant"]

        erased = await server.engine.erase(subject)
        assert (erased.sessions, erased.messages) == (1, 5)
        # the client sends the history again: its alias names the erased session
        follow_up(messages, second, "still there?")
        third = await client.chat.completions.create(model="mmchat", messages=messages)
        again = third.model_extra["mmchat"]["session_id"]
        assert again != session
        assert sessions_counted(server) == {"new": 1, "continued": 1, "rebuilt": 1}
        assert await server.store.load(session) is None
        assert await server.engine.sessions(subject) == [again]
        assert [t["role"] for t in await server.engine.history(again)][:2] == [
            "system", "user"]
        await client.close()


async def test_the_store_hands_an_alias_to_one_taker(harness):  # noqa: F811
    store = harness.store
    assert await store.take_alias("k1") is None
    await store.set_alias("k1", "session-1")
    takers = await asyncio.gather(*(harness.twin().take_alias("k1") for _ in range(5)))
    assert sorted(takers, key=str) == [None, None, None, None, "session-1"]
    await store.set_alias("k2", "session-2")
    if harness.kind == "memory":
        harness.clock[0] += TTL + 1
        assert await store.take_alias("k2") is None
    else:
        ttl = await store.client.pttl(f"{store._prefix}:alias:k2")
        assert 0 < ttl <= TTL * 1000


@needs_redis
async def test_any_node_continues_a_conversation_through_redis(redis_server):  # noqa: F811
    sessions = {"backend": "redis", "url": redis_server.url,
                "prefix": f"oai{uuid.uuid4().hex[:8]}"}
    config = server_config(server={"http_port": 0}, sessions=sessions)
    async with running_server(config) as one, running_server(config) as two:
        _, first = clients(one)
        _, second = clients(two)
        messages = [{"role": "user", "content": "hello"}]
        done = await first.chat.completions.create(model="mmchat", messages=messages)
        follow_up(messages, done, "and you?")
        again = await second.chat.completions.create(model="mmchat", messages=messages)
        assert sessions_counted(two) == {"continued": 1}
        session = again.model_extra["mmchat"]["session_id"]
        assert session == done.model_extra["mmchat"]["session_id"]
        assert len(await two.engine.history(session)) == 4
        await first.close()
        await second.close()
