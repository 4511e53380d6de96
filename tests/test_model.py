import pytest
import torch
from toy_plugin import ToyModality

from mmchat.generate import GenerationParams
from mmchat.model import DialogueConfig, DialogueLM, MediaBatch
from mmchat.runtime import start_turn
from mmchat.state import MemoryEntry, SessionState
from mmchat.tokenizer import Tokenizer

FUSIONS = ["attention", "concat", "weighted"]
RNNS = ["lstm", "gru"]


def tiny_model(fusion="attention", rnn="lstm", vocab=40, seed=0, tags=0, carry=False,
               select=False, summaries=True, reread=False):
    torch.manual_seed(seed)
    cfg = DialogueConfig(vocab_size=vocab, rnn=rnn, n_layer=2, n_embd=16, n_hidden=24,
                         d_model=16, dropout=0.0, fusion=fusion, modalities=["toy"],
                         entry_tags=tags, carry_query=carry, select_entries=select,
                         summaries=summaries, reread=reread)
    return DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})


def batch():
    g = torch.Generator().manual_seed(1)
    B, T = 4, 14
    idx = torch.randint(6, 40, (B, T), generator=g)
    turns = torch.zeros(B, T, dtype=torch.long)
    turns[:, 7:] = 1
    prompt_end = torch.tensor([[3, 10]] * B)
    targets = torch.randint(6, 40, (B, T), generator=g)
    targets[:, :4] = -1
    media = [MediaBatch("toy", torch.rand(3, 4, 5, generator=g), torch.tensor([5, 3, 2]),
                        torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]))]
    return idx, turns, prompt_end, media, targets


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
def test_a_few_steps_lower_the_loss(fusion, rnn):
    model = tiny_model(fusion, rnn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(*batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


@pytest.mark.parametrize("fusion", FUSIONS)
def test_training_scores_only_the_positions_with_targets(fusion):
    model = tiny_model(fusion)
    idx, turns, prompt_end, media, targets = batch()
    full, no_loss = model(idx, turns, prompt_end, media)  # (B, T, V)
    scored, loss = model(idx, turns, prompt_end, media, targets)  # (S, V)
    keep = targets >= 0
    assert no_loss is None and full.shape == (*idx.shape, 40)
    assert scored.shape == (int(keep.sum()), 40)
    torch.testing.assert_close(scored, full[keep])
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, 40), targets.reshape(-1),
                                                 ignore_index=-1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_the_modality_encoder(fusion):
    model = tiny_model(fusion)
    _, loss = model(*batch())
    loss.backward()
    assert model.encoders["toy"].proj.weight.grad.abs().sum() > 0


def test_transcripts_train_the_word_head_and_the_encoder():
    torch.manual_seed(0)
    cfg = DialogueConfig(vocab_size=40, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         dropout=0.0, modalities=["toy"], transcripts=True)
    model = DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})
    idx, turns, prompt_end, media, targets = batch()
    media[0].words = [[7, 8, 9], [], [10]]  # the second clip has no transcript
    vectors = model.encode("toy", media[0].x, media[0].lengths)
    said, n = model.transcript_loss(vectors, media[0].words)
    assert n == 2 and said.item() > 2 * 3.0  # about log(40) per clip before training
    _, with_words = model(idx, turns, prompt_end, media, targets, transcript_weight=1.0)
    _, without = model(idx, turns, prompt_end, media, targets)
    assert with_words.item() == pytest.approx(without.item() + said.item() / 2, rel=1e-5)
    with_words.backward()
    assert model.word_head.weight.grad.abs().sum() > 0
    assert model.encoders["toy"].proj.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss, _ = model.transcript_loss(model.encode("toy", media[0].x, media[0].lengths),
                                        media[0].words)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < said.item() / 2


def hearing_model(vocab=40, heard_tokens=8.0):
    torch.manual_seed(0)
    cfg = DialogueConfig(vocab_size=vocab, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         dropout=0.0, modalities=["toy"], transcripts=True, heard=["toy"],
                         heard_tokens=heard_tokens)
    return DialogueLM(cfg, {"toy": ToyModality().build_encoder(16)})


def test_a_sure_word_head_hears_the_bag_the_typed_words_give():
    model = hearing_model(heard_tokens=3.0)
    said = [7, 8, 9]
    with torch.no_grad():
        model.word_head.weight.zero_()
        model.word_head.bias.fill_(-50.0)
        model.word_head.bias[said] = 50.0
    clip = torch.rand(6, 16)
    roles = torch.tensor([[1, 2]])  # an empty user turn: just its role tokens
    spoken = model.bag_of_words(roles, torch.ones(1, 2), model.heard_words([clip]),
                                torch.ones(1))
    typed = model.bag_of_words(torch.tensor([[1, 2] + said]), torch.ones(1, 5))
    torch.testing.assert_close(spoken, typed)
    assert not model.hears("image")


