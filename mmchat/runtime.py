"""One turn of a conversation on the model: prefill, then token-by-token decoding.

All of this is synchronous PyTorch work. The prompt's RNN pass and each reply token go
through a *decoder*: :class:`ReferenceDecoder` (the model's own modules) or the fused
:class:`~mmchat.fastpath.FastDecoder`; the memory and the turn query always go through
the model's modules. A decoder steps any batch of rows, so the
engine's scheduler (:mod:`mmchat.batching`) can decode many turns together; a turn
can also be driven on its own with :meth:`TurnRun.next_token`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from .fusion import TurnMemory
from .generate import Generation, GenerationParams, GreedyRun, Token, generate
from .model import DialogueLM
from .state import MemoryEntry, SessionState
from .tokenizer import Tokenizer


class Decoder(Protocol):
    """Feeds one token per row and returns the next logits.

    ``prefill`` runs right-padded prompts through the RNN; ``prepare`` turns a turn's
    memory (batch 1) into whatever ``step`` reads; ``stack`` puts several prepared
    memories side by side (rows padded to the longest memory, padding hidden);
    ``expand`` repeats one for beams.
    """

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
                ) -> torch.Tensor: ...

    def prepare(self, mem: TurnMemory, weights: torch.Tensor) -> Any: ...

    def stack(self, mems: Sequence[Any]) -> Any: ...

    def expand(self, mem: Any, batch: int) -> Any: ...

    def step(self, tokens: torch.Tensor, state: torch.Tensor, mem: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ReferenceDecoder:
    """The model's own modules, a token at a time: the definition fast paths must match.

    ``step(tokens (B,), state (S, L, B, H), mem)`` -> logits (B, V), weights (B, N), state.
    """

    def __init__(self, model: DialogueLM) -> None:
        self.model = model

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, state: torch.Tensor
                ) -> torch.Tensor:
        """The state (S, L, B, H) after each right-padded prompt (B, T) of ``lengths``."""
        padded = lengths if bool((lengths != lengths[0]).any()) else None
        return self.model.run_rnn(tokens, state, padded)[1]

    def prepare(self, mem: TurnMemory, weights: torch.Tensor) -> TurnMemory:
        return mem

    def stack(self, mems: Sequence[TurnMemory]) -> TurnMemory:
        return stack_memories(mems)

    def expand(self, mem: TurnMemory, batch: int) -> TurnMemory:
        return expand_memory(mem, batch)

    def step(self, tokens: torch.Tensor, state: torch.Tensor, mem: TurnMemory
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        h, state = model.run_rnn(tokens.unsqueeze(1), state)  # (B, 1, H)
        out, ctx, w = model.read(h, mem)  # (B, 1, H), (B, 1, d), (B, 1, N)
        return model.logits(out, ctx)[:, -1], w[:, -1], state


def expand_memory(mem: TurnMemory, batch: int) -> TurnMemory:
    """Repeat a batch-1 memory ``batch`` times (for beams)."""
    if mem.values.shape[0] == batch:
        return mem

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(batch, *t.shape[1:])

    return replace(mem, values=grow(mem.values), mask=grow(mem.mask), kinds=grow(mem.kinds),
                   query=grow(mem.query), pooled=grow(mem.pooled),
                   pooled_mask=grow(mem.pooled_mask))


def pad_rows(rows: Sequence[torch.Tensor], fill: float | bool = 0) -> torch.Tensor:
    """Stack (1, n_i, ...) tensors into (B, max n_i, ...), padding dim 1 with ``fill``."""
    n = max(r.shape[1] for r in rows)
    if all(r.shape[1] == n for r in rows):
        return torch.cat(rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[2:]), fill)
    for b, r in enumerate(rows):
        out[b, : r.shape[1]] = r[0]
    return out


def stack_memories(mems: Sequence[TurnMemory]) -> TurnMemory:
    """Batch-1 memories side by side: (B, N, d) with N the longest, padding masked out."""
    if len(mems) == 1:
        return mems[0]

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if ts[0] is None else torch.cat(ts)

    return TurnMemory(values=pad_rows([m.values for m in mems]),
                      mask=pad_rows([m.mask for m in mems], False),
                      kinds=pad_rows([m.kinds for m in mems]),
                      query=torch.cat([m.query for m in mems]),
                      pooled=cat([m.pooled for m in mems]),
                      pooled_mask=cat([m.pooled_mask for m in mems]))


@dataclass
class TurnRun:
    """A reply being generated. Not thread-safe: drive it from one thread."""

    model: DialogueLM
    tokenizer: Tokenizer
    generation: Generation
    memory: TurnMemory
    prompt_tokens: int
    turns_before: int
    prompt_logits: torch.Tensor  # (1, V) the logits the first reply token is chosen from
    prompt_state: torch.Tensor  # RNN state after the prompt
    decoder: Decoder | None = None
    step_memory: Any = None  # the memory as decoder.prepare left it (batch 1)
    tokens: list[int] = field(default_factory=list)
    mass: torch.Tensor | None = None  # (N,) summed attention over emitted tokens
    started: float = field(default_factory=time.perf_counter)

    @property
    def memory_size(self) -> int:
        """N, the number of memory vectors (the width of each token's weights)."""
        return self.memory.values.shape[1]

    def next_token(self) -> Token | None:
        """Decode one more token, or ``None`` when the reply is complete."""
        with torch.inference_mode():
            token = next(self.generation.tokens, None)
        if token is not None:
            self.record(token)
        return token

    def record(self, token: Token) -> None:
        """Note an emitted token (for callers that drive :attr:`generation` themselves)."""
        self.tokens.append(token.id)
        self.mass = token.weights.clone() if self.mass is None else self.mass + token.weights

    def attention_by_modality(self) -> dict[str, float]:
        """Mean attention mass each modality received per emitted token."""
        if self.mass is None or not self.tokens:
            return {}
        names = {i: m for m, i in self.model.kind_index.items()}
        # plain floats: a few dozen slots cost less in Python than in tensor calls
        totals: dict[int, float] = {}
        for mass, kind, visible in zip(self.mass.tolist(), self.memory.kinds[0].tolist(),
                                       self.memory.mask[0].tolist()):
            if visible and kind:  # hidden slots (absent summaries) and the null get nothing
                totals[kind] = totals.get(kind, 0.0) + mass
        n = len(self.tokens)
        return {names[k]: round(totals[k] / n, 4) for k in sorted(totals)}

    def finish(self, cancelled: bool = False) -> tuple[SessionState, str]:
        """The state to save and the finish reason. Call once decoding stopped."""
        outcome = self.generation.outcome
        reason = "cancelled" if cancelled or outcome is None else outcome.finish_reason
        state = outcome.state if outcome is not None else None
        pending: list[int] = []
        if outcome is not None and outcome.last_token is not None:
            pending.append(outcome.last_token)
        if not pending or pending[-1] != self.tokenizer.eos_id:
            pending.append(self.tokenizer.eos_id)
        return SessionState(rnn=state, pending=pending, turns=self.turns_before + 1,
                            query=self.memory.query.detach().clone()), reason


@dataclass
class TurnRequest:
    """One user turn to prefill (see :func:`start_turns`)."""

    state: SessionState | None  # None for a new session
    memory: list[MemoryEntry]
    text: str
    params: GenerationParams
    new: int = 0  # the last ``new`` memory entries came with this turn


def start_turn(model: DialogueLM, tokenizer: Tokenizer, state: SessionState | None,
               memory: list[MemoryEntry], text: str, params: GenerationParams,
               decoder: Decoder | None = None, new: int = 0) -> TurnRun:
    """Feed the user's turn and return a run ready to decode the reply.

    The prompt's RNN pass and every reply token go through ``decoder`` (default:
    :class:`ReferenceDecoder`, the model's own modules). The last ``new`` entries of
    ``memory`` came with this turn: what they say (a spoken question) joins its words.
    """
    return start_turns(model, tokenizer, [TurnRequest(state, memory, text, params, new)],
                       decoder)[0]


def start_turns(model: DialogueLM, tokenizer: Tokenizer, requests: Sequence[TurnRequest],
                decoder: Decoder | None = None) -> list[TurnRun]:
    """:func:`start_turn` for several turns at once: one run per request, in order.

    The prompts go through the RNN as one right-padded batch (``decoder.prefill``: each
    row's state is read at its own last token), and the memories, turn memories and
    first logits as one batch padded to the longest memory (padding is masked out), so
    every run is the one :func:`start_turn` would give (to float rounding).
    """
    decoder = decoder if decoder is not None else ReferenceDecoder(model)
    with torch.inference_mode():
        states = [r.state if r.state is not None else
                  SessionState(rnn=model.initial_state(1), pending=[tokenizer.bos_id])
                  for r in requests]
        users = [tokenizer.user_turn(r.text) for r in requests]
        prompts = [s.pending + u for s, u in zip(states, users)]
        lengths = [len(p) for p in prompts]
        idx = _right_padded(prompts)  # (B, T)
        rnn = torch.cat([s.rnn for s in states], dim=2)  # (S, L, B, H)
        rnn = decoder.prefill(idx, torch.tensor(lengths), rnn)  # after each prompt
        h_last = rnn[0, -1].unsqueeze(1)  # (B, 1, H): the top layer at each last token
        entries = [[(e.modality, e.vectors) for e in r.memory if e.modality in model.kind_index]
                   for r in requests]
        values, kinds, mask, ordinal = model.memory_bank(entries)  # (B, N, d), 3 x (B, N)
        words = _right_padded(users)  # (B, U)
        select = _right_padded([[1.0] * len(u) for u in users], torch.float32)
        bag = model.bag_of_words(words, select, *_heard(model, requests))  # (B, E)
        mem = model.turn_memory(h_last[:, -1], bag, values, kinds, mask, ordinal,
                                _previous_queries(model, states))
        out, ctx, weights = model.read(h_last, mem)  # (B, 1, H), (B, 1, d), (B, 1, N')
        logits = model.logits(out, ctx)[:, -1]  # (B, V)
        runs = []
        for b, (r, s, n) in enumerate(zip(requests, states, lengths)):
            # row b's own slots: its null and entries, then the summary slots after the
            # padding, so the run is laid out as start_turn lays out a batch of one
            own = 1 + sum(v.shape[0] for _, v in entries[b])
            keep: slice | torch.Tensor = slice(None)  # no padding in this row: all of it
            if own < values.shape[1]:
                keep = torch.cat([torch.arange(own),
                                  torch.arange(values.shape[1], mem.mask.shape[1])])
            runs.append(_turn_run(model, tokenizer, decoder, r, s, n, _row(mem, b, keep),
                                  logits[b: b + 1], weights[b: b + 1, -1, keep],
                                  rnn[:, :, b: b + 1].clone()))
        return runs


def _right_padded(rows: Sequence[Sequence[Any]], dtype: torch.dtype = torch.long
                  ) -> torch.Tensor:
    """(B, longest row) from lists of numbers, zero-padded on the right, in one call."""
    n = max(len(r) for r in rows)
    return torch.tensor([[*r, *([0] * (n - len(r)))] for r in rows], dtype=dtype)


def _previous_queries(model: DialogueLM, states: Sequence[SessionState]) -> torch.Tensor:
    """Each session's last turn query (B, d); zeros for a first turn or an old state."""
    d = model.config.d_model
    zero = model.null.new_zeros(1, d)
    return torch.cat([s.query if s.query is not None and s.query.shape == (1, d) else zero
                      for s in states])


def _heard(model: DialogueLM, requests: Sequence[TurnRequest]
           ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Summed heard words (B, E) and their count (B,) of each turn's new attachments."""
    spoken = [(b, e.vectors) for b, r in enumerate(requests) if r.new > 0
              for e in r.memory[-r.new:] if model.hears(e.modality)]
    if not spoken:
        return None, None
    rows = torch.tensor([b for b, _ in spoken])
    heard = model.tok_emb.weight.new_zeros(len(requests), model.config.n_embd)
    n_heard = heard.new_zeros(len(requests))
    heard.index_add_(0, rows, model.heard_words([v for _, v in spoken]))
    n_heard.index_add_(0, rows, torch.ones(len(spoken)))
    return heard, n_heard


def _row(mem: TurnMemory, b: int, keep: slice | torch.Tensor) -> TurnMemory:
    """Row ``b`` of a batched turn memory, slots ``keep`` only, as a batch of one."""
    def one(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[b: b + 1]

    return TurnMemory(mem.values[b: b + 1, keep], mem.mask[b: b + 1, keep],
                      mem.kinds[b: b + 1, keep], mem.query[b: b + 1], one(mem.pooled),
                      one(mem.pooled_mask))


def _turn_run(model: DialogueLM, tokenizer: Tokenizer, decoder: Decoder, request: TurnRequest,
              state: SessionState, prompt_tokens: int, mem: TurnMemory, logits: torch.Tensor,
              weights: torch.Tensor, rnn_state: torch.Tensor) -> TurnRun:
    """A run from one prompt's turn memory, first logits (1, V), attention (1, N) and RNN
    state (S, L, 1, H)."""
    params = request.params
    step_memory = decoder.prepare(mem, weights)

    def step(tokens: torch.Tensor, rnn: torch.Tensor):
        return decoder.step(tokens, rnn, decoder.expand(step_memory, tokens.shape[0]))

    def stop_check(ids: list[int]) -> bool:
        text_so_far = tokenizer.decode(ids)
        return any(s and s in text_so_far for s in params.stop)

    many = getattr(decoder, "greedy", None)  # several greedy tokens per call (FastDecoder)

    def greedy(logits: torch.Tensor, attention: torch.Tensor, rnn: torch.Tensor, n: int,
               eos: int, feed_last: bool) -> GreedyRun:
        return many(logits, attention, rnn, step_memory, n, eos, feed_last)

    generation = generate(step, logits, weights, rnn_state, params,
                          eos_id=tokenizer.eos_id, stop_check=stop_check if params.stop else None,
                          greedy=greedy if many is not None else None)
    return TurnRun(model, tokenizer, generation, mem, prompt_tokens=prompt_tokens,
                   turns_before=state.turns, prompt_logits=logits, prompt_state=rnn_state,
                   decoder=decoder, step_memory=step_memory)
