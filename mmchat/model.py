"""The dialogue language model: an LSTM/GRU decoder grounded in a memory bank.

Reads like nanoGPT: a config dataclass, small modules, shape comments, and
``forward(..., targets=None) -> (logits, loss)``. Training runs whole dialogues in
one pass; inference runs the same pieces a turn and a token at a time
(:mod:`mmchat.runtime`), so both compute exactly the same function.

Sequence layout of a dialogue (``<s>`` once, then each turn)::

    <s> <user> question <bot> answer </s> <user> follow-up <bot> answer </s>

Turn ``k``'s query is read at its ``<bot>`` token; every position of turn ``k``
sees the memory of attachments sent up to and including turn ``k``. With
``entry_tags``, each memory vector carries which of its modality's attachments it came
from, counted from the latest (recency) and from the first (ordinal), as seen at turn
``k``; with ``carry_query``, turn ``k``'s query also sees turn ``k - 1``'s (the
referent of a follow-up such as "and where is it?"); with ``select_entries``, turn
``k``'s query gates each entry's vectors ("the first picture" dims the others). With
``reread``, every step reads the memory twice: a hidden layer over the state and the
first read moves the state, which then reads again and chooses the token, so the reply's
first word ("yes" or "no") can depend on what the first read found. With
``object_slots``, each attachment of the modalities in ``objects_for`` brings that many
more vectors, each trained to read one object it shows (:mod:`mmchat.objects`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import EntrySelector, FiLM, TurnMemory, TurnQuery, build_fusion, pool_by_kind
from .objects import ObjectSlots, object_loss, object_targets


@dataclass
class DialogueConfig:
    vocab_size: int = 4000
    rnn: str = "lstm"  # "lstm" or "gru"
    n_layer: int = 2
    n_embd: int = 256  # token embedding size
    n_hidden: int = 512  # RNN hidden size
    d_model: int = 256  # size of every memory vector
    dropout: float = 0.1
    fusion: str = "attention"  # "attention", "concat" or "weighted"
    condition: bool = True  # FiLM-condition the memory on each turn's query
    modalities: list[str] = field(default_factory=list)  # order fixes the type ids
    answers: list[str] = field(default_factory=list)  # classes of the auxiliary answer head
    transcripts: bool = False  # train a head that tells which words an attachment says
    heard: list[str] = field(default_factory=list)  # modalities whose words join the turn's bag
    heard_tokens: float = 8.0  # how many typed tokens one heard attachment counts for
    entry_tags: int = 0  # recency/ordinal embeddings per memory entry (0 = none)
    carry_query: bool = False  # each turn's query sees the previous turn's query
    select_entries: bool = False  # the query gates each entry's vectors (needs entry_tags)
    summaries: bool = True  # append each modality's max-pooled vectors to the memory
    reread: bool = False  # a layer compares the first read with the state, then reads again
    object_slots: int = 0  # vectors per attachment that each read one object (0 = none)
    objects_for: list[str] = field(default_factory=list)  # modalities that get the slots
    object_order: str = "data"  # slot i takes object i ("data") or any one ("any")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "DialogueConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class MediaBatch:
    """One modality's attachments for a training batch."""

    modality: str
    x: torch.Tensor  # collated features
    lengths: torch.Tensor  # (A,)
    item: torch.Tensor  # (A,) which dialogue in the batch each attachment belongs to
    turn: torch.Tensor  # (A,) the turn that sent it
    words: list[list[int]] | None = None  # each attachment's transcript ids ([] for none)
    objects: list[list[list[int]]] | None = None  # each one's object phrases' ids ([] for none)


