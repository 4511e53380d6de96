"""The count entry (``[fusion] count_heads``): soft counts of the memory vectors that match
the question, as one more memory vector each turn."""

from pathlib import Path

import torch
from toy_plugin import ToyModality

from mmchat import checkpoint
from mmchat.counting import CountEntry, last_of_entry, soft_one_hot
from mmchat.model import DialogueConfig, DialogueLM
from mmchat.tokenizer import Tokenizer
from mmchat.training.init import Base

V = 40


def counting_model(slots=3, heads=2, seed=0, vocab=V):
    torch.manual_seed(seed)
    cfg = DialogueConfig(vocab_size=vocab, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         dropout=0.0, modalities=["toy"], object_slots=slots,
                         objects_for=["toy"] if slots else [], count_heads=heads)
    return DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})


def test_a_count_is_a_triangle_over_the_bins_that_sums_to_one():
    got = soft_one_hot(torch.tensor([0.0, 2.0, 2.25, 30.0, -1.0]), bins=5)
    want = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0.75, 0.25, 0],
                         [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    torch.testing.assert_close(got, want)


def test_the_slots_are_counted_and_nothing_else():
    model = counting_model(slots=3)
    d = 16
    entries = [[("toy", torch.randn(5 + 3, d)), ("toy", torch.randn(2 + 3, d))],
               [("toy", torch.randn(1 + 3, d))]]
    _, kinds, mask, ordinal = model.memory_bank(entries)  # null first, then the entries
    counted = model.countable(kinds, ordinal, mask)
    assert counted[0].nonzero().squeeze(1).tolist() == [6, 7, 8, 11, 12, 13]
    assert counted[1].nonzero().squeeze(1).tolist() == [2, 3, 4]  # padding after is not
    last_two = last_of_entry(kinds, ordinal, mask, 2)[0]  # the null slot is an entry of one
    assert last_two.nonzero().squeeze(1).tolist() == [0, 7, 8, 12, 13]
    plain = counting_model(slots=0)  # no slots: every attachment vector, not the null
    assert plain.countable(kinds, ordinal, mask).sum(dim=1).tolist() == [13, 4]


def test_each_turns_memory_ends_with_the_count_entry():
    model = counting_model(slots=3).eval()
    entries = [[("toy", torch.randn(5 + 3, 16))]]
    values, kinds, mask, ordinal = model.memory_bank(entries)
    mem = model.turn_memory(torch.randn(1, 24), torch.randn(1, 16), values, kinds, mask, ordinal)
    assert mem.values.shape[1] == values.shape[1] + 1 + 1  # a summary per kind, the counts
    assert mem.kinds[0, -1] == 0 and mem.mask[0, -1]  # of no modality, always visible
    with torch.no_grad():
        counted = model.countable(kinds, ordinal, mask)
        conditioned_count = model.count(mem.values[:, : values.shape[1]], counted)
    torch.testing.assert_close(mem.values[:, -1], conditioned_count)


def _scenes(g: torch.Generator, n: int, prototypes: torch.Tensor):
    """n memories of 2 to 4 entries, each entry four distractor vectors and three slots
    that are "nothing", an A or a B (prototype plus noise); the label is the number of
    A slots in all entries."""
    entries = torch.randint(2, 5, (n, 1), generator=g)  # (n, 1)
    present = torch.arange(4) < entries  # (n, 4) which of the 4 entries there are
    kinds = torch.randint(0, 3, (n, 4, 3), generator=g)  # (n, 4, 3) each slot's object
    slots = prototypes[kinds] + 0.3 * torch.randn(n, 4, 3, 16, generator=g)
    values = torch.cat([torch.randn(n, 4, 4, 16, generator=g), slots], dim=2)  # (n, 4, 7, 16)
    countable = torch.cat([torch.zeros(n, 4, 4, dtype=torch.bool),
                           present.unsqueeze(-1).expand(n, 4, 3)], dim=2)  # (n, 4, 7)
    labels = ((kinds == 1) & present.unsqueeze(-1)).sum(dim=(1, 2))  # (n,)
    return values.flatten(1, 2), countable.flatten(1), labels


def test_the_count_entry_learns_to_add_up_matches_across_entries():
    """What attention's weighted average cannot do: a count over 2 to 4 pictures."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    prototypes = 2 * torch.randn(3, 16, generator=g)  # nothing, A, B
    counter, classify = CountEntry(16, 2), torch.nn.Linear(16, 13)
    opt = torch.optim.Adam([*counter.parameters(), *classify.parameters()], lr=1e-2)
    for _ in range(300):
        values, countable, labels = _scenes(g, 64, prototypes)
        loss = torch.nn.functional.cross_entropy(classify(counter(values, countable)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    values, countable, labels = _scenes(torch.Generator().manual_seed(99), 400, prototypes)
    with torch.no_grad():
        said = classify(counter(values, countable)).argmax(dim=-1)
    assert (said == labels).float().mean() > 0.95  # labels 0 to 12


def test_the_count_heads_round_trip_and_a_warm_start_takes_the_runs(tmp_path):
    tok = Tokenizer.train(["the circle is red", "how many squares in all"] * 20, vocab_size=V)
    model = counting_model(slots=3, heads=4, vocab=tok.vocab_size)
    checkpoint.save(tmp_path / "m", model, tok, {"toy": ToyModality()})
    again, _, _ = checkpoint.load(tmp_path / "m", {"toy": ToyModality()})
    assert again.config.count_heads == 4
    assert again.count.gate.weight.equal(model.count.gate.weight)
    base = Base(Path("m"), counting_model(slots=3, heads=0).config, {}, tok)
    assert base.grown(model.config).count_heads == 4


def test_the_answer_head_reads_the_count_entry_itself():
    """Not only through the max-pool: an entry that wins no dimension of it still moves
    the answer, so a count answer ("three") trains the count gates directly."""
    torch.manual_seed(0)
    cfg = DialogueConfig(vocab_size=V, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         dropout=0.0, modalities=["toy"], object_slots=3, objects_for=["toy"],
                         count_heads=2, answers=["one", "two", "three"])
    model = DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})
    values, kinds, mask, ordinal = model.memory_bank([[("toy", torch.randn(5 + 3, 16))]])
    mem = model.turn_memory(torch.randn(1, 24), torch.randn(1, 16), values, kinds, mask, ordinal)
    entry = torch.full((1, 1, 16), -100.0, requires_grad=True)  # below every other vector
    mem.values = torch.cat([mem.values[:, :-1].detach(), entry], dim=1)
    loss = torch.nn.functional.cross_entropy(model.answer_logits(mem), torch.tensor([2]))
    loss.backward()
    assert entry.grad.abs().sum() > 0
