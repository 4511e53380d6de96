"""ReplyStream.take: what a server turn reads of a reply, a group of deltas at a time."""

from __future__ import annotations

import asyncio

import pytest

from mmchat.errors import MMChatError
from mmchat.replies import Delta, Reply, ReplyStream


def _reply(tokens: int) -> Reply:
    return Reply("s", "x" * tokens, "length", {}, 1, tokens, {})


async def test_take_waits_for_as_many_deltas_as_asked_and_wakes_once():
    stream = ReplyStream(asyncio.Queue(), session_id="s")
    taking = asyncio.create_task(stream.take(3))
    await asyncio.sleep(0)
    stream._put(Delta("a", 0, 1))
    stream._put(Delta("b", 1, 2))
    await asyncio.sleep(0)
    assert not taking.done()
    stream._put(Delta("c", 2, 3))
    stream._put(Delta("d", 3, 4))  # put before the taker runs: taken with the rest
    deltas, end = await taking
    assert [d.text for d in deltas] == ["a", "b", "c", "d"] and end is None


async def test_the_end_wakes_a_take_short_of_its_count():
    stream = ReplyStream(asyncio.Queue(), session_id="s")
    taking = asyncio.create_task(stream.take(8))
    await asyncio.sleep(0)
    stream._put(Delta("a", 0, 1))
    stream._put(_reply(1))
    deltas, end = await taking
    assert [d.text for d in deltas] == ["a"] and end == stream.reply == _reply(1)


async def test_a_failure_ends_a_take_and_what_is_waiting_is_taken_at_once():
    stream = ReplyStream(asyncio.Queue(), session_id="s")
    stream._put(Delta("a", 0, 1))
    stream._put(Delta("b", 1, 2))
    assert [d.text for d in (await stream.take(2))[0]] == ["a", "b"]
    stream._put(MMChatError("gone"))
    deltas, end = await stream.take(5)
    assert deltas == [] and isinstance(end, MMChatError)


async def test_giving_up_on_a_take_cancels_the_reply():
    stream = ReplyStream(asyncio.Queue(), session_id="s")
    taking = asyncio.create_task(stream.take(2))
    await asyncio.sleep(0)
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    assert stream.cancelled and stream._taker is None
