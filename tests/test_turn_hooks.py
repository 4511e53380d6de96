"""prepare_turn, redact_text and record_turn: called for every turn, whatever the entry."""

import asyncio
import re

import pytest
from conftest import TINY_MODEL

from mmchat import Attachment, Engine, hookimpl
from mmchat.client import Client, ServerError
from mmchat.config import from_dict
from mmchat.errors import PluginError, Refused
from mmchat.server import ChatServer

TOY = Attachment(b"abcdefgh", "application/x-toy")


def config(**sections):
    data = {"model": dict(TINY_MODEL), "generation": {"max_new_tokens": 12, "loop_ngram": 0},
            "server": {"messages_per_second": 100.0, "burst": 50, "ping_interval_seconds": 0.0}}
    data.update(sections)
    return from_dict(data, env={})


class Moderator:
    """Refuses "forbidden", turns "rude" into "polite" and drops toy attachments of "hi"."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def prepare_turn(self, session_id, text, attachments):
        self.seen.append((session_id, text, [a.mime_type for a in attachments]))
        if "forbidden" in text:
            raise Refused("that topic is not allowed here")
        if "rude" in text:
            return text.replace("rude", "polite"), attachments
        if text == "hi" and attachments:
            return text, []
        return None


class Stars:
    """Turns every visible character into "#" and keeps the finished texts it saw."""

    def __init__(self):
        self.finals = []

    @hookimpl
    def redact_text(self, text, final):
        if final:
            self.finals.append(text)
        return hidden(text)


def hidden(text):
    return re.sub(r"\S", "#", text)


class Recorder:
    def __init__(self):
        self.turns = []

    @hookimpl
    async def record_turn(self, session_id, text, attachments, reply):
        await asyncio.sleep(0)
        self.turns.append((session_id, text, len(attachments), reply))


@pytest.fixture
def hooked(toy_host):
    plugins = {"moderator": Moderator(), "stars": Stars(), "recorder": Recorder()}
    for name, plugin in plugins.items():
        toy_host.register(plugin, name)
    return toy_host, plugins


async def test_prepare_turn_changes_or_refuses_the_message_for_reply_and_stream(hooked):
    host, p = hooked
    async with Engine(config(), plugins=host) as engine:
        await engine.reply("s", "a rude question")
        history = await engine.history("s")
        assert history[0]["text"] == "a polite question"
        reply = await engine.reply("s", "hi", [TOY])
        assert "toy" not in reply.attention
        assert (await engine.history("s"))[2]["attachments"] == []
        with pytest.raises(Refused, match="that topic is not allowed here") as info:
            await engine.stream("t", "something forbidden", [TOY])
        assert info.value.code == "refused"
        assert await engine.store.load("t") is None  # nothing stored
        assert p["moderator"].seen[-1] == ("t", "something forbidden", ["application/x-toy"])


async def test_redact_text_rewrites_every_delta_and_the_stored_reply(hooked):
    host, p = hooked
    async with Engine(config(), plugins=host) as engine:
        stream = await engine.stream("s", "hello there")
        deltas = [d.text async for d in stream]
        raw = p["stars"].finals[-1]
        assert raw.strip() and raw != hidden(raw)  # the model said something; nobody saw it
        assert "".join(deltas) == hidden("".join(deltas)) and "#" in "".join(deltas)
        assert stream.reply.text == hidden(raw)
        assert (await engine.history("s"))[1]["text"] == stream.reply.text


async def test_record_turn_sees_every_reply_with_attention_and_timings(hooked):
    host, p = hooked
    async with Engine(config(), plugins=host) as engine:
        first = await engine.reply("s", "hello", [TOY])
        await (await engine.stream("s", "again")).wait()
    (sid, text, n, reply), second = p["recorder"].turns
    assert (sid, text, n) == ("s", "hello", 1) and reply is first
    assert reply.attention["toy"] > 0 and reply.timings["total"] > 0
    assert second[1] == "again"


async def test_the_hooks_run_for_websocket_turns(hooked):
    host, p = hooked
    c = config()
    engine = Engine(c, plugins=host)
    server = await ChatServer(c, engine=engine).start("127.0.0.1", 0)
    try:
        async with await Client.connect(server.url) as client:
            reply = await client.reply("a rude hello there", timeout=60)
            streamed = "".join(d.text for d in reply.deltas)
            assert "#" in streamed and streamed == hidden(streamed)
            assert reply.done.text == "".join(d.text for d in reply.deltas)
            with pytest.raises(ServerError) as info:
                await client.reply("forbidden", timeout=60)
            assert info.value.code == "refused"
            assert "not allowed" in str(info.value)
    finally:
        await server.shutdown(drain_seconds=10)
        await engine.close()
    assert p["moderator"].seen[0][1] == "a rude hello there"
    [(sid, text, _, recorded)] = p["recorder"].turns
    assert text == "a polite hello there" and recorded.text == reply.done.text


class Broken:
    def __init__(self, hook):
        self.hook = hook

    @hookimpl
    def prepare_turn(self, text):
        if self.hook == "prepare_turn" and "boom" in text:
            raise ValueError("moderation model crashed")

    @hookimpl
    def redact_text(self, text, final):
        if self.hook == "redact_text":
            raise KeyError("redactor crashed")

    @hookimpl
    def record_turn(self, reply):
        if self.hook == "record_turn":
            raise RuntimeError("metrics backend down")


@pytest.mark.parametrize("hook", ["prepare_turn", "redact_text"])
async def test_a_failing_hook_fails_only_its_turn_and_stores_nothing(toy_host, hook):
    toy_host.register(Broken(hook), "broken")
    async with Engine(config(), plugins=toy_host) as engine:
        with pytest.raises(PluginError, match=rf"plugin 'broken' failed: {hook} raised") as info:
            await engine.reply("s", "boom")
        assert info.value.code == "plugin_error"
        assert await engine.store.load("s") is None
        if hook == "prepare_turn":
            assert (await engine.reply("t", "fine")).completion_tokens > 0


async def test_a_failing_record_turn_leaves_the_reply_alone(toy_host, caplog):
    toy_host.register(Broken("record_turn"), "broken")
    async with Engine(config(), plugins=toy_host) as engine:
        reply = await engine.reply("s", "hello")
        assert reply.completion_tokens > 0 and len(await engine.history("s")) == 2
    assert "plugin 'broken' failed in record_turn" in caplog.text


async def test_a_hook_returning_the_wrong_thing_is_named(toy_host):
    class Wrong:
        @hookimpl
        def prepare_turn(self, text):
            return text.upper()

    toy_host.register(Wrong(), "wrong")
    async with Engine(config(), plugins=toy_host) as engine:
        with pytest.raises(PluginError, match=r"plugin 'wrong' failed: prepare_turn must "
                                              r"return None or \(text, \[Attachment"):
            await engine.reply("s", "hello")
