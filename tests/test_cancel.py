"""Cancellation and deadlines stop the work: a cancelled turn ends within a decode step
and is saved as cancelled, and the session's next turn goes on at once."""

import asyncio

import pytest

from mmchat import Engine, ReplyTimeout


@pytest.fixture
async def engine(tiny_config, toy_host):
    async with Engine(tiny_config, plugins=toy_host) as e:
        yield e


async def _holding(engine: Engine):
    """The one stream running, once its turn holds the session."""
    while not engine._streams or not next(iter(engine._streams))._holds_session:
        await asyncio.sleep(0.01)
    return next(iter(engine._streams))


async def _saved_as_cancelled(engine: Engine, session_id: str) -> dict:
    again = await engine.reply(session_id, "still there?")  # waits for the turn's save
    assert again.completion_tokens > 0
    turns = await engine.history(session_id)
    assert [t["role"] for t in turns] == ["user", "assistant"] * 2
    assert turns[1]["finish_reason"] == "cancelled"
    return turns[1]


async def test_cancelling_the_task_awaiting_reply_cancels_the_turn(engine):
    task = asyncio.create_task(engine.reply("s", "hello", max_new_tokens=4096))
    stream = await _holding(engine)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.cancelled
    await _saved_as_cancelled(engine, "s")


async def test_cancelling_the_task_iterating_a_stream_cancels_the_turn(engine):
    stream = await engine.stream("s", "hello", max_new_tokens=4096)
    first = asyncio.Event()

    async def read() -> None:
        async for _ in stream:
            first.set()

    task = asyncio.create_task(read())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait({stream._task})
    await _saved_as_cancelled(engine, "s")


async def test_wait_for_a_reply_cancels_its_turn(engine):
    reply = engine.reply("s", "hello", max_new_tokens=4096)
    waiting = asyncio.ensure_future(asyncio.wait_for(reply, timeout=3600))
    stream = await _holding(engine)
    waiting.cancel()  # as wait_for's own deadline would
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert stream.cancelled
    await _saved_as_cancelled(engine, "s")


async def test_a_reply_past_its_timeout_is_cancelled_and_raises(engine):
    with pytest.raises(ReplyTimeout) as caught:
        await engine.reply("s", "hello", max_new_tokens=4096, timeout=0.001)
    assert isinstance(caught.value, TimeoutError) and caught.value.code == "timeout"
    # It raised with what it saved, or (not yet holding the session) at once.
    if caught.value.reply is not None:
        assert caught.value.reply.finish_reason == "cancelled"
        assert caught.value.reply.completion_tokens < 4096
    await _saved_as_cancelled(engine, "s")


async def test_a_stream_past_its_timeout_is_cancelled_and_raises(engine):
    stream = await engine.stream("s", "hello", max_new_tokens=4096, timeout=3600)
    await stream.__anext__()
    stream._deadline.cancel()
    stream._expire()  # the deadline passes while it decodes
    with pytest.raises(ReplyTimeout) as caught:
        async for _ in stream:
            pass
    assert caught.value.reply is stream.reply and stream.reply.finish_reason == "cancelled"
    assert stream.reply.completion_tokens < 4096
    await _saved_as_cancelled(engine, "s")


async def test_a_reply_within_its_timeout_is_untouched(engine):
    reply = await engine.reply("s", "hello", timeout=3600)
    assert reply.finish_reason in ("stop", "length")
    with pytest.raises(Exception, match="timeout must be"):
        await engine.reply("s", "hello", timeout=0)


def test_leaving_stream_sync_early_cancels_the_turn(tiny_config, toy_host):
    engine = Engine(tiny_config, plugins=toy_host)
    try:
        for _ in engine.stream_sync("s", "hello", max_new_tokens=4096):
            break
        deltas = iter(engine.stream_sync("t", "hello", max_new_tokens=4096))
        next(deltas)
        deltas.close()  # closing the generator does the same
        sync = engine.sync()
        for session in ("s", "t"):
            assert sync.reply(session, "still there?").completion_tokens > 0
            turns = sync.history(session)
            assert turns[1]["finish_reason"] == "cancelled" and len(turns) == 4
        with pytest.raises(ReplyTimeout):
            engine.reply_sync("u", "hello", max_new_tokens=4096, timeout=0.001)
        with pytest.raises(ReplyTimeout):
            for _ in engine.stream_sync("v", "hello", max_new_tokens=4096, timeout=0.001):
                pass
    finally:
        engine.close_sync()
