"""Concurrent replies are decoded together, and each comes out as if it ran alone."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from toy_plugin import ToyModality

from mmchat import Attachment, Engine, checkpoint
from mmchat.batching import AHEAD, DecodeScheduler
from mmchat.fastpath import FastDecoder
from mmchat.generate import GenerationParams
from mmchat.loading import load_model
from mmchat.model import DialogueConfig, DialogueLM
from mmchat.runtime import ReferenceDecoder, TurnRequest, start_turn, start_turns
from mmchat.state import MemoryEntry
from mmchat.tokenizer import Tokenizer

FUSIONS = ["attention", "concat", "weighted"]
RNNS = ["lstm", "gru"]


def toy(n: int) -> Attachment:
    """A toy attachment of n feature frames (n memory vectors)."""
    return Attachment(bytes((7 * n + i) % 256 for i in range(4 * n)), "application/x-toy")


#: (session, text, attachments): memories of different sizes in one batch.
SESSIONS = [("a", "hello", [toy(4)]), ("b", "what colour is it", []),
            ("c", "hi", [toy(2), toy(9)]), ("d", "where is the circle", [toy(16)]),
            ("e", "and then", [toy(1)]), ("f", "ok", [])]


def engine_config(tiny_config, tmp_path, toy_host, fast=True, rnn="lstm", fusion="attention",
                  max_new_tokens=24):
    """An engine config serving a checkpoint whose weights are scaled up, so that its
    untrained replies vary instead of repeating one token."""
    config = tiny_config.replace(model={"rnn": rnn, "n_layer": 2, "fast_decode": fast},
                                 fusion={"method": fusion},
                                 generation={"max_new_tokens": max_new_tokens})
    model, tok, _ = load_model(config, toy_host.modalities)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    path = checkpoint.save(tmp_path / f"{rnn}-{fusion}", model, tok, toy_host.modalities)
    return config.replace(model={"checkpoint": str(path)})


def record_batch_sizes(engine) -> list[int]:
    """Wrap the engine's decoder so every step's batch size is recorded (a lone greedy
    reply's ``greedy`` call as the batch-1 steps it ran: one per token it chose)."""
    sizes: list[int] = []
    decoder = engine._scheduler.decoder
    step, greedy = decoder.step, getattr(decoder, "greedy", None)

    def counting_step(tokens, state, mem):
        sizes.append(tokens.shape[0])
        return step(tokens, state, mem)

    def counting_greedy(*args):
        run = greedy(*args)
        sizes.extend([1] * len(run.tokens))
        return run

    decoder.step = counting_step
    if greedy is not None:
        decoder.greedy = counting_greedy
    return sizes


def hold_a_lone_reply_for_company(engine, sizes: list[int]) -> None:
    """Until two replies have shared a step, a lone reply's step waits for another turn's
    work to reach the model thread (a job to run, a reply joining), so a loaded machine
    cannot let the first reply end before the second joins it."""
    scheduler = engine._scheduler
    decoder = scheduler.decoder

    def held(fn):
        def wait_then(*args):
            if 2 not in sizes:
                with scheduler._cond:
                    scheduler._cond.wait_for(lambda: scheduler._jobs or scheduler._joining,
                                             timeout=60)
            return fn(*args)
        return wait_then

    decoder.step = held(decoder.step)
    if getattr(decoder, "greedy", None) is not None:
        decoder.greedy = held(decoder.greedy)


def summary(reply):
    return reply.text, reply.finish_reason, reply.completion_tokens


async def solo_replies(config, toy_host, turns, **generation):
    """Every session's replies, one turn at a time, on a fresh engine."""
    out = {}
    async with Engine(config, plugins=toy_host) as engine:
        for session, text, atts in turns:
            out.setdefault(session, []).append(
                await engine.reply(session, text, atts, **generation.get(session, {})))
    return out


def tiny_model(rnn="lstm", fusion="attention"):
    tok = Tokenizer.train(["the circle is red", "what colour is it"] * 20, vocab_size=40)
    torch.manual_seed(0)
    cfg = DialogueConfig(vocab_size=tok.vocab_size, rnn=rnn, n_layer=2, n_embd=16, n_hidden=24,
                         d_model=16, dropout=0.0, fusion=fusion, modalities=["toy"])
    return DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)}).eval(), tok


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("fast", [True, False])
def test_stacked_step_rows_equal_single_steps(fast, rnn, fusion):
    model, tok = tiny_model(rnn, fusion)
    decoder = FastDecoder(model) if fast else ReferenceDecoder(model)
    runs = []
    for n_entries in (0, 1, 3):
        memory = [MemoryEntry("toy", torch.randn(2 + 3 * i, 16)) for i in range(n_entries)]
        runs.append(start_turn(model, tok, None, memory, "hello", GenerationParams(),
                               decoder=decoder))
    tokens = torch.tensor([5, 6, 7])
    with torch.inference_mode():
        state = torch.cat([r.prompt_state for r in runs], dim=2)
        logits, weights, state = decoder.step(tokens, state,
                                              decoder.stack([r.step_memory for r in runs]))
        for b, run in enumerate(runs):
            one = decoder.step(tokens[b:b + 1], run.prompt_state, run.step_memory)
            n = run.memory_size
            torch.testing.assert_close(logits[b], one[0][0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(weights[b, :n], one[1][0], atol=1e-6, rtol=1e-6)
            assert not weights[b, n:].any()  # padding gets no attention
            torch.testing.assert_close(state[:, :, b], one[2][:, :, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rnn, fusion, fast", [
    ("lstm", "attention", True), ("gru", "concat", True), ("lstm", "weighted", True),
    ("gru", "attention", False), ("lstm", "concat", False),
])
async def test_concurrent_greedy_replies_equal_solo_replies(tiny_config, toy_host, tmp_path,
                                                            rnn, fusion, fast):
    config = engine_config(tiny_config, tmp_path, toy_host, fast, rnn, fusion)
    second = [(s, "and what else?", []) for s, _, _ in SESSIONS]
    solo = await solo_replies(config, toy_host, SESSIONS + second)
    async with Engine(config, plugins=toy_host) as engine:
        sizes = record_batch_sizes(engine)
        for turns in (SESSIONS, second):
            streams = [await engine.stream(s, text, atts) for s, text, atts in turns]
            replies = await asyncio.gather(*(st.wait() for st in streams))
            for (session, _, _), reply in zip(turns, replies):
                want = solo[session][0 if turns is SESSIONS else 1]
                assert summary(reply) == summary(want), session
                assert reply.attention == pytest.approx(want.attention, abs=1e-3)
    assert max(sizes) > 1  # they really were decoded together


async def test_each_reply_keeps_its_own_strategy_and_random_stream(tiny_config, toy_host,
                                                                    tmp_path):
    config = engine_config(tiny_config, tmp_path, toy_host, max_new_tokens=20)
    modes = {"a": {"strategy": "sample", "seed": 4, "temperature": 0.9},
             "b": {"strategy": "sample", "seed": 9, "top_k": 5},
             "c": {"strategy": "beam", "beam_width": 3},
             "d": {"strategy": "greedy", "no_repeat_ngram": 2},
             "e": {"strategy": "sample", "seed": 4, "top_p": 0.8},
             "f": {"strategy": "greedy", "stop": ["e"]}}
    solo = await solo_replies(config, toy_host, SESSIONS, **modes)
    async with Engine(config, plugins=toy_host) as engine:
        streams = [await engine.stream(s, text, atts, **modes[s]) for s, text, atts in SESSIONS]
        replies = await asyncio.gather(*(st.wait() for st in streams))
    for (session, _, _), reply in zip(SESSIONS, replies):
        assert summary(reply) == summary(solo[session][0]), session


async def test_cancelling_one_reply_leaves_the_others_untouched(tiny_config, toy_host, tmp_path):
    config = engine_config(tiny_config, tmp_path, toy_host, rnn="gru", fusion="concat",
                           max_new_tokens=200)
    solo = await solo_replies(config, toy_host, SESSIONS[:3])
    async with Engine(config, plugins=toy_host) as engine:
        streams = [await engine.stream(s, text, atts) for s, text, atts in SESSIONS[:3]]
        await streams[0].__anext__()
        streams[0].cancel()
        replies = await asyncio.gather(*(st.wait() for st in streams))
        assert replies[0].finish_reason == "cancelled"
        assert 1 <= replies[0].completion_tokens < 200
        for i in (1, 2):
            assert summary(replies[i]) == summary(solo[SESSIONS[i][0]][0])
        again = await engine.reply("a", "still there?")
        assert again.completion_tokens > 0 and len(await engine.history("a")) == 4


async def test_a_new_turn_joins_while_another_reply_is_decoding(tiny_config, toy_host):
    # The plain untrained model repeats itself, so its replies run to the length limit.
    config = tiny_config.replace(generation={"max_new_tokens": 1000})
    async with Engine(config, plugins=toy_host) as engine:
        sizes = record_batch_sizes(engine)
        hold_a_lone_reply_for_company(engine, sizes)
        long = await engine.stream("long", "tell me everything", [toy(3)])
        await long.__anext__()
        short = await engine.reply("short", "hi", [toy(2)], max_new_tokens=5)
        assert short.completion_tokens == 5 and long.reply is None  # prefilled, decoded, done
        reply = await long.wait()
    assert reply.finish_reason == "length" and reply.completion_tokens == 1000
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1  # joined and left between steps


async def test_the_first_token_comes_with_the_prefill_not_a_decode_step(tiny_config,
                                                                        toy_host):
    async with Engine(tiny_config, plugins=toy_host) as engine:
        sizes = record_batch_sizes(engine)
        one = await engine.reply("a", "hello", max_new_tokens=1)
        assert (one.completion_tokens, one.finish_reason, sizes) == (1, "length", [])
        three = await engine.reply("b", "hello", max_new_tokens=3)
        assert three.completion_tokens == 3 and len(sizes) == 2  # tokens 2 and 3
        beam = await engine.reply("c", "hello", max_new_tokens=3, strategy="beam")
        assert beam.completion_tokens >= 1  # beams still choose their own first token


async def test_a_consumer_that_stops_reading_does_not_stall_the_others(tiny_config, toy_host):
    config = tiny_config.replace(generation={"max_new_tokens": 300})
    async with Engine(config, plugins=toy_host) as engine:
        idle = await engine.stream("idle", "hello")  # nobody reads this one yet
        busy = await engine.reply("busy", "hello", max_new_tokens=100)
        assert busy.completion_tokens == 100
        assert (await idle.wait()).completion_tokens == 300


async def test_a_failing_reply_or_job_ends_alone():
    model, tok = tiny_model(fusion="weighted")
    decoder = FastDecoder(model)
    params = GenerationParams(max_new_tokens=30)
    solo = start_turn(model, tok, None, [], "hello", params, decoder=decoder)
    expected = [t.id for t in iter(solo.next_token, None)]
    good, bad = (start_turn(model, tok, None, [], "hello", params, decoder=decoder)
                 for _ in range(2))
    choose = bad.generation.sampler.choose

    def failing_choose(token=None, prob=None):
        if len(bad.tokens) == 3:
            raise RuntimeError("sampler broke")
        return choose(token, prob)

    bad.generation.sampler.choose = failing_choose
    with ThreadPoolExecutor(1) as pool:
        scheduler = DecodeScheduler(decoder, pool)
        with pytest.raises(ZeroDivisionError):
            await scheduler.call(lambda: 1 / 0)

        async def collect(run):
            async with scheduler.decode(run) as tokens:
                return [t.id async for t in tokens]

        got, failed = await asyncio.gather(collect(good), collect(bad), return_exceptions=True)
    assert got == expected and len(expected) > 3
    assert isinstance(failed, RuntimeError) and len(bad.tokens) == 3


async def test_sinks_get_each_step_s_tokens_on_the_loop_and_a_failing_sink_stays_alone():
    model, tok = tiny_model()
    decoder = FastDecoder(model)
    params = GenerationParams(max_new_tokens=20)
    solo = start_turn(model, tok, None, [], "hello", params, decoder=decoder)
    expected = [t.id for t in iter(solo.next_token, None)]
    runs = [start_turn(model, tok, None, [], "hello", params, decoder=decoder)
            for _ in range(4)]
    loop = asyncio.get_running_loop()
    got: list[list] = [[] for _ in runs]
    ended = [loop.create_future() for _ in runs]
    threads = set()
    stops = []

    def sink(i):
        def take(item):
            threads.add(threading.get_ident())
            got[i].append(item)
            if item is None:
                ended[i].set_result(None)
            elif i == 1 and len(got[1]) == 3:
                raise RuntimeError("a consumer's bug")
            elif i == 3:
                stops[3]()  # stop after the first token
        return take

    with ThreadPoolExecutor(1) as pool:
        scheduler = DecodeScheduler(decoder, pool)
        stops += [scheduler.feed(run, sink(i)) for i, run in enumerate(runs)]
        await asyncio.wait_for(asyncio.gather(*ended), 30)
    assert threads == {threading.get_ident()}  # always on the event loop's thread
    assert len(expected) > 3
    for i in range(3):
        assert [t.id for t in got[i][:-1]] == expected and got[i][-1] is None
    assert len(got[3]) - 1 <= AHEAD + 1 < len(expected) and got[3][-1] is None


@pytest.mark.parametrize("rnn, fast", [("lstm", True), ("gru", False)])
def test_batched_prefill_rows_equal_single_prefills(rnn, fast):
    model, tok = tiny_model(rnn)
    decoder = FastDecoder(model) if fast else ReferenceDecoder(model)
    params = GenerationParams(max_new_tokens=12)
    earlier = start_turn(model, tok, None, [], "what colour is it", params, decoder=decoder)
    list(iter(earlier.next_token, None))
    continued, _ = earlier.finish()
    requests = [TurnRequest(None, [], "hi", params),
                TurnRequest(continued, [MemoryEntry("toy", torch.randn(5, 16))],
                            "and where is the circle now", params),
                TurnRequest(None, [MemoryEntry("toy", torch.randn(2, 16))] * 3, "hello", params)]
    batched = start_turns(model, tok, requests, decoder)
    for request, run in zip(requests, batched):
        one = start_turn(model, tok, request.state, request.memory, request.text, params,
                         decoder=decoder)
        assert run.prompt_tokens == one.prompt_tokens and run.memory_size == one.memory_size
        torch.testing.assert_close(run.prompt_logits, one.prompt_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.prompt_state, one.prompt_state, atol=1e-5, rtol=1e-5)
        assert ([t.id for t in iter(run.next_token, None)]
                == [t.id for t in iter(one.next_token, None)])


async def test_turns_that_arrive_together_are_prefilled_in_one_batch(tiny_config, toy_host,
                                                                       tmp_path, monkeypatch):
    import mmchat.runtime

    config = engine_config(tiny_config, tmp_path, toy_host)
    solo = await solo_replies(config, toy_host, SESSIONS)
    prefills: list[int] = []
    start_turns_ = mmchat.runtime.start_turns

    def counting(model, tok, requests, decoder=None):
        prefills.append(len(requests))
        return start_turns_(model, tok, requests, decoder)

    monkeypatch.setattr(mmchat.runtime, "start_turns", counting)
    async with Engine(config, plugins=toy_host) as engine:
        scheduler = engine._scheduler
        gate, holding = threading.Event(), threading.Event()

        def hold() -> None:
            holding.set()
            gate.wait(30)

        busy = asyncio.ensure_future(scheduler.call(hold))  # holds the model thread
        while not holding.is_set():  # before the first turn queues its prefill
            await asyncio.sleep(0.01)
        streams = [await engine.stream(s, text, atts) for s, text, atts in SESSIONS]
        for _ in range(1000):  # until every turn waits for its prefill
            if len(scheduler._jobs) == len(SESSIONS):
                break
            await asyncio.sleep(0.01)
        gate.set()
        await busy
        replies = await asyncio.gather(*(st.wait() for st in streams))
    assert prefills == [len(SESSIONS)]
    for (session, _, _), reply in zip(SESSIONS, replies):
        assert summary(reply) == summary(solo[session][0]), session


async def test_replies_decode_while_the_encoders_work(tiny_config, toy_host):
    async with Engine(tiny_config, plugins=toy_host) as engine:
        gate = threading.Event()
        busy = asyncio.ensure_future(engine._guard._lanes["toy"].encoders.call(gate.wait, 30))
        waiting = await engine.stream("picture", "what is it", [toy(4)])
        text = await asyncio.wait_for(engine.reply("text", "hello"), 30)
        assert text.completion_tokens > 0 and not waiting._task.done()
        gate.set()
        await busy
        assert (await waiting.wait()).completion_tokens > 0


async def streams_encoded_together(engine, turns):
    """Start ``turns`` while the toy modality's encoder thread is held, so that their
    attachments wait together; then let it go. The turns' streams."""
    encoders = engine._guard._lanes["toy"].encoders
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait(600)

    busy = asyncio.ensure_future(encoders.call(hold))
    # The thread must be inside hold() before the turns queue: were it still to take the
    # hold job, it would take the turns' jobs that arrived meanwhile with it.
    assert await asyncio.to_thread(holding.wait, 600)
    streams = [await engine.stream(s, text, atts) for s, text, atts in turns]
    attachments = sum(len(atts) for _, _, atts in turns)
    # Wait until every attachment is queued behind the held thread. On a loaded machine
    # their decodes can take many seconds: the guard only stops a broken test hanging.
    for _ in range(30_000):
        if len(encoders._jobs) == attachments:
            break
        await asyncio.sleep(0.005)
    queued = len(encoders._jobs)
    gate.set()
    await busy
    assert queued == attachments, "the attachments never queued together"
    return streams


async def test_a_burst_of_attachments_is_encoded_on_two_threads(tiny_config, toy_host,
                                                                  tmp_path):
    """Eight or more attachments waiting together are split in two encoder calls on two
    threads (so a burst of pictures uses two cores), and every reply is as if alone."""
    from mmchat.isolation import ENCODE_SPLIT, ENCODE_THREADS

    config = engine_config(tiny_config, tmp_path, toy_host)
    turns = [(f"s{n}", "what is it", [toy(n)]) for n in range(1, 11)]
    solo = await solo_replies(config, toy_host, turns)
    assert len(turns) >= ENCODE_THREADS * ENCODE_SPLIT
    async with Engine(config, plugins=toy_host) as engine:
        calls: list[tuple[list[int], str]] = []
        encode = engine.model.encoders["toy"]

        def recording(x, lengths):
            calls.append((lengths.tolist(), threading.current_thread().name))
            return encode(x, lengths)

        engine._guard._encoders["toy"] = recording
        streams = await streams_encoded_together(engine, turns)
        replies = await asyncio.gather(*(st.wait() for st in streams))
    assert sorted(len(lengths) for lengths, _ in calls) == [5, 5]
    assert sorted(n for lengths, _ in calls for n in lengths) == list(range(1, 11))
    assert len({thread for _, thread in calls}) == 2
    for (session, _, _), reply in zip(turns, replies):
        assert summary(reply) == summary(solo[session][0]), session


async def test_attachments_that_arrive_together_are_encoded_in_one_call(tiny_config, toy_host,
                                                                        tmp_path):
    """One encoder call per modality for the attachments waiting together on its
    encoder thread; when that call fails, each attachment is encoded alone, so only the
    bad one's turn fails."""
    from mmchat.errors import PluginError

    config = engine_config(tiny_config, tmp_path, toy_host)
    solo = await solo_replies(config, toy_host, SESSIONS)
    async with Engine(config, plugins=toy_host) as engine:
        calls: list[list[int]] = []
        encode = engine.model.encoders["toy"]

        def flaky(x, lengths):
            calls.append(lengths.tolist())
            if 16 in lengths.tolist():  # session d's attachment breaks the encoder
                raise RuntimeError("encoder blew up")
            return encode(x, lengths)

        engine._guard._encoders["toy"] = flaky
        streams = await streams_encoded_together(engine, SESSIONS)
        results = await asyncio.gather(*(st.wait() for st in streams), return_exceptions=True)
    assert sorted(calls[0]) == [1, 2, 4, 9, 16]  # every toy attachment in one call (in
    # the order their media finished decoding)
    assert sorted(map(tuple, calls[1:])) == [(1,), (2,), (4,), (9,), (16,)]
    for (session, _, _), result in zip(SESSIONS, results):
        if session == "d":
            assert isinstance(result, PluginError) and "encoder blew up" in str(result)
        else:
            assert summary(result) == summary(solo[session][0]), session


async def test_a_lone_greedy_reply_takes_several_tokens_per_decoder_call(tiny_config,
                                                                         toy_host):
    # The plain untrained model repeats itself: with the loop guard off its replies run
    # to the length limit.
    config = tiny_config.replace(generation={"max_new_tokens": 40, "loop_ngram": 0})
    replies, calls = [], {"step": 0, "greedy": 0}
    for fast in (True, False):
        async with Engine(config.replace(model={"fast_decode": fast}),
                          plugins=toy_host) as engine:
            decoder = engine._scheduler.decoder
            for name in ("step", "greedy") if fast else ():
                def counted(*args, _fn=getattr(decoder, name), _name=name):
                    calls[_name] += 1
                    return _fn(*args)
                setattr(decoder, name, counted)
            first = await engine.reply("a", "hello", [toy(4)])
            second = await engine.reply("a", "and then?")
            replies.append([(summary(r), r.attention, r.confidence) for r in (first, second)])
    assert replies[0][0][0][2] == replies[0][1][0][2] == 40
    assert [r[0] for r in replies[0]] == [r[0] for r in replies[1]]
    for (_, attention, confidence), (_, ref_attention, ref_confidence) in zip(*replies):
        assert attention == pytest.approx(ref_attention, abs=1e-4)
        assert confidence == pytest.approx(ref_confidence, rel=1e-4)
    assert calls["step"] == 0  # each reply decoded alone: only greedy calls
    assert 2 * (39 // AHEAD) <= calls["greedy"] < 2 * 39  # up to AHEAD tokens a call
