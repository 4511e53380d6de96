"""The fused decode step computes the reference step's function, for every model shape."""

import pytest
import torch
from toy_plugin import ToyModality

from mmchat import Attachment, Engine, checkpoint
from mmchat.fastpath import FastDecoder, build_decoder
from mmchat.generate import GenerationParams
from mmchat.loading import load_model, quantize
from mmchat.model import DialogueConfig, DialogueLM
from mmchat.runtime import ReferenceDecoder, start_turn
from mmchat.state import MemoryEntry, SessionState
from mmchat.tokenizer import Tokenizer

FUSIONS = ["attention", "concat", "weighted"]
RNNS = ["lstm", "gru"]
TIGHT = {"atol": 1e-4, "rtol": 1e-4}
TOY = Attachment(bytes(range(16)), "application/x-toy")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the circle is red", "what colour is it", "hello there"] * 20,
                           vocab_size=40)


def tiny_model(tok, fusion="attention", rnn="lstm", n_layer=2, seed=0, summaries=True):
    torch.manual_seed(seed)
    cfg = DialogueConfig(vocab_size=tok.vocab_size, rnn=rnn, n_layer=n_layer, n_embd=16,
                         n_hidden=24, d_model=16, dropout=0.0, fusion=fusion,
                         modalities=["toy"], summaries=summaries)
    model = DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)}).eval()
    with torch.no_grad():  # weights big enough that replies are not all one token
        for p in model.parameters():
            p.mul_(8)
    return model


def toy_memory(model, sizes=(5, 3)):
    g = torch.Generator().manual_seed(3)
    entries = []
    for n in sizes:
        feats = torch.rand(1, 4, n, generator=g)
        entries.append(MemoryEntry("toy", model.encode("toy", feats, torch.tensor([n]))[0]))
    return entries


def reply(model, tok, decoder, params, state=None, text="what colour is it"):
    run = start_turn(model, tok, state, toy_memory(model), text, params, decoder=decoder)
    tokens = [t.id for t in iter(run.next_token, None)]
    return run, tokens


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("n_layer", [1, 2])
def test_fast_step_equals_the_reference_step(tok, fusion, rnn, n_layer):
    model = tiny_model(tok, fusion, rnn, n_layer)
    ref, fast = ReferenceDecoder(model), FastDecoder(model)
    params = GenerationParams(max_new_tokens=12)
    run, answer = reply(model, tok, ref, params)
    fast_run = start_turn(model, tok, None, toy_memory(model), "what colour is it", params,
                          decoder=fast)
    state = run.prompt_state
    with torch.inference_mode():
        varied = list(range(4, tok.vocab_size, 3))
        for t in [tok.bos_id] + answer + varied:  # teacher-forced through both decoders
            tokens = torch.tensor([t])
            la, wa, sa = ref.step(tokens, state, run.step_memory)
            lb, wb, sb = fast.step(tokens, state, fast_run.step_memory)
            torch.testing.assert_close(lb, la, **TIGHT)
            torch.testing.assert_close(wb, wa, **TIGHT)
            torch.testing.assert_close(sb, sa, **TIGHT)
            state = sa


