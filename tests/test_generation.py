import pytest
import torch

from mmchat.config import GenerationConfig
from mmchat.generate import (
    GenerationParams,
    block_repeats,
    filter_logits,
    generate,
    token_prob,
    token_probs,
)

EOS = 3
V = 8


def table_step(table):
    """A step whose next-token logits depend only on the token just fed."""

    def step(tokens, state):
        logits = torch.stack([table[int(t)] for t in tokens])
        return logits, torch.ones(len(tokens), 1), state

    return step


def run(params, table, first, stop_check=None):
    state = torch.zeros(1, 1, 1, 2)
    gen = generate(table_step(table), first[None], torch.ones(1, 1), state, params, eos_id=EOS,
                   stop_check=stop_check)
    tokens = [t.id for t in gen]
    return tokens, gen.outcome


def logits_for(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32) + 1e-9)


def chain_table():
    # 4 -> 5 -> 6 -> EOS, with lesser alternatives everywhere
    table = {}
    for t in range(V):
        p = [0.02] * V
        p[{4: 5, 5: 6, 6: EOS}.get(t, 4)] = 0.8
        table[t] = logits_for(p)
    return table


def test_greedy_follows_the_argmax_and_stops_at_eos():
    tokens, outcome = run(GenerationParams(), chain_table(), chain_table()[0])
    assert tokens == [4, 5, 6]
    assert outcome.finish_reason == "stop" and outcome.last_token == EOS


def test_max_new_tokens_ends_with_length():
    table = {t: logits_for([0.9 if i == 4 else 0.01 for i in range(V)]) for t in range(V)}
    tokens, outcome = run(GenerationParams(max_new_tokens=5), table, table[0])
    assert tokens == [4] * 5 and outcome.finish_reason == "length"