def test_heard_words_reach_the_query_and_train_through_it():
    model = hearing_model()
    idx, turns, prompt_end, media, targets = batch()
    _, heard = model(idx, turns, prompt_end, media, targets)
    model.config.heard = []
    _, deaf = model(idx, turns, prompt_end, media, targets)
    assert heard.item() != pytest.approx(deaf.item(), abs=1e-6)
    model.config.heard = ["toy"]
    _, loss = model(idx, turns, prompt_end, media, targets)  # no transcript loss at all
    loss.backward()
    assert model.word_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("hearing", [False, True])
@pytest.mark.parametrize("v2,reread", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("summaries", [True, False])
def test_training_pass_equals_incremental_inference(fusion, rnn, hearing, v2, reread, summaries):
    """The teacher-forced pass and turn-by-turn decoding compute the same logits.

    With ``hearing``, the first turn's attachment is heard (its words join that turn's
    bag) and the second turn, which sends nothing, hears nothing. With ``v2``, memory
    entries carry recency/ordinal tags, each query sees the previous one, and the second
    turn sends a second attachment (so the first one's recency changes). With ``reread``,
    every step reads the memory twice. Without ``summaries`` the memory holds no
    max-pooled slots.
    """
    tok = Tokenizer.train(["the circle is red", "what colour is it", "hello there"] * 20,
                          vocab_size=40)
    model = tiny_model(fusion, rnn, vocab=tok.vocab_size, tags=4 if v2 else 0,
                       carry=v2, summaries=summaries, reread=reread).eval()
    if v2:  # large enough that a wrong tag or a lost query moves the logits past atol
        with torch.no_grad():
            for p in [*model.turn_query.parameters(), model.recency_emb, model.ordinal_emb]:
                p.normal_(0.0, 0.5)
    if reread:  # the same for a second read the incremental path might skip
        with torch.no_grad():
            for p in model.reread.parameters():
                p.normal_(0.0, 0.5)
    if hearing:
        model.config.transcripts, model.config.heard = True, ["toy"]
        model.word_head = torch.nn.Linear(16, tok.vocab_size)
    feats = torch.rand(4, 5, generator=torch.Generator().manual_seed(3))
    q1, a1 = tok.encode("what colour is it"), tok.encode("the circle is red")
    q2, a2 = tok.encode("hello there"), tok.encode("red")
    seq = ([tok.bos_id, tok.user_id] + q1 + [tok.bot_id] + a1 + [tok.eos_id]
           + [tok.user_id] + q2 + [tok.bot_id] + a2 + [tok.eos_id])
    end1 = 2 + len(q1)
    start2 = end1 + len(a1) + 2
    end2 = start2 + 1 + len(q2)
    turns = torch.tensor([[0] * start2 + [1] * (len(seq) - start2)])
    idx = torch.tensor([seq])
    second = torch.rand(4, 5, generator=torch.Generator().manual_seed(4))
    both = torch.stack([feats, second])
    media = [MediaBatch("toy", both if v2 else feats[None], torch.tensor([5, 3] if v2 else [5]),
                        torch.tensor([0, 0] if v2 else [0]),
                        torch.tensor([0, 1] if v2 else [0]))]
    with torch.no_grad():
        full, _ = model(idx, turns, torch.tensor([[end1, end2]]), media)

    vectors = model.encode("toy", both, torch.tensor([5, 3]))
    memory = [MemoryEntry("toy", vectors[0])]
    state = None
    for end, answer, text, new in [(end1, a1, "what colour is it", 1),
                                   (end2, a2, "hello there", 1 if v2 else 0)]:
        if end == end2 and v2:
            memory.append(MemoryEntry("toy", vectors[1]))
        run = start_turn(model, tok, state, memory, text, GenerationParams(), new=new)
        slots = 1 + sum(e.vectors.shape[0] for e in memory) + (1 if summaries else 0)
        assert run.memory.values.shape[1] == slots  # null, the entries, a summary per kind
        got = [run.prompt_logits[0]]
        rnn_state = run.prompt_state
        with torch.no_grad():
            for t in answer:
                h, rnn_state = model.run_rnn(torch.tensor([[t]]), rnn_state)
                out, ctx, _ = model.read(h, run.memory)
                got.append(model.logits(out, ctx)[0, -1])
        for i, logits in enumerate(got):
            torch.testing.assert_close(logits, full[0, end + i], atol=1e-4, rtol=1e-4)
        state = SessionState(rnn=rnn_state, pending=[tok.eos_id], turns=1,
                             query=run.memory.query)


def test_turn_query_glimpse_is_multihead_attention_with_one_query():
    from mmchat.fusion import TurnQuery

    torch.manual_seed(0)
    tq = TurnQuery(24, 16, 32, n_head=4)
    B, N = 5, 9
    q = torch.randn(B, 32, requires_grad=True)
    memory = torch.randn(B, N, 32, requires_grad=True)
    mask = torch.rand(B, N) > 0.4
    mask[:, 0] = True  # the null slot is always visible
    want, _ = tq.attn(q.unsqueeze(1), memory, memory, key_padding_mask=~mask,
                      need_weights=False)
    got = tq.glimpse(q, memory, mask)
    torch.testing.assert_close(got, want.squeeze(1), atol=1e-5, rtol=1e-5)
    g_want = torch.autograd.grad(want.square().sum(), [memory, tq.attn.in_proj_weight])
    g_got = torch.autograd.grad(got.square().sum(), [memory, tq.attn.in_proj_weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_entry_places_count_from_the_latest_and_the_first_of_each_modality():
    """Two toy pictures then a third, with voice clips between: each modality counts alone."""
    torch.manual_seed(0)
    cfg = DialogueConfig(vocab_size=40, n_layer=1, n_embd=16, n_hidden=24, d_model=16,
                         modalities=["toy", "voice"], entry_tags=2)
    model = DialogueLM(cfg, {"toy": ToyModality().build_encoder(16),
                             "voice": ToyModality().build_encoder(16)})
    v = torch.zeros(2, 16)
    entries = [[("toy", v), ("voice", v[:1]), ("toy", v), ("toy", v[:1])]]
    values, kinds, mask, ordinal = model.memory_bank(entries)
    assert ordinal[0].tolist() == [0, 0, 0, 0, 1, 1, 2]
    recency, place = model.entry_places(kinds, ordinal, mask)
    assert recency[0].tolist() == [0, 1, 1, 0, 1, 1, 0]  # capped at entry_tags - 1 = 1
    assert place[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    hidden = mask.clone()
    hidden[0, 6] = False  # the third picture not sent yet: the second is the latest
    recency, _ = model.entry_places(kinds, ordinal, hidden)
    assert recency[0].tolist() == [0, 1, 1, 0, 0, 0, 0]
    with torch.no_grad():
        model.recency_emb.normal_()
        model.ordinal_emb.normal_()
    tags = model.entry_tags(kinds, ordinal, hidden)
    assert tags[0, 0].abs().sum() == 0 and tags[0, 6].abs().sum() == 0  # null, hidden
    torch.testing.assert_close(tags[0, 4], model.recency_emb[0] + model.ordinal_emb[1])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_new_model_with_tags_and_carry_starts_as_one_without(fusion):
    """The tags, the carried query and the entry selector start at zero and draw no random
    numbers: the same seed gives the same weights and the same logits, and training
    moves them."""
    plain, v2 = tiny_model(fusion), tiny_model(fusion, tags=4, carry=True, select=True)
    shared = plain.state_dict()
    assert all(torch.equal(shared[k], v) for k, v in v2.state_dict().items() if k in shared)
    idx, turns, prompt_end, media, targets = batch()
    torch.testing.assert_close(v2(idx, turns, prompt_end, media)[0],
                               plain(idx, turns, prompt_end, media)[0])
    _, loss = v2(idx, turns, prompt_end, media, targets)
    loss.backward()
    assert v2.turn_query.carry.grad.abs().sum() > 0 and v2.ordinal_emb.grad.abs().sum() > 0
    assert v2.select.score.weight.grad.abs().sum() > 0


def test_the_entry_selector_dims_the_pictures_the_query_does_not_ask_about():
    """Two toy pictures: scores that favour the first (ordinal 0) give its vectors gate
    near 2 and the second's near 0, so the decoder's attention moves to the first; the
    null slot keeps gate 1."""
    model = tiny_model(tags=4, select=True)
    g = torch.Generator().manual_seed(3)
    entries = [[("toy", torch.randn(3, 16, generator=g)), ("toy", torch.randn(3, 16, generator=g))]]
    values, kinds, mask, ordinal = model.memory_bank(entries)
    recency, place = model.entry_places(kinds, ordinal, mask)
    q = torch.ones(1, 16)
    assert model.select(q, kinds, recency, place).tolist() == [[1.0] * 7]  # starts neutral
    with torch.no_grad():  # scores: (kind 1) recency 0..3 then ordinal 0..3
        model.select.score.bias.copy_(torch.tensor([0.0] * 4 + [8.0, -8.0, 0.0, 0.0]))
    gate = model.select(q, kinds, recency, place)[0]
    assert gate[0] == 1 and (gate[1:4] > 1.99).all() and (gate[4:] < 0.01).all()
    h = torch.zeros(1, 24)
    bag = torch.zeros(1, 16)
    mem = model.turn_memory(h, bag, values, kinds, mask, ordinal)
    torch.testing.assert_close(mem.values[0, 4:7], torch.zeros(3, 16), atol=0.02, rtol=0)
    assert mem.values[0, 1:4].abs().sum() > 1