@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("n_layer", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fast_prefill_equals_the_reference_prefill(tok, rnn, n_layer, precision):
    model = tiny_model(tok, rnn=rnn, n_layer=n_layer)
    ref, fast = ReferenceDecoder(model), FastDecoder(model, precision)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([7, 1, 4, 7])
    tokens = torch.randint(1, tok.vocab_size, (4, 7), generator=g)
    tokens[torch.arange(7) >= lengths.unsqueeze(1)] = 0  # right padding
    state = torch.randn(*model.initial_state(4).shape, generator=g)
    with torch.inference_mode():
        want = ref.prefill(tokens, lengths, state)
        got = fast.prefill(tokens, lengths, state)
        same = fast.prefill(tokens[:, :4], lengths.clamp(max=4), state)  # no padding at all
        alone = [fast.prefill(tokens[b: b + 1, : lengths[b]], lengths[b: b + 1],
                              state[:, :, b: b + 1]) for b in range(4)]
    torch.testing.assert_close(same[:, :, 1], got[:, :, 1], **TIGHT)  # row 1 ended at 1
    if precision == "fp32":
        torch.testing.assert_close(got, want, **TIGHT)
        torch.testing.assert_close(torch.cat(alone, dim=2), got, **TIGHT)  # padding is inert
    else:  # int8 quantizes each call's activations with one scale, so rows move each other
        assert (got - want).abs().mean() < 0.02


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("summaries", [True, False])
def test_greedy_replies_are_identical_over_two_turns(tok, fusion, rnn, summaries):
    model = tiny_model(tok, fusion, rnn, summaries=summaries)
    params = GenerationParams(max_new_tokens=24)
    replies = []
    for decoder in (ReferenceDecoder(model), FastDecoder(model)):
        run, first = reply(model, tok, decoder, params)
        state, _ = run.finish()
        run2, second = reply(model, tok, decoder, params, state=state, text="hello there")
        replies.append((first, second, run2.attention_by_modality(), run2.finish()[1]))
    assert replies[0][0] and replies[0][1]
    assert replies[1][:2] == replies[0][:2]
    assert replies[1][3] == replies[0][3]
    assert replies[1][2] == pytest.approx(replies[0][2], abs=1e-4)


@pytest.mark.parametrize("mode", [
    {"strategy": "sample", "seed": 5, "temperature": 0.8},
    {"strategy": "beam", "beam_width": 3},
    {"strategy": "greedy", "no_repeat_ngram": 2},
])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_sampling_and_beams_match_the_reference(tok, fusion, mode):
    model = tiny_model(tok, fusion, "gru")
    params = GenerationParams(max_new_tokens=16, **mode)
    _, ref = reply(model, tok, ReferenceDecoder(model), params)
    _, fast = reply(model, tok, FastDecoder(model), params)
    assert fast == ref and ref


@pytest.mark.parametrize("precision, tolerance", [("fp16", 0.01), ("int8", 0.1)])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
def test_reduced_precision_logits_stay_close(tok, fusion, rnn, precision, tolerance):
    model = tiny_model(tok, fusion, rnn)
    fp32, int8 = FastDecoder(model), FastDecoder(model, precision=precision)
    params = GenerationParams(max_new_tokens=12)
    run = start_turn(model, tok, None, toy_memory(model), "hello", params, decoder=fp32)
    mem8 = int8.prepare(run.memory, run.generation.sampler.weights)
    state = run.prompt_state
    with torch.inference_mode():
        for t in [5, 9, 7, 11]:
            la, _, sa = fp32.step(torch.tensor([t]), state, run.step_memory)
            lb, _, sb = int8.step(torch.tensor([t]), state, mem8)
            assert rel_error(lb, la) < tolerance and rel_error(sb, sa) < tolerance
            state = sa


def rel_error(got, want):
    return float((got - want).norm() / (want - want.mean()).norm())


def test_models_the_fast_path_cannot_run_fall_back_to_the_reference(tok):
    model = tiny_model(tok)
    assert build_decoder(model).precision == "fp32"
    assert isinstance(build_decoder(model, fast=False), ReferenceDecoder)
    model.train()
    assert "training" in FastDecoder.unsupported(model)
    assert isinstance(build_decoder(model), ReferenceDecoder)
    with pytest.raises(ValueError, match="training mode"):
        FastDecoder(model)
    model.eval()
    model.reread = torch.nn.Identity()  # a model that reads the memory twice a step
    assert "reread" in FastDecoder.unsupported(model)
    assert isinstance(build_decoder(model), ReferenceDecoder)


@pytest.mark.parametrize("fusion", ["attention", "weighted"])  # concat reads proj.weight
@pytest.mark.parametrize("rnn", RNNS)
def test_a_dynamically_quantized_model_is_served_in_int8(tok, fusion, rnn):
    model = quantize(tiny_model(tok, fusion, rnn))  # what model.quantize = "dynamic-int8" does
    decoder = build_decoder(model)
    assert isinstance(decoder, FastDecoder) and decoder.precision == "int8"
    ref = ReferenceDecoder(model)
    c = model.config
    state = SessionState(rnn=torch.zeros(2 if rnn == "lstm" else 1, c.n_layer, 1, c.n_hidden),
                         pending=[tok.bos_id])
    run = start_turn(model, tok, state, toy_memory(model), "hello", GenerationParams(),
                     decoder=ref)
    mem = decoder.prepare(run.memory, run.generation.sampler.weights)
    rnn_state = run.prompt_state
    with torch.inference_mode():
        for t in [5, 9, 7, 11]:
            la, wa, sa = ref.step(torch.tensor([t]), rnn_state, run.step_memory)
            lb, wb, sb = decoder.step(torch.tensor([t]), rnn_state, mem)
            assert rel_error(lb, la) < 0.1 and rel_error(sb, sa) < 0.1
            rnn_state = sa


def test_state_from_a_fast_turn_continues_on_the_reference_path(tok):
    model = tiny_model(tok)
    params = GenerationParams(max_new_tokens=10)
    run, _ = reply(model, tok, FastDecoder(model), params)
    state, _ = run.finish()
    restored = SessionState(rnn=state.rnn.clone(), pending=list(state.pending), turns=1)
    _, a = reply(model, tok, ReferenceDecoder(model), params, state=state, text="hello")
    _, b = reply(model, tok, FastDecoder(model), params, state=restored, text="hello")
    assert a == b


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
async def test_engine_replies_are_the_same_with_and_without_the_fast_path(
        tiny_config, toy_host, tmp_path, fusion, rnn):
    config = tiny_config.replace(model={"rnn": rnn, "n_layer": 2}, fusion={"method": fusion},
                                 generation={"max_new_tokens": 16})
    model, tokenizer, _ = load_model(config, toy_host.modalities)
    with torch.no_grad():  # scaled up so the untrained replies vary
        for p in model.parameters():
            p.mul_(8)
    path = checkpoint.save(tmp_path / "ckpt", model, tokenizer, toy_host.modalities)
    replies = []
    for fast in (False, True):
        served = config.replace(model={"checkpoint": str(path), "fast_decode": fast})
        async with Engine(served, plugins=toy_host) as engine:
            decoder = engine._scheduler.decoder
            assert isinstance(decoder, FastDecoder if fast else ReferenceDecoder)
            first = await engine.reply("s", "hello", [TOY])
            second = await engine.reply("s", "what was it?")
            replies.append([(r.text, r.finish_reason, r.completion_tokens) for r in
                            (first, second)] + [second.attention])
    assert replies[1][:2] == replies[0][:2]
    assert replies[1][2] == pytest.approx(replies[0][2], abs=1e-3)


class TokenAtATime:
    """The fast decoder without ``greedy``: a reply then takes one step call per token."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __getattr__(self, name):
        if name == "greedy":
            raise AttributeError(name)
        return getattr(self.decoder, name)


def counted(decoder):
    """``decoder`` with its ``step`` and ``greedy`` calls counted in ``decoder.calls``."""
    decoder.calls = {"step": 0, "greedy": 0}
    for name in ("step", "greedy"):
        def call(*args, _fn=getattr(decoder, name), _name=name):
            decoder.calls[_name] += 1
            return _fn(*args)
        setattr(decoder, name, call)
    return decoder


def outcome_of(run, tokens):
    gen = run.generation
    return tokens, gen.probs, gen.outcome.finish_reason, gen.outcome.last_token, \
        gen.outcome.state, run.attention_by_modality()


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 1}, {"max_new_tokens": 8}, {"max_new_tokens": 9},
    {"max_new_tokens": 30, "loop_ngram": 2}, {"max_new_tokens": 30, "stop": ("e",)},
    {"max_new_tokens": 30},
], ids=["1", "8", "9", "loop", "stop", "30"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
def test_greedy_chunks_give_what_a_token_per_call_gives(tok, fusion, rnn, params):
    model = tiny_model(tok, fusion, rnn)
    params = GenerationParams(**params)
    fast = FastDecoder(model)
    chunked, chunked_tokens = reply(model, tok, counted(fast), params)
    single, single_tokens = reply(model, tok, TokenAtATime(FastDecoder(model)), params)
    a, b = outcome_of(chunked, chunked_tokens), outcome_of(single, single_tokens)
    assert a[:4] == b[:4]  # tokens, probabilities, finish reason, last token: exact
    torch.testing.assert_close(a[4], b[4], **TIGHT)  # the state the session goes on from
    assert a[5] == pytest.approx(b[5], abs=1e-6)
    assert fast.calls["step"] == 0  # every token came from a greedy call of up to 8
    assert fast.calls["greedy"] == -(-len(chunked.generation.probs) // 8)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_greedy_reply_left_mid_chunk_goes_on_from_the_last_token_taken(tok, fusion):
    model = tiny_model(tok, fusion)
    fast, params = FastDecoder(model), GenerationParams(max_new_tokens=30, loop_ngram=0)
    states = []
    for decoder in (fast, TokenAtATime(fast)):
        run = start_turn(model, tok, None, toy_memory(model), "what colour is it", params,
                         decoder=decoder)
        taken = [run.next_token() for _ in range(3)]  # mid-way through the first chunk
        assert all(taken)
        state, reason = run.finish(cancelled=True)
        states.append((run.tokens, state.pending, reason, state.rnn))
    assert states[0][:3] == states[1][:3]
    torch.testing.assert_close(states[0][3], states[1][3], **TIGHT)


def test_the_bundled_model_replies_the_same_on_the_fast_path(tok):
    from mmchat.config import from_dict
    from mmchat.plugins import PluginHost

    config = from_dict({}, env={})
    modalities = PluginHost.from_config(config).modalities
    model, tokenizer, _ = load_model(config, modalities)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        size = modalities["image"].size
        picture = model.encode("image", torch.rand(1, 3, size, size, generator=g),
                               torch.tensor([1]))[0]
    memory = [MemoryEntry("image", picture)]
    params = GenerationParams()
    prompts = ["what colour is the circle?", "how many shapes are there?", "hello",
               "where is the square?"]
    replies = []
    for decoder in (ReferenceDecoder(model), FastDecoder(model)):
        got, state = [], None
        for text in prompts:  # one session: each turn goes on from the last one's state
            run = start_turn(model, tokenizer, state, memory, text, params, decoder=decoder)
            tokens = [t.id for t in iter(run.next_token, None)]
            state, reason = run.finish()
            got.append((tokens, reason, run.generation.probs, run.attention_by_modality()))
        replies.append(got)
    for (ref_tokens, ref_reason, ref_probs, ref_attention), (tokens, reason, probs,
                                                              attention) in zip(*replies):
        assert tokens == ref_tokens and ref_tokens and reason == ref_reason
        assert probs == pytest.approx(ref_probs, rel=1e-4)
        assert attention == pytest.approx(ref_attention, abs=1e-4)
