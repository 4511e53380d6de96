import asyncio

import numpy as np
import pytest
import torch

from mmchat import Attachment, Engine, checkpoint, hookimpl
from mmchat.errors import (
    CheckpointError,
    EmptyMessage,
    InputError,
    MessageTooLong,
    StateError,
    UnsupportedMedia,
)
from mmchat.loading import load_model
from mmchat.plugins import PluginHost
from mmchat.state import SessionState, dumps_state, loads_state

TOY = Attachment(bytes(range(16)), "application/x-toy")


@pytest.fixture
async def engine(tiny_config, toy_host):
    async with Engine(tiny_config, plugins=toy_host) as e:
        yield e


async def test_reply_reports_text_usage_attention_and_timings(engine):
    reply = await engine.reply("s1", "hello", [TOY])
    assert reply.completion_tokens > 0 and reply.prompt_tokens >= 3
    assert set(reply.attention) == {"toy"} and 0 < reply.attention["toy"] <= 1
    assert {"decode_media", "prefill", "first_token", "total"} <= set(reply.timings)
    assert reply.finish_reason in ("stop", "length")


async def test_stream_deltas_add_up_to_the_reply(engine):
    stream = await engine.stream("s1", "hello", [TOY])
    deltas = [d async for d in stream]
    assert "".join(d.text for d in deltas) == stream.reply.text
    assert [d.index for d in deltas] == list(range(len(deltas)))


async def test_cancel_stops_generation_and_keeps_the_session(engine, tiny_config):
    stream = await engine.stream("s1", "hello", max_new_tokens=50)
    await stream.__anext__()
    stream.cancel()
    reply = await stream.wait()
    assert reply.finish_reason == "cancelled" and reply.completion_tokens < 50
    again = await engine.reply("s1", "still there?")
    assert again.completion_tokens > 0
    assert len(await engine.history("s1")) == 4


@pytest.mark.parametrize("mode", [
    {"strategy": "greedy"},
    {"strategy": "sample", "seed": 3, "temperature": 0.7},
    {"strategy": "sample", "seed": 3, "top_k": 5},
    {"strategy": "sample", "seed": 3, "top_p": 0.8},
    {"strategy": "beam", "beam_width": 3},
    {"strategy": "greedy", "no_repeat_ngram": 2},
])
async def test_every_generation_mode_runs_through_the_engine(engine, mode):
    reply = await engine.reply("s-" + mode["strategy"], "hello", [TOY], **mode)
    assert reply.finish_reason in ("stop", "length")
    assert reply.completion_tokens <= 6


async def test_seeded_sampling_replies_are_reproducible(engine):
    a = await engine.reply("a", "hello", strategy="sample", seed=11)
    b = await engine.reply("b", "hello", strategy="sample", seed=11)
    assert a.text == b.text


async def test_state_round_trip_continues_with_the_same_tokens(engine):
    await engine.reply("orig", "hello", [TOY])
    data = await engine.store.load("orig")
    restored = loads_state(dumps_state(loads_state(data.state)))
    await engine.store.save_turn("copy", state=dumps_state(restored), memory_added=data.memory,
                                 turns=data.history, max_memory=16)
    a = await engine.reply("orig", "and then?")
    b = await engine.reply("copy", "and then?")
    assert a.text == b.text and a.completion_tokens == b.completion_tokens


def test_state_blobs_written_through_safetensors_torch_still_load():
    """Sessions stored before state went through safetensors' numpy functions (the same
    format, written by its torch ones) read back unchanged."""
    from safetensors.torch import save

    from mmchat.state import FORMAT, MEMORY_FORMAT, loads_entry

    rnn, vectors = torch.randn(2, 1, 1, 8), torch.randn(5, 4)
    state = loads_state(save({"rnn": rnn, "pending": torch.tensor([3, 2])},
                             metadata={"format": FORMAT, "version": "1", "turns": "4"}))
    assert torch.equal(state.rnn, rnn) and (state.pending, state.turns) == ([3, 2], 4)
    entry = loads_entry(save({"vectors": vectors},
                             metadata={"format": MEMORY_FORMAT, "version": "1",
                                       "modality": "toy", "attachment_id": "a1"}))
    assert torch.equal(entry.vectors, vectors)
    assert (entry.modality, entry.attachment_id) == ("toy", "a1")