class DialogueLM(nn.Module):
    def __init__(self, config: DialogueConfig, encoders: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if config.rnn not in ("lstm", "gru"):
            raise ValueError(f"rnn must be 'lstm' or 'gru', not {config.rnn!r}")
        missing = [m for m in config.modalities if m not in encoders]
        if missing:
            raise ValueError(f"no encoder for modalities {missing}")
        self.config = config
        c = config
        self.kind_index = {name: i + 1 for i, name in enumerate(c.modalities)}  # 0 = null slot
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        rnn_cls = nn.LSTM if c.rnn == "lstm" else nn.GRU
        self.rnn = rnn_cls(c.n_embd, c.n_hidden, num_layers=c.n_layer, batch_first=True,
                           dropout=c.dropout if c.n_layer > 1 else 0.0)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in c.modalities})
        self.kind_emb = nn.Embedding(len(c.modalities) + 1, c.d_model)
        self.null = nn.Parameter(torch.zeros(1, c.d_model))
        self.turn_query = TurnQuery(c.n_hidden, c.n_embd, c.d_model, carry=c.carry_query)
        # which entry of its modality a memory vector came from: zero at first, so a new
        # model computes what it would without them, and draws no extra random numbers
        self.recency_emb = nn.Parameter(torch.zeros(c.entry_tags, c.d_model)) \
            if c.entry_tags else None  # (n, d), 0 = the latest entry
        self.ordinal_emb = nn.Parameter(torch.zeros(c.entry_tags, c.d_model)) \
            if c.entry_tags else None  # (n, d), 0 = the first entry
        self.film = FiLM(c.d_model) if c.condition else None
        self.select = EntrySelector(c.d_model, len(c.modalities), c.entry_tags) \
            if c.select_entries and c.entry_tags else None
        self.fusion = build_fusion(c.fusion, c.n_hidden, c.d_model, len(c.modalities))
        self.answer_head = nn.Sequential(
            nn.Linear(2 * c.d_model, c.d_model), nn.ReLU(), nn.Linear(c.d_model, len(c.answers))
        ) if c.answers else None
        self.word_head = nn.Linear(c.d_model, c.vocab_size) if c.transcripts else None
        # state and first read -> a move of the state that makes the second read (H + d -> H)
        self.reread = nn.Sequential(nn.Linear(c.n_hidden + c.d_model, c.n_hidden), nn.Tanh(),
                                    nn.Linear(c.n_hidden, c.n_hidden)) if c.reread else None
        self.combine = nn.Linear(c.n_hidden + c.d_model, c.n_hidden)
        self.lm_head = nn.Linear(c.n_hidden, c.vocab_size)
        slotted = c.object_slots > 0 and bool(c.objects_for)
        self.objects = ObjectSlots(c.d_model, c.object_slots) if slotted else None
        # each slot's words, plus one class for "nothing" (V + 1)
        self.object_head = nn.Linear(c.d_model, c.vocab_size + 1) if slotted else None
        self.apply(_init_weights)
        if self.objects is not None:
            # distinct unit-scale queries: identical ones would never tell the slots apart
            nn.init.normal_(self.objects.queries, std=1.0)
        if self.reread is not None:
            # unit-variance hidden layer (tanh not saturated, not near zero): the output
            # layer's small weights then learn from the first step, even on a warm start
            first = self.reread[0]
            nn.init.normal_(first.weight, std=first.in_features ** -0.5)

    # -- pieces shared by training and inference ----------------------------------------

    def encode(self, modality: str, x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Run one modality's encoder; returns each item's real vectors, (N_i, d)."""
        vectors, mask = self.encode_batch(modality, x, lengths)  # (A, N, d), (A, N)
        return [v[m] for v, m in zip(vectors, mask)]

    def encode_batch(self, modality: str, x: torch.Tensor, lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One modality's encoder on a batch: vectors (A, N, d) and mask (A, N). With object
        slots for the modality, its K slots follow each item's vectors: (A, N + K, d)."""
        vectors, mask = self.encoders[modality](x, lengths)  # (A, N, d), (A, N)
        return self.with_objects(modality, vectors, mask)

    def with_objects(self, modality: str, vectors: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoder's output (A, N, d), (A, N) with the modality's object slots after
        each item's vectors, (A, N + K, d), (A, N + K); unchanged for a modality without
        them. Serving calls it on the encoder output it has checked."""
        if self.objects is None or modality not in self.config.objects_for:
            return vectors, mask
        slots = self.objects(vectors, mask)  # (A, K, d)
        return torch.cat([vectors, slots], dim=1), torch.cat(
            [mask, mask.new_ones(slots.shape[:2])], dim=1)

    def initial_state(self, batch: int = 1) -> torch.Tensor:
        """Zero RNN state, (S, L, B, H) with S = 2 for LSTM (h, c) and 1 for GRU."""
        c = self.config
        s = 2 if c.rnn == "lstm" else 1
        return self.tok_emb.weight.new_zeros(s, c.n_layer, batch, c.n_hidden)

    def run_rnn(self, idx: torch.Tensor, state: torch.Tensor,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (B, T, H) and the new state (S, L, B, H).

        ``lengths`` (B,) marks ``idx`` as right-padded: each row's state is taken after its
        own last token, and its outputs past that are zero.
        """
        x = self.drop(self.tok_emb(idx))  # (B, T, E)
        if lengths is not None:
            x = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                  enforce_sorted=False)
        if self.config.rnn == "lstm":
            h, (hn, cn) = self.rnn(x, (state[0].contiguous(), state[1].contiguous()))
            new = torch.stack([hn, cn])  # (2, L, B, H)
        else:
            h, hn = self.rnn(x, state[0].contiguous())
            new = hn.unsqueeze(0)  # (1, L, B, H)
        if lengths is not None:
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True,
                                                    total_length=idx.shape[1])
        return h, new  # (B, T, H), (S, L, B, H)

    def memory_bank(self, entries: Sequence[Sequence[tuple[str, torch.Tensor]]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad each item's (modality, vectors) entries into one bank with a null slot first.

        Returns values (B, N, d) with type embeddings added, kinds (B, N), mask (B, N)
        and ordinal (B, N): which of its modality's entries (in the order given: 0 for
        the first) each vector came from (0 for the null slot and padding).
        """
        d = self.config.d_model
        B = len(entries)
        sizes = [1 + sum(v.shape[0] for _, v in item) for item in entries]
        N = max(sizes)
        kinds_rows, ordinal_rows, parts = [], [], []
        for item, size in zip(entries, sizes):
            kinds_b, ordinal_b, seen = [0], [0], {}
            for m, v in item:
                n = v.shape[0]
                kinds_b += [self.kind_index[m]] * n
                ordinal_b += [seen.get(m, 0)] * n
                seen[m] = seen.get(m, 0) + 1
            padding = [0] * (N - size)
            kinds_rows.append(kinds_b + padding)
            ordinal_rows.append(ordinal_b + padding)
            parts += [self.null, *(v for _, v in item)]
        device = self.null.device
        kinds = torch.tensor(kinds_rows, dtype=torch.long, device=device)  # (B, N)
        ordinal = torch.tensor(ordinal_rows, dtype=torch.long, device=device)  # (B, N)
        mask = torch.arange(N, device=device) < torch.tensor(sizes, device=device).unsqueeze(1)
        values = self.null.new_zeros(B, N, d)
        values[mask] = torch.cat(parts, dim=0)  # each row's slots in order, padding after
        return values + self.kind_emb(kinds), kinds, mask, ordinal

    def entry_places(self, kinds: torch.Tensor, ordinal: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recency and ordinal (B, N) of each visible vector's entry, capped at
        ``entry_tags - 1``.

        Recency counts back from the latest visible entry of the same modality (0 = the
        latest picture), ordinal from the first (0 = the first picture). The null slot
        and hidden vectors get 0.
        """
        n = self.config.entry_tags
        tagged = mask & (kinds > 0)  # (B, N)
        latest = torch.zeros_like(ordinal)  # (B, N) the latest ordinal of each vector's kind
        for k in range(1, len(self.config.modalities) + 1):
            sel = tagged & (kinds == k)
            last = ordinal.masked_fill(~sel, -1).max(dim=1, keepdim=True).values  # (B, 1)
            latest = torch.where(sel, last.expand_as(latest), latest)
        recency = ((latest - ordinal) * tagged).clamp(0, n - 1)
        return recency, (ordinal * tagged).clamp(0, n - 1)

    def entry_tags(self, kinds: torch.Tensor, ordinal: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
        """Recency plus ordinal embedding of each visible vector (B, N, d); zeros for the
        null slot and hidden vectors (:meth:`entry_places`)."""
        recency, place = self.entry_places(kinds, ordinal, mask)
        n, d = self.config.entry_tags, self.config.d_model
        # every (recency, ordinal) sum once, and a zero row for untagged slots: one
        # gather of (B, N) rows gives the same sums as two gathers and an add
        table = torch.cat([(self.recency_emb.unsqueeze(1) + self.ordinal_emb).view(n * n, d),
                           self.recency_emb.new_zeros(1, d)])  # (n*n + 1, d)
        index = torch.where(mask & (kinds > 0), recency * n + place, n * n)  # (B, N)
        return table[index]  # (B, N, d)

    def bag_of_words(self, idx: torch.Tensor, select: torch.Tensor,
                     heard: torch.Tensor | None = None,
                     n_heard: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token embedding (B, E) over the positions ``select`` (B, T) marks.

        ``heard`` (B, E) sums the :meth:`heard_words` of the turn's ``n_heard`` (B,)
        spoken attachments; each counts as ``heard_tokens`` typed tokens, so a spoken
        question gives about the bag its typed words would.
        """
        emb = self.tok_emb(idx) * select.unsqueeze(-1)  # (B, T, E)
        total, count = emb.sum(dim=1), select.sum(dim=1)  # (B, E), (B,)
        if heard is not None and n_heard is not None:
            w = self.config.heard_tokens
            total, count = total + w * heard, count + w * n_heard
        return total / count.unsqueeze(-1).clamp_min(1)

    def heard_words(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """What each attachment says, as the expected embedding of its words (A, E).

        The word head's distribution over the vocabulary (trained on transcripts, see
        :meth:`transcript_loss`) weights the token embeddings: the mean embedding of
        the words it hears.
        """
        return self.word_logits(vectors).softmax(dim=-1) @ self.tok_emb.weight  # (A, E)

    def word_logits(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The word head on each attachment's max-pooled vectors (N_i, d): (A, V)."""
        return self.word_head(torch.stack([v.max(dim=0).values for v in vectors]))

    def hears(self, modality: str) -> bool:
        return self.word_head is not None and modality in self.config.heard

    def turn_memory(self, h_prompt: torch.Tensor, bag: torch.Tensor, values: torch.Tensor,
                    kinds: torch.Tensor, mask: torch.Tensor,
                    ordinal: torch.Tensor | None = None,
                    previous: torch.Tensor | None = None) -> TurnMemory:
        """Condition the visible memory on the turn's query (read at its ``<bot>`` token).

        ``ordinal`` (B, N) tags each vector with its entry (:meth:`entry_tags`) and
        ``previous`` (B, d) is the previous turn's query (zeros for a first turn), both
        used only when the config asks for them. With ``summaries``, each modality's
        conditioned vectors are also max-pooled into one summary vector appended to the
        memory, so the decoder can attend to "the best match" directly.
        """
        places = None
        if self.recency_emb is not None and ordinal is not None:
            places = self.entry_places(kinds, ordinal, mask)  # recency, ordinal (B, N)
            values = values + self.entry_tags(kinds, ordinal, mask)  # (B, N, d)
        if self.config.carry_query and previous is None:
            previous = values.new_zeros(values.shape[0], self.config.d_model)
        q = self.turn_query(h_prompt, bag, values, mask,
                            previous if self.config.carry_query else None)  # (B, d)
        conditioned = self.film(values, q) if self.film is not None else values  # (B, N, d)
        if self.select is not None and places is not None:
            gate = self.select(q, kinds, *places)  # (B, N)
            conditioned = conditioned * gate.unsqueeze(-1)  # (B, N, d)
        if not self.config.summaries:
            return self.fusion.prepare(TurnMemory(conditioned, mask, kinds, q))
        n_kinds = len(self.config.modalities)
        pooled, present = pool_by_kind(conditioned, mask, kinds, n_kinds)  # (B, K, d), (B, K)
        kind_ids = torch.arange(1, n_kinds + 1, device=kinds.device).expand(kinds.shape[0], -1)
        return self.fusion.prepare(TurnMemory(
            torch.cat([conditioned, pooled], dim=1), torch.cat([mask, present], dim=1),
            torch.cat([kinds, kind_ids], dim=1), q))

    def answer_logits(self, mem: TurnMemory) -> torch.Tensor:
        """Auxiliary answer classes (B, A) from the pooled conditioned memory and the query."""
        summary = mem.values.masked_fill(~mem.mask.unsqueeze(-1), -1e9).max(dim=1).values
        return self.answer_head(torch.cat([summary, mem.query], dim=-1))

    def transcript_loss(self, vectors: Sequence[torch.Tensor], words: Sequence[Sequence[int]]
                        ) -> tuple[torch.Tensor, int]:
        """Summed bag-of-words loss of the word head on attachments with a transcript.

        Each attachment's vectors (N_i, d) are max-pooled and scored against every
        vocabulary piece; the target is the transcript's pieces, equally weighted
        (cross-entropy against that distribution). Returns (loss, items scored).
        """
        rows = [i for i, w in enumerate(words) if w]
        if not rows or self.word_head is None:
            return vectors[0].new_zeros(()), 0
        logits = self.word_logits([vectors[i] for i in rows])  # (R, V)
        said = torch.zeros_like(logits)
        for r, i in enumerate(rows):
            said[r, torch.tensor(words[i], device=said.device)] = 1.0
        said = said / said.sum(dim=-1, keepdim=True)  # (R, V), each row sums to 1
        return -(said * F.log_softmax(logits, dim=-1)).sum(), len(rows)

    def object_loss(self, vectors: Sequence[torch.Tensor],
                    objects: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, int]:
        """Summed loss of the object head on attachments whose objects the data names.

        An attachment's last K vectors are its slots (:meth:`encode_batch`); slot ``i`` is
        scored against the pieces of object ``i``, or "nothing" past the last
        (:func:`mmchat.objects.object_targets`); with ``object_order = "any"``, against the
        object it is matched to. Returns (loss, slots scored)."""
        rows = [i for i, shown in enumerate(objects) if shown]
        if not rows or self.object_head is None:
            return vectors[0].new_zeros(()), 0
        K = self.config.object_slots
        slots = torch.stack([vectors[i][-K:] for i in rows])  # (R, K, d)
        target = object_targets([objects[i] for i in rows], K, self.config.vocab_size,
                                slots.device)  # (R, K, V + 1)
        return object_loss(self.object_head(slots), target,
                           self.config.object_order), len(rows) * K

    def read(self, h: torch.Tensor, mem: TurnMemory
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What each step reads from the memory: the state the output layer sees (B, T, H),
        the context (B, T, d) and the attention each memory vector received (B, T, N).

        Without ``reread`` the state is ``h`` as given; with it, ``h`` moved by a hidden
        layer over ``h`` and the first read, and the context and attention of a second read.
        """
        ctx, weights = self.fusion(h, mem)  # (B, T, d), (B, T, N)
        if self.reread is None:
            return h, ctx, weights
        h = h + self.reread(torch.cat([h, ctx], dim=-1))  # (B, T, H)
        ctx, weights = self.fusion(h, mem)
        return h, ctx, weights

    def logits(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.combine(torch.cat([h, ctx], dim=-1)))  # (B, T, H)
        return self.lm_head(self.drop(x))  # (B, T, V)

    # -- training ------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, turns: torch.Tensor, prompt_end: torch.Tensor,
                media: Sequence[MediaBatch] = (), targets: torch.Tensor | None = None,
                answers: torch.Tensor | None = None, aux_weight: float = 0.0,
                transcript_weight: float = 0.0, objects_weight: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass over whole dialogues.

        idx (B, T) token ids; turns (B, T) turn index of each position (-1 for padding);
        prompt_end (B, K) position of each turn's ``<bot>`` token (-1 where absent);
        targets (B, T) next-token ids, -1 where no loss is taken; answers (B, K) the
        auxiliary answer class of each turn (-1 where none), weighted by ``aux_weight``;
        media transcripts (``MediaBatch.words``) train the word head, by ``transcript_weight``,
        and the objects they show (``MediaBatch.objects``) the object slots, by
        ``objects_weight``.

        Returns ``(logits, loss)``: without targets, logits (B, T, V) and no loss; with
        targets, only the S positions that take a loss are scored (most of a dialogue
        is prompt), so logits is (S, V), in row-major order of ``targets >= 0``.
        """
        B, T = idx.shape
        bos = idx[0, 0]  # every dialogue starts with <s>
        entries: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(B)]
        entry_turns: list[list[int]] = [[] for _ in range(B)]
        said_loss, n_said = self.null.new_zeros(()), 0
        shown_loss, n_shown = self.null.new_zeros(()), 0
        K = prompt_end.shape[1]
        heard = self.null.new_zeros(B, K, self.config.n_embd)  # (B, K, E) words heard per turn
        n_heard = self.null.new_zeros(B, K)  # (B, K)
        for batch in media:
            vectors = self.encode(batch.modality, batch.x, batch.lengths)
            if batch.words is not None and transcript_weight > 0:
                part, n = self.transcript_loss(vectors, batch.words)
                said_loss, n_said = said_loss + part, n_said + n
            if batch.objects is not None and objects_weight > 0 and \
                    batch.modality in self.config.objects_for:
                part, n = self.object_loss(vectors, batch.objects)
                shown_loss, n_shown = shown_loss + part, n_shown + n
            if self.hears(batch.modality) and vectors:
                at = (batch.item.to(idx.device), batch.turn.to(idx.device))
                heard = heard.index_put(at, self.heard_words(vectors), accumulate=True)
                n_heard = n_heard.index_put(at, torch.ones_like(at[0], dtype=heard.dtype),
                                            accumulate=True)
            for v, b, k in zip(vectors, batch.item.tolist(), batch.turn.tolist()):
                entries[b].append((batch.modality, v))
                entry_turns[b].append(k)
        for b in range(B):  # in the order sent, so each turn sees a prefix of the bank
            order = sorted(range(len(entries[b])), key=entry_turns[b].__getitem__)
            entries[b] = [entries[b][i] for i in order]
            entry_turns[b] = [entry_turns[b][i] for i in order]
        values, kinds, mask, ordinal = self.memory_bank(entries)  # (B, N, d), 3 x (B, N)
        sent = torch.full_like(kinds, -1)  # (B, N) turn that sent each vector; -1 = null
        for b, item in enumerate(entries):
            at = 1
            for (_, v), k in zip(item, entry_turns[b]):
                sent[b, at: at + v.shape[0]] = k
                at += v.shape[0]

        h, _ = self.run_rnn(idx, self.initial_state(B))  # (B, T, H)
        ctx = h.new_zeros(B, T, self.config.d_model)
        # (B, T, H) the state the output layer sees: with reread, h moved by the second read
        out = h.clone() if self.reread is not None else h
        use_aux = answers is not None and aux_weight > 0 and self.answer_head is not None
        aux_loss = h.new_zeros(())
        positions = torch.arange(T, device=idx.device)
        previous = h.new_zeros(B, self.config.d_model)  # (B, d) each dialogue's last query
        for k in range(K):
            rows = (prompt_end[:, k] >= 0).nonzero().squeeze(1)  # dialogues with a turn k
            if rows.numel() == 0:
                continue
            in_turn = turns[rows] == k  # (R, T)
            span = positions[in_turn.any(dim=0)]
            lo, hi = int(span.min()), int(span.max()) + 1  # the window holding turn k
            h_prompt = h[rows, prompt_end[rows, k]]  # (R, H)
            words = in_turn & (positions <= prompt_end[rows, k:k + 1]) & (idx[rows] != bos)
            bag = self.bag_of_words(idx[rows], words.float(), heard[rows, k],
                                    n_heard[rows, k])  # (R, E)
            visible = mask[rows] & (sent[rows] <= k)  # (R, N)
            n = int(visible.sum(dim=1).max())  # the visible vectors are a prefix: keep it
            mem = self.turn_memory(h_prompt, bag, values[rows, :n], kinds[rows, :n],
                                   visible[:, :n], ordinal[rows, :n], previous[rows])
            previous = previous.index_copy(0, rows, mem.query)
            out_k, ctx_k, _ = self.read(h[rows, lo:hi], mem)  # (R, hi-lo, H), (R, hi-lo, d)
            here = in_turn[:, lo:hi].unsqueeze(-1)  # (R, hi-lo, 1)
            ctx[rows, lo:hi] = torch.where(here, ctx_k, ctx[rows, lo:hi])
            if self.reread is not None:
                out[rows, lo:hi] = torch.where(here, out_k, out[rows, lo:hi])
            if use_aux and (answers[rows, k] >= 0).any():
                aux_loss = aux_loss + F.cross_entropy(self.answer_logits(mem),
                                                      answers[rows, k], ignore_index=-1,
                                                      reduction="sum")
        if targets is None:
            return self.logits(out, ctx), None  # (B, T, V)
        scored = targets >= 0  # (B, T) the positions that take a loss
        logits = self.logits(out[scored], ctx[scored])  # (S, V)
        loss = F.cross_entropy(logits, targets[scored])
        if use_aux:
            loss = loss + aux_weight * aux_loss / (answers >= 0).sum().clamp_min(1)
        if n_said:
            loss = loss + transcript_weight * said_loss / n_said
        if n_shown:
            loss = loss + objects_weight * shown_loss / n_shown
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    if getattr(module, "zero_init", False):
        return  # starts at zero by design (EntrySelector)
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
