"""DeltaCoalescer: fewer frames per reply, nothing lost or reordered."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmchat.coalesce import DeltaCoalescer
from mmchat.protocol import Delta, Done, Error, Started, Usage, parse_server_event, serialize


def reply(rid: str, seq: int, words: list[str]) -> list:
    events = [Started("m-" + rid, rid, seq)]
    events += [Delta(rid, seq + 1 + i, w) for i, w in enumerate(words)]
    events.append(Done(rid, seq + 1 + len(words), "".join(words), "stop",
                       Usage(1, len(words))))
    return events


def run(coalescer: DeltaCoalescer, events: list) -> list:
    out = []
    for event in events:
        out += coalescer.feed(event)
    return out + coalescer.flush()


def test_one_token_per_delta_passes_everything_as_it_is():
    events = reply("r", 1, ["a", "b", "c"])
    assert run(DeltaCoalescer(1), events) == events


def test_a_short_reply_is_four_frames_and_the_first_delta_goes_at_once():
    coalescer = DeltaCoalescer(8)
    started, first, *rest, done = reply("r", 1, [" A", " cat", " on", " a", " mat"])
    assert coalescer.feed(started) == [started]
    assert coalescer.feed(first) == [first]  # no wait for the first token
    assert [coalescer.feed(d) for d in rest] == [[], [], [], []]
    merged = Delta("r", 6, " cat on a mat", 3)
    assert coalescer.feed(done) == [merged, done]
    assert coalescer.flush() == []


def test_a_full_batch_goes_out_without_waiting_for_the_end():
    words = [str(i) for i in range(10)]
    out = run(DeltaCoalescer(4), reply("r", 1, words))
    deltas = [e for e in out if isinstance(e, Delta)]
    assert [(d.first_seq, d.seq, d.text) for d in deltas] == [
        (None, 2, "0"), (3, 6, "1234"), (7, 10, "5678"), (None, 11, "9")]


def test_held_text_goes_before_any_other_event():
    coalescer = DeltaCoalescer(8)
    events = reply("r", 1, ["a", "b", "c"])
    out = []
    for event in events[:4]:
        out += coalescer.feed(event)
    error = Error("store_unavailable", "gone", "m-r")
    assert coalescer.feed(error) == [Delta("r", 4, "bc", 3), error]


def test_another_replys_delta_flushes_and_streams_at_once():
    coalescer = DeltaCoalescer(8)
    out = run(coalescer, [Delta("r", 2, "a"), Delta("r", 3, "b"), Delta("r", 4, "c"),
                          Delta("q", 9, "x"), Delta("q", 10, "y")])
    assert out == [Delta("r", 2, "a"), Delta("r", 4, "bc", 3), Delta("q", 9, "x"),
                   Delta("q", 10, "y")]


def test_at_least_one_token():
    with pytest.raises(ValueError):
        DeltaCoalescer(0)


@given(st.integers(1, 20), st.lists(st.text(max_size=3), max_size=40))
def test_nothing_is_lost_and_seqs_cover_every_token(tokens, words):
    events = reply("r", 5, words)
    out = run(DeltaCoalescer(tokens), events)
    deltas = [e for e in out if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "".join(words)
    covered = [s for d in deltas for s in range(d.first_seq or d.seq, d.seq + 1)]
    assert covered == list(range(6, 6 + len(words)))
    assert all(d.first_seq is None or d.seq - d.first_seq < tokens for d in deltas)
    assert out[0] == events[0] and out[-1] == events[-1]
    if words:
        assert out[1] == events[1]  # the first token is never held
    for event in out:  # every merged delta is a valid frame
        assert parse_server_event(serialize(event)) == event