def test_a_state_keeps_the_turn_query_and_a_version_1_state_loads_without_one():
    query = torch.randn(1, 8)
    state = loads_state(dumps_state(SessionState(torch.randn(2, 1, 1, 8), [3], 2, query)))
    assert torch.equal(state.query, query) and state.turns == 2
    assert loads_state(dumps_state(SessionState(torch.randn(2, 1, 1, 8), [3]))).query is None
    from safetensors.numpy import save

    with pytest.raises(StateError, match="version '9' is not supported"):
        loads_state(save({"rnn": np.zeros((2, 1, 1, 8), np.float32),
                          "pending": np.zeros(1, np.int64)},
                         metadata={"format": "mmchat-state", "version": "9"}))


async def test_memory_bank_carries_an_attachment_into_later_turns(engine):
    await engine.reply("m", "look", [TOY])
    later = await engine.reply("m", "what was it?")
    assert later.attention.get("toy", 0) > 0


@pytest.mark.parametrize("text, attachments, error, words", [
    ("", [], EmptyMessage, "empty"),
    ("   ", [], EmptyMessage, "empty"),
    ("x" * 1_000_000, [], MessageTooLong, "limit is"),
    ("hi", [Attachment(b"\x89PNG....", "image/x-unknown")], UnsupportedMedia, "image/x-unknown"),
    ("hi", [Attachment(b"abcd", "application/x-toy", modality="smell")], UnsupportedMedia,
     "smell"),
    ("hi", [Attachment(b"x" * 100, "application/x-toy")], InputError, "limit is 64"),
])
async def test_bad_input_is_rejected_by_name_and_the_session_carries_on(
        engine, text, attachments, error, words):
    await engine.reply("s", "first", [TOY])
    with pytest.raises(error, match=words):
        await engine.reply("s", text, attachments)
    assert len(await engine.history("s")) == 2
    assert (await engine.reply("s", "second")).completion_tokens > 0


async def test_corrupt_media_fails_the_turn_not_the_engine(engine):
    stream = await engine.stream("s", "hi", [Attachment(b"abc", "application/x-toy")])
    with pytest.raises(InputError, match="multiple of 4"):
        await stream.wait()
    assert await engine.history("s") == []
    assert (await engine.reply("s", "hi")).completion_tokens > 0


async def test_bad_session_ids_and_generation_settings_are_rejected(engine):
    with pytest.raises(InputError, match="bad session id"):
        await engine.reply("../etc/passwd", "hi")
    with pytest.raises(InputError, match="bad session id"):
        await engine.reply("ok\n", "hi")
    with pytest.raises(InputError, match="temperature"):
        await engine.reply("s", "hi", strategy="sample", temperature=-1)


async def test_sessions_are_independent_under_concurrency(engine):
    replies = await asyncio.gather(*(engine.reply(f"c{i}", "hello", [TOY]) for i in range(6)))
    assert len({r.session_id for r in replies}) == 6
    for i in range(6):
        assert len(await engine.history(f"c{i}")) == 2


async def test_corrupt_stored_state_is_a_clear_error(engine):
    await engine.store.save_turn("bad", state=b"not safetensors", memory_added=[], turns=[],
                                 max_memory=4)
    with pytest.raises(StateError, match="not readable"):
        await engine.reply("bad", "hi")


async def test_a_corrupt_state_fails_only_its_own_turn_in_a_batched_prefill(engine):
    await engine.store.save_turn("bad-2", state=b"not safetensors", memory_added=[],
                                 turns=[], max_memory=4)
    outcomes = await asyncio.gather(engine.reply("bad-2", "hi"),
                                    *(engine.reply(f"good-{i}", "hi") for i in range(3)),
                                    return_exceptions=True)
    assert isinstance(outcomes[0], StateError)
    assert all(r.finish_reason in ("stop", "length") for r in outcomes[1:])


def test_sync_wrappers(tiny_config, toy_host):
    engine = Engine(tiny_config, plugins=toy_host)
    try:
        reply = engine.reply_sync("s", "hello", [TOY])
        streamed = "".join(d.text for d in engine.stream_sync("s2", "hello", [TOY]))
        assert reply.text == streamed
    finally:
        engine.close_sync()