def test_no_repeat_ngram_blocks_repeats():
    table = {t: logits_for([0.9 if i == 4 else 0.01 for i in range(V)]) for t in range(V)}
    tokens, _ = run(GenerationParams(max_new_tokens=6, no_repeat_ngram=1), table, table[0])
    assert len(tokens) == len(set(tokens))
    tokens, _ = run(GenerationParams(max_new_tokens=8, no_repeat_ngram=2), table, table[0])
    bigrams = list(zip(tokens, tokens[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_block_repeats_bans_exactly_the_completing_tokens():
    logits = torch.zeros(V)
    out = block_repeats(logits, [4, 5, 4], 2)
    assert out[5] == float("-inf") and torch.isfinite(out[[0, 1, 2, 3, 4, 6, 7]]).all()


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    table = {t: torch.zeros(V) for t in range(V)}
    params = GenerationParams(strategy="sample", max_new_tokens=12, seed=7)
    a, _ = run(params, table, table[0])
    b, _ = run(params, table, table[0])
    c, _ = run(GenerationParams(strategy="sample", max_new_tokens=12, seed=8), table, table[0])
    assert a == b and a != c


def test_top_k_keeps_only_k_tokens():
    logits = torch.arange(V, dtype=torch.float32)
    kept = torch.isfinite(filter_logits(logits, GenerationParams(top_k=3)))
    assert kept.tolist() == [False] * 5 + [True] * 3


def test_top_p_keeps_the_smallest_nucleus():
    logits = logits_for([0.5, 0.3, 0.1, 0.05, 0.05, 0, 0, 0])
    kept = torch.isfinite(filter_logits(logits, GenerationParams(top_p=0.75)))
    assert kept.tolist() == [True, True] + [False] * 6


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = filter_logits(logits, GenerationParams(temperature=0.1)).softmax(-1)
    assert cold[1] > 0.99


def test_sampling_with_top_k_1_equals_greedy():
    table = chain_table()
    greedy, _ = run(GenerationParams(), table, table[0])
    sampled, _ = run(GenerationParams(strategy="sample", top_k=1, seed=1), table, table[0])
    assert sampled == greedy


def test_beam_search_finds_the_better_sequence_greedy_misses():
    # first step: 4 (0.5) vs 5 (0.4); after 4 everything is flat, after 5 EOS is certain
    flat = logits_for([1 / V] * V)
    table = {t: flat for t in range(V)}
    table[5] = logits_for([0.0] * 3 + [1.0] + [0.0] * 4)
    first = logits_for([0.0, 0.0, 0.0, 0.0, 0.5, 0.4, 0.05, 0.05])
    greedy, _ = run(GenerationParams(max_new_tokens=3), table, first)
    beam, outcome = run(GenerationParams(strategy="beam", beam_width=3, max_new_tokens=3),
                        table, first)
    assert greedy[0] == 4
    assert beam == [5] and outcome.finish_reason == "stop"


def test_stop_check_ends_generation():
    table = {t: logits_for([0.9 if i == 4 else 0.01 for i in range(V)]) for t in range(V)}
    tokens, outcome = run(GenerationParams(max_new_tokens=10), table, table[0],
                          stop_check=lambda ids: len(ids) == 3)
    assert tokens == [4, 4, 4] and outcome.finish_reason == "stop"


def test_cancelling_between_steps_reports_the_last_emitted_token():
    table = chain_table()
    gen = generate(table_step(table), table[0][None], torch.ones(1, 1),
                   torch.zeros(1, 1, 1, 2), GenerationParams(), eos_id=EOS)
    first = next(gen.tokens)
    assert gen.outcome.finish_reason == "cancelled" and gen.outcome.last_token == first.id


def test_params_from_config_and_overrides_are_validated():
    params = GenerationParams.from_config(GenerationConfig(), strategy="beam", beam_width=2)
    assert params.strategy == "beam" and params.beam_width == 2
    with pytest.raises(ValueError, match="unknown generation settings: colour"):
        params.with_overrides(colour="red")
    with pytest.raises(Exception, match="generation.top_p"):
        params.with_overrides(top_p=2.0)


def repeating_table(cycle):
    """Each token of ``cycle`` is followed by the next, the last by the first (p = 0.9)."""
    table = {}
    for t in range(V):
        nxt = cycle[(cycle.index(t) + 1) % len(cycle)] if t in cycle else cycle[0]
        table[t] = logits_for([0.9 if i == nxt else 0.01 for i in range(V)])
    return table


LOOP_STRATEGIES = [{"strategy": "greedy"}, {"strategy": "sample", "seed": 5, "temperature": 0.3},
                   {"strategy": "beam", "beam_width": 3}]


@pytest.mark.parametrize("mode", LOOP_STRATEGIES, ids=lambda m: m["strategy"])
@pytest.mark.parametrize("cycle", [[4], [4, 5], [4, 5, 6, 7, 2]], ids=len)
def test_the_loop_guard_ends_a_repeating_reply_for_every_strategy(mode, cycle):
    table = repeating_table(cycle)
    unguarded, outcome = run(GenerationParams(max_new_tokens=40, loop_ngram=0, **mode),
                             table, table[cycle[-1]])
    assert len(unguarded) == 40 and outcome.finish_reason == "length"  # it really loops
    tokens, outcome = run(GenerationParams(max_new_tokens=40, **mode), table, table[cycle[-1]])
    assert outcome.finish_reason == "loop"
    # the first 4-gram to occur a third time ends it: two whole periods plus one 4-gram
    assert tokens == unguarded[: 2 * len(cycle) + 4]


def test_a_reply_that_repeats_only_shorter_ngrams_is_not_a_loop():
    # "4 5 4 6 4 5 4 7 ...": the bigram "4 5" recurs, no 4-gram occurs three times
    assert not generate_loops([4, 5, 4, 6, 4, 5, 4, 7, 4, 5, 4, 2])
    assert generate_loops([4, 5, 4, 6, 4, 5, 4, 6, 4, 5, 4, 6])


def generate_loops(tokens):
    from mmchat.generate import loops

    return loops(tokens, 4)


@pytest.mark.parametrize("mode", LOOP_STRATEGIES, ids=lambda m: m["strategy"])
def test_each_chosen_token_reports_the_model_probability(mode):
    table = chain_table()
    state = torch.zeros(1, 1, 1, 2)
    gen = generate(table_step(table), table[0][None], torch.ones(1, 1), state,
                   GenerationParams(**mode), eos_id=EOS)
    tokens = [t.id for t in gen]
    assert tokens == [4, 5, 6]
    want = (table[0].softmax(-1)[4]).item()  # every step: 0.8 against seven 0.02
    assert gen.probs == pytest.approx([want] * 4, rel=1e-5)  # the three tokens and </s>
    assert gen.confidence == pytest.approx(want, rel=1e-5)


def test_confidence_is_the_least_sure_token():
    table = chain_table()
    table[5] = logits_for([0.3 if i == 6 else 0.1 for i in range(V)])  # unsure after 5
    state = torch.zeros(1, 1, 1, 2)
    gen = generate(table_step(table), table[0][None], torch.ones(1, 1), state,
                   GenerationParams(), eos_id=EOS)
    assert [t.id for t in gen] == [4, 5, 6]
    assert gen.confidence == pytest.approx(table[5].softmax(-1)[6].item(), rel=1e-5)
    assert gen.confidence == min(gen.probs) < max(gen.probs)


@pytest.mark.parametrize("batch,vocab", [(1, 1000), (7, 37), (64, 1000), (100, 4000)])
def test_token_probs_of_a_batch_are_each_rows_token_prob(batch, vocab):
    torch.manual_seed(batch)
    logits = torch.randn(batch, vocab) * 5
    tokens = torch.randint(vocab, (batch,)).tolist()
    tokens[0] = int(logits[0].argmax())
    got = token_probs(logits, tokens)
    assert got == [token_prob(logits[b], tokens[b]) for b in range(batch)]
    assert all(0.0 < p <= 1.0 for p in got)
