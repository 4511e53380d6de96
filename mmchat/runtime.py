"""One turn of a conversation on the model: prefill, then token-by-token decoding.

All of this is synchronous PyTorch work. The engine runs it in a worker thread and
calls :meth:`TurnRun.next_token` once per token, so it can stream and cancel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .fusion import TurnMemory
from .generate import Generation, GenerationParams, Token, generate
from .model import DialogueLM
from .state import MemoryEntry, SessionState
from .tokenizer import Tokenizer


def expand_memory(mem: TurnMemory, batch: int) -> TurnMemory:
    """Repeat a batch-1 memory ``batch`` times (for beams)."""
    if mem.values.shape[0] == batch:
        return mem

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(batch, *t.shape[1:])

    return replace(mem, values=grow(mem.values), mask=grow(mem.mask), kinds=grow(mem.kinds),
                   query=grow(mem.query), pooled=grow(mem.pooled),
                   pooled_mask=grow(mem.pooled_mask))


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
    tokens: list[int] = field(default_factory=list)
    mass: torch.Tensor | None = None  # (N,) summed attention over emitted tokens
    started: float = field(default_factory=time.perf_counter)

    def next_token(self) -> Token | None:
        """Decode one more token, or ``None`` when the reply is complete."""
        with torch.inference_mode():
            token = next(self.generation.tokens, None)
        if token is not None:
            self.tokens.append(token.id)
            self.mass = token.weights.clone() if self.mass is None else self.mass + token.weights
        return token

    def attention_by_modality(self) -> dict[str, float]:
        """Mean attention mass each modality received per emitted token."""
        names = {i: m for m, i in self.model.kind_index.items()}
        if self.mass is None or not self.tokens:
            return {}
        per_token = self.mass / len(self.tokens)
        kinds = self.memory.kinds[0]
        out: dict[str, float] = {}
        for k in kinds.unique().tolist():
            if k in names:
                out[names[k]] = round(float(per_token[kinds == k].sum()), 4)
        return out

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
        return SessionState(rnn=state, pending=pending, turns=self.turns_before + 1), reason


def start_turn(model: DialogueLM, tokenizer: Tokenizer, state: SessionState | None,
               memory: list[MemoryEntry], text: str, params: GenerationParams) -> TurnRun:
    """Feed the user's turn and return a run ready to decode the reply."""
    with torch.inference_mode():
        if state is None:
            state = SessionState(rnn=model.initial_state(1), pending=[tokenizer.bos_id])
        prompt = state.pending + tokenizer.user_turn(text)
        idx = torch.tensor([prompt], dtype=torch.long)  # (1, T)
        h, rnn_state = model.run_rnn(idx, state.rnn)  # (1, T, H)
        entries = [[(e.modality, e.vectors) for e in memory if e.modality in model.kind_index]]
        values, kinds, mask = model.memory_bank(entries)  # (1, N, d)
        mem = model.turn_memory(h[:, -1], values, kinds, mask)
        ctx, weights = model.context(h[:, -1:], mem)  # (1, 1, d), (1, 1, N)
        logits = model.logits(h[:, -1:], ctx)[:, -1]  # (1, V)

    def step(tokens: torch.Tensor, rnn: torch.Tensor):
        h, rnn = model.run_rnn(tokens.unsqueeze(1), rnn)  # (B, 1, H)
        m = expand_memory(mem, tokens.shape[0])
        ctx, w = model.context(h, m)
        return model.logits(h, ctx)[:, -1], w[:, -1], rnn

    def stop_check(ids: list[int]) -> bool:
        text_so_far = tokenizer.decode(ids)
        return any(s and s in text_so_far for s in params.stop)

    generation = generate(step, logits, weights[:, -1], rnn_state, params,
                          eos_id=tokenizer.eos_id, stop_check=stop_check if params.stop else None)
    return TurnRun(model, tokenizer, generation, mem, prompt_tokens=len(prompt),
                   turns_before=state.turns, prompt_logits=logits, prompt_state=rnn_state)