def test_checkpoint_round_trip_and_missing_plugin(tmp_path, tiny_config, toy_host):
    model, tok, _ = load_model(tiny_config, toy_host.modalities)
    path = checkpoint.save(tmp_path / "ckpt", model, tok, toy_host.modalities,
                           extra={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model"]
    loaded, tok2, meta = checkpoint.load(path, toy_host.modalities)
    assert meta["plugins"] == {"toy": {"plugin": "toy", "version": "1", "plugin_version": "9.9",
                                       "settings": {}}}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert tok2.proto == tok.proto
    with pytest.raises(CheckpointError, match="needs modality 'toy' \\(plugin 'toy'"):
        checkpoint.load(path, {})
    (path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path, toy_host.modalities)


def test_checkpoint_save_is_atomic(tmp_path, tiny_config, toy_host, monkeypatch):
    model, tok, _ = load_model(tiny_config, toy_host.modalities)
    path = checkpoint.save(tmp_path / "ckpt", model, tok, toy_host.modalities)
    before = (path / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.Tokenizer, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, model, tok, toy_host.modalities)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


async def test_engine_serves_a_saved_checkpoint(tmp_path, tiny_config, toy_host):
    model, tok, _ = load_model(tiny_config, toy_host.modalities)
    path = checkpoint.save(tmp_path / "ckpt", model, tok, toy_host.modalities)
    config = tiny_config.replace(model={"checkpoint": str(path)})
    async with Engine(config, plugins=toy_host) as e:
        assert "ckpt" in e.model_description
        assert (await e.reply("s", "hello", [TOY])).completion_tokens > 0
    missing = tiny_config.replace(model={"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(CheckpointError, match="does not exist"):
        await Engine(missing, plugins=toy_host).start()


@pytest.mark.parametrize("fusion", ["attention", "concat", "weighted"])
async def test_dynamic_int8_models_serve_every_fusion(tiny_config, toy_host, fusion):
    config = tiny_config.replace(model={"quantize": "dynamic-int8"}, fusion={"method": fusion})
    async with Engine(config, plugins=toy_host) as engine:
        first = await engine.reply("q", "hello", [TOY])
        second = await engine.reply("q", "and now?")
    assert first.completion_tokens > 0 and second.completion_tokens > 0
    assert first.attention["toy"] > 0


async def test_close_cancels_replies_still_decoding(tiny_config, toy_host):
    """Closing ends a reply by how far it got, never by timing: one that reached the
    model (it is decoding) ends ``cancelled`` and is saved; one that had not (here: not
    yet scheduled when close began) raises Cancelled and stores nothing, so the turn is
    whole or gone. The test used to leave the third reply's progress to chance."""
    engine = Engine(tiny_config, plugins=toy_host)
    await engine.start()
    streams = [await engine.stream(f"s{i}", "hello", max_new_tokens=4096) for i in range(3)]
    for stream in streams:
        await stream.__anext__()  # decoding; nobody reads on, so it waits for its consumer
    while streams[2]._queue.empty():  # decoding too (a turn not at the model yet is dropped)
        await asyncio.sleep(0.01)
    unscheduled = await engine.stream("late", "hello", max_new_tokens=4096)
    await asyncio.wait_for(engine.close(), timeout=60)  # used to deadlock
    for stream in streams:
        reply = await asyncio.wait_for(stream.wait(), timeout=10)
        assert reply.finish_reason == "cancelled" and reply.completion_tokens < 4096
    late = await asyncio.wait_for(unscheduled.wait(), timeout=10)
    assert late.finish_reason == "cancelled" and late.completion_tokens == 0
    assert engine._threads.model._shutdown
    for i in range(3):  # saved, though the model thread had stopped taking work
        turns = (await engine.store.load(f"s{i}")).history
        assert [t["role"] for t in turns] == ["user", "assistant"]
        assert turns[1]["finish_reason"] == "cancelled"
    assert await engine.store.load("late") is None


async def test_one_turns_attachments_hold_one_media_thread(tiny_config):
    """A turn with four slow attachments (decodes that block until released) leaves
    the media pool's other thread to another turn's attachment, which is answered while
    the slow ones still wait. It waited behind them when a turn decoded all at once."""
    import threading

    import toy_plugin

    gate, entered = threading.Event(), threading.Semaphore(0)
    decoding = [0]

    class Gated(toy_plugin.ToyModality):
        name = "gated"
        mime_types = ("application/x-gated",)

        def example(self):  # no warm-up: every decode here is a turn's
            return None

        def decode(self, data, mime_type):
            decoding[0] += 1
            entered.release()
            gate.wait(60)
            return super().decode(data, mime_type)

    class GatedPlugin:
        @hookimpl
        def register_modalities(self, register):
            register(Gated())

    host = PluginHost(entry_points=False)
    host.register(toy_plugin, "toy", version=toy_plugin.__version__)
    host.register(GatedPlugin(), "gated", version="1")
    engine = Engine(tiny_config, plugins=host)
    await engine.start()
    try:
        slow = await engine.stream("a", "look", [
            Attachment(bytes([i] * 4), "application/x-gated") for i in range(4)])
        assert await asyncio.to_thread(entered.acquire, True, 30)
        quick = await asyncio.wait_for(engine.reply("b", "look", [
            Attachment(b"abcd", "application/x-toy")]), 60)
        assert quick.finish_reason in ("stop", "length")
        assert decoding[0] == 1  # the slow turn holds one media thread, not both
    finally:
        gate.set()
    reply = await asyncio.wait_for(slow.wait(), 60)
    assert reply.finish_reason in ("stop", "length") and decoding[0] == 4
    await engine.close()


FALLBACK_MODES = [{"strategy": "greedy"}, {"strategy": "sample", "seed": 2, "top_k": 1},
                  {"strategy": "beam", "beam_width": 3}]


@pytest.mark.parametrize("mode", FALLBACK_MODES, ids=lambda m: m["strategy"])
async def test_a_looping_reply_ends_early_and_sends_the_fallback(tiny_config, toy_host, mode):
    """The untrained model says "circle circle ...": unguarded it runs to the token limit;
    the loop guard (on by default) stops it and the engine sends the fallback text."""
    config = tiny_config.replace(generation={"max_new_tokens": 30, "loop_ngram": 0})
    async with Engine(config, plugins=toy_host) as engine:
        unguarded = await engine.reply("u", "hello", [TOY], **mode)
    assert unguarded.finish_reason == "length" and unguarded.completion_tokens == 30
    assert not unguarded.fallback
    config = tiny_config.replace(generation={"max_new_tokens": 30, "loop_ngram": 4})
    async with Engine(config, plugins=toy_host) as engine:
        stream = await engine.stream("g", "hello", [TOY], **mode)
        streamed = "".join([d.text async for d in stream])
        reply = stream.reply
        history = await engine.history("g")
    assert reply.finish_reason == "loop" and reply.completion_tokens < 30
    assert reply.fallback and reply.text == config.generation.fallback_text
    assert streamed and streamed != reply.text  # the deltas were the model's own
    expected = {"role": "assistant", "text": reply.text, "finish_reason": "loop", "fallback": True}
    assert {k: history[-1].get(k) for k in expected} == expected
    assert reply.to_dict()["fallback"] is True


@pytest.mark.parametrize("mode", FALLBACK_MODES, ids=lambda m: m["strategy"])
async def test_a_reply_below_the_confidence_threshold_sends_the_fallback(tiny_config, toy_host,
                                                                      mode):
    async with Engine(tiny_config, plugins=toy_host) as engine:  # untrained: threshold 0
        sure = await engine.reply("a", "hello", [TOY], **mode)
    assert engine.fallback_threshold == 0.0
    assert not sure.fallback and sure.text != tiny_config.generation.fallback_text
    assert 0.0 < sure.confidence < 1.0
    config = tiny_config.replace(generation={"fallback_threshold": sure.confidence + 1e-3,
                                             "fallback_text": "i can only talk about pictures"})
    async with Engine(config, plugins=toy_host) as engine:
        unsure = await engine.reply("a", "hello", [TOY], **mode)
    assert unsure.finish_reason == sure.finish_reason and unsure.confidence == sure.confidence
    assert unsure.fallback and unsure.text == "i can only talk about pictures"
    config = tiny_config.replace(generation={"fallback_threshold": sure.confidence - 1e-3})
    async with Engine(config, plugins=toy_host) as engine:
        again = await engine.reply("a", "hello", [TOY], **mode)
    assert not again.fallback and again.text == sure.text



async def test_a_threshold_set_on_a_running_engine_takes_effect(tiny_config, toy_host):
    async with Engine(tiny_config, plugins=toy_host) as engine:
        sure = await engine.reply("a", "hello", [TOY])
        engine.fallback_threshold = sure.confidence + 1e-3
        unsure = await engine.reply("b", "hello", [TOY])
    assert not sure.fallback and unsure.fallback
    assert unsure.text == tiny_config.generation.fallback_text

def test_the_default_threshold_is_the_one_the_checkpoint_was_trained_with(tiny_config):
    from mmchat.loading import fallback_threshold

    trained = {"train": {"config": {"fallback_threshold": 0.42}}}
    assert tiny_config.generation.fallback_threshold == -1.0
    assert fallback_threshold(tiny_config, trained) == 0.42
    assert fallback_threshold(tiny_config, {"path": "untrained"}) == 0.0
    chosen = tiny_config.replace(generation={"fallback_threshold": 0.1})
    assert fallback_threshold(chosen, trained) == 0.1
