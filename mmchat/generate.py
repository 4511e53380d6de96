"""Decoding strategies over a step function: greedy, sampling and beam search.

Everything here is model-agnostic. A *step* feeds one token per row and returns the
next logits::

    step(tokens (B,), state) -> (logits (B, V), weights (B, N), state)

:func:`generate` yields :class:`Token` objects one at a time, so the caller can stream
and cancel between any two steps. When iteration ends, :attr:`Generation.outcome`
holds the finish reason and the state to continue the conversation from, and
:attr:`Generation.probs` the probability the model gave each token it chose (the end of
the reply included), the ground for the reply's confidence.

Every strategy stops a reply that loops: once any ``loop_ngram``-gram of its tokens
occurs for the third time, decoding ends with finish reason ``"loop"`` (beam search
ends such a hypothesis there), so no reply runs to ``max_new_tokens`` repeating itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from .config import GenerationConfig

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class GreedyRun(NamedTuple):
    """Several greedy tokens of one reply from one call (see :data:`Greedy`)."""

    tokens: list[int]  # k tokens, each the argmax of the logits it was chosen from
    probs: torch.Tensor  # (k,) each token's softmax probability
    chosen_with: torch.Tensor  # (k, N) the attention that came with those logits
    states: torch.Tensor  # (k, S, L, 1, H) the state before feeding each token
    logits: torch.Tensor  # (1, V) after feeding the last token (if it was fed)
    attention: torch.Tensor  # (1, N) likewise
    state: torch.Tensor  # likewise


#: ``greedy(logits (1, V), attention (1, N), state, n, eos_id, feed_last) -> GreedyRun``:
#: up to ``n`` greedy tokens from ``logits``, each fed through the step to give the next
#: logits, stopping after ``eos_id``; the ``n``-th token is fed only when ``feed_last``.
Greedy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, bool], GreedyRun]

#: Most tokens a :data:`Greedy` call decodes: the call saves per-token overhead, but a
#: reply that stops on a stop string or a loop wastes the rest of its chunk.
GREEDY_CHUNK = 8


@dataclass(frozen=True)
class GenerationParams:
    strategy: str = "greedy"  # "greedy", "sample" or "beam"
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    beam_width: int = 4
    no_repeat_ngram: int = 0  # 0 = allow repeats
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop strings, checked on the decoded text
    seed: int = -1  # -1 = unseeded
    loop_ngram: int = 4  # stop when an n-gram of the reply occurs a third time; 0 = never

    @classmethod
    def from_config(cls, config: GenerationConfig, **overrides) -> "GenerationParams":
        base = cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})
        return base.with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GenerationParams":
        """Validated copy; unknown names or bad values raise ValueError naming them."""
        from . import config as config_module

        known = set(self.__dataclass_fields__)
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        if not overrides:
            return self
        merged = {f: getattr(self, f) for f in known} | overrides
        merged["stop"] = list(merged["stop"])
        checked = config_module.from_dict({"generation": merged}, env={}).generation
        return replace(self, **{f: getattr(checked, f) for f in known})


@dataclass
class Token:
    id: int
    weights: torch.Tensor  # (N,) attention mass per memory vector when it was chosen


#: How many times one ``loop_ngram``-gram may occur before the reply counts as a loop.
LOOP_REPEATS = 3


@dataclass
class Outcome:
    finish_reason: str  # "stop", "length", "loop" or "cancelled"
    state: torch.Tensor  # RNN state after feeding every emitted token but the last
    last_token: int | None  # the last emitted token, not yet fed


@dataclass
class Generation:
    """Iterate for tokens; afterwards :attr:`outcome` says how it ended.

    For greedy and sampled decoding :attr:`sampler` lets a caller that batches many
    generations (:mod:`mmchat.batching`) push each step's logits instead of iterating.
    Use one or the other, never both.
    """

    tokens: Iterator[Token]
    outcome: Outcome | None = field(default=None)
    sampler: Sampler | None = None
    #: the model's probability (temperature 1, before any filter) of each chosen token
    probs: list[float] = field(default_factory=list)

    @property
    def confidence(self) -> float:
        """The lowest of :attr:`probs`: how sure the model was of its least sure token
        (0.0 before any token was chosen)."""
        return min(self.probs, default=0.0)

    def __iter__(self) -> Iterator[Token]:
        return self.tokens


def generate(step: Step, logits: torch.Tensor, weights: torch.Tensor, state: torch.Tensor,
             params: GenerationParams, *, eos_id: int,
             stop_check: Callable[[list[int]], bool] | None = None,
             greedy: Greedy | None = None) -> Generation:
    """Start decoding from ``logits`` (1, V) of the prompt's last token.

    ``greedy``, when given, decodes plain greedy replies (no ``no_repeat_ngram``)
    several tokens per call; the tokens, probabilities and outcome are the ones the
    step would give a token at a time.
    """
    gen = Generation(iter(()))
    if params.strategy == "beam":
        gen.tokens = _beam(gen, step, logits, weights, state, params, eos_id)
    else:
        gen.sampler = Sampler(gen, logits, weights, state, params, eos_id, stop_check)
        if greedy is not None and gen.sampler.batchable:
            gen.tokens = _greedy_chunks(gen.sampler, greedy)
        else:
            gen.tokens = _sample(gen.sampler, step)
    return gen


class Sampler:
    """Greedy or sampled decoding, pushed one step at a time.

    :meth:`choose` picks a token from the current logits. Unless it returned ``None``
    or :attr:`done` is set, feed :attr:`last` through the model and hand the result to
    :meth:`feed` before choosing again. The owning :class:`Generation`'s outcome is
    kept up to date after every call, so decoding can stop between any two steps.
    """

    def __init__(self, gen: Generation, logits: torch.Tensor, weights: torch.Tensor,
                 state: torch.Tensor, params: GenerationParams, eos_id: int,
                 stop_check: Callable[[list[int]], bool] | None = None) -> None:
        self.gen = gen
        self.params = params
        self.eos_id = eos_id
        self.stop_check = stop_check
        self.rng = make_rng(params, logits.device)
        self.out: list[int] = []
        self.done = False
        self.logits, self.weights, self.state = logits, weights, state  # (1, V), (1, N), rnn
        gen.outcome = Outcome("cancelled", state, None)

    @property
    def last(self) -> int:
        """The token chosen last, which the next step feeds."""
        return self.out[-1]

    @property
    def batchable(self) -> bool:
        """Whether the token is the plain argmax of the logits, so that a caller holding
        many rows may pick for all of them at once and pass it to :meth:`choose`."""
        return self.params.strategy == "greedy" and self.params.no_repeat_ngram <= 0

    def choose(self, token: int | None = None, prob: float | None = None) -> Token | None:
        """The next token, or ``None`` when end-of-sequence was chosen.

        ``token``, only when :attr:`batchable`, is the argmax the caller already took,
        and ``prob`` its :func:`token_prob`, if the caller computed that too.
        """
        assert not self.done, "choose() after decoding finished"
        if token is None:
            token = pick_token(self.logits[0], self.out, self.params, self.rng)
        if prob is None:
            prob = token_prob(self.logits[0], token)
        return self.take(token, prob, self.weights[0], self.state)

    def take(self, token: int, prob: float, weights: torch.Tensor, state: torch.Tensor
             ) -> Token | None:
        """Record ``token``, chosen elsewhere with probability ``prob`` from logits that
        came with attention ``weights`` (N,) in RNN ``state``; what :meth:`choose`
        returns for it."""
        assert not self.done, "take() after decoding finished"
        self.out.append(token)
        self.gen.probs.append(prob)
        self.gen.outcome = Outcome("cancelled", state, token)
        if token == self.eos_id:
            self.done = True
            self.gen.outcome = Outcome("stop", state, token)
            return None
        if self.stop_check is not None and self.stop_check(self.out):
            self.done = True
            self.gen.outcome = Outcome("stop", state, token)
        elif loops(self.out, self.params.loop_ngram):
            self.done = True
            self.gen.outcome = Outcome("loop", state, token)
        elif len(self.out) >= self.params.max_new_tokens:
            self.done = True
            self.gen.outcome = Outcome("length", state, token)
        return Token(token, weights)

    def feed(self, logits: torch.Tensor, weights: torch.Tensor, state: torch.Tensor) -> None:
        """The step's output after feeding :attr:`last`: logits (1, V), weights (1, N)."""
        self.logits, self.weights, self.state = logits, weights, state
        self.gen.outcome = Outcome("cancelled", state, None)


def _sample(sampler: Sampler, step: Step) -> Iterator[Token]:
    while (token := sampler.choose()) is not None:
        yield token
        if sampler.done:
            return
        tokens = torch.full((1,), token.id, dtype=torch.long, device=sampler.logits.device)
        sampler.feed(*step(tokens, sampler.state))


def _greedy_chunks(sampler: Sampler, greedy: Greedy) -> Iterator[Token]:
    """:func:`_sample` for plain greedy replies, up to :data:`GREEDY_CHUNK` tokens per
    ``greedy`` call; the sampler sees each token as :meth:`Sampler.choose` would."""
    while True:
        left = sampler.params.max_new_tokens - len(sampler.out)
        n = min(GREEDY_CHUNK, left)
        run = greedy(sampler.logits, sampler.weights, sampler.state, n, sampler.eos_id,
                     n < left)
        for token, prob, weights, state in zip(run.tokens, run.probs.tolist(),
                                               run.chosen_with, run.states):
            chosen = sampler.take(token, prob, weights, state)
            if chosen is None:
                return
            yield chosen
            if sampler.done:
                return
        sampler.feed(run.logits, run.attention, run.state)


def make_rng(params: GenerationParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for ``strategy = "sample"`` with ``seed >= 0``, else ``None``."""
    if params.strategy == "sample" and params.seed >= 0:
        return torch.Generator(device=device).manual_seed(params.seed)
    return None


def pick_token(logits: torch.Tensor, generated: list[int], params: GenerationParams,
               rng: torch.Generator | None) -> int:
    """Choose the next token from one row of logits (V,): argmax, or a filtered sample."""
    scores = block_repeats(logits.float(), generated, params.no_repeat_ngram)
    if params.strategy == "greedy":
        return int(scores.argmax())
    return int(torch.multinomial(filter_logits(scores, params).softmax(-1), 1, generator=rng))


def filter_logits(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of logits (V,)."""
    logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the first over p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def needs_fallback(finish_reason: str, confidence: float, threshold: float) -> bool:
    """Whether a finished reply should be replaced by the fallback text: it looped, or
    it ended (``"stop"`` or ``"length"``) with a confidence below ``threshold``."""
    if finish_reason == "loop":
        return True
    return finish_reason in ("stop", "length") and confidence < threshold


def token_prob(logits: torch.Tensor, token: int) -> float:
    """softmax(logits)[token] for one row of logits (V,), without the full softmax."""
    logits = logits.float()
    return float((logits[token] - torch.logsumexp(logits, dim=-1)).exp())


def token_probs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """:func:`token_prob` of every row of ``logits`` (B, V) and its token, in three
    tensor calls for the batch (the same values, row by row)."""
    logits = logits.float()
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1))  # (B, 1)
    return (chosen.squeeze(1) - torch.logsumexp(logits, dim=-1)).exp().tolist()


def loops(tokens: list[int], n: int, repeats: int = LOOP_REPEATS) -> bool:
    """Whether the last ``n`` tokens occur ``repeats`` times in ``tokens`` (the check
    runs after every token, so this is the first n-gram to reach that count)."""
    if n <= 0 or len(tokens) < n + repeats - 1:
        return False
    tail = tokens[-n:]
    seen = sum(tokens[i: i + n] == tail for i in range(len(tokens) - n + 1))
    return seen >= repeats


def block_repeats(logits: torch.Tensor, generated: list[int], n: int) -> torch.Tensor:
    """Forbid any token that would repeat an n-gram already in ``generated``."""
    if n <= 0 or len(generated) < n - 1:
        return logits
    prefix = tuple(generated[len(generated) - n + 1:]) if n > 1 else ()
    banned = [generated[i + n - 1] for i in range(len(generated) - n + 1)
              if tuple(generated[i: i + n - 1]) == prefix]
    if not banned:
        return logits
    logits = logits.clone()
    logits[banned] = float("-inf")
    return logits


def _beam(gen: Generation, step: Step, logits: torch.Tensor, weights: torch.Tensor,
          state: torch.Tensor, params: GenerationParams, eos_id: int) -> Iterator[Token]:
    """Length-normalised beam search; streams the best hypothesis once it is chosen.

    Each live beam is ``(score, tokens, attention, log-probs)`` and row ``b`` of
    ``states`` is its RNN state after feeding all of its tokens. A hypothesis that
    loops (:func:`loops`) ends there, like one that chose the end of the reply.
    """
    width = params.beam_width
    beams: list[tuple[float, list[int], list[torch.Tensor], list[float]]] = [(0.0, [], [], [])]
    states = state  # (S, L, B, H), B = len(beams)
    finished: list[tuple[float, list[int], list[torch.Tensor], torch.Tensor, list[float]]] = []
    gen.outcome = Outcome("cancelled", state, None)
    while True:
        logprobs = logits.float().log_softmax(-1)  # (B, V)
        candidates = []
        for b, (score, toks, _, _) in enumerate(beams):
            row = block_repeats(logprobs[b], toks, params.no_repeat_ngram)
            top = torch.topk(row, min(width, row.numel()))
            candidates += [(score + lp, b, t, lp) for lp, t in
                           zip(top.values.tolist(), top.indices.tolist()) if lp > float("-inf")]
        candidates.sort(key=lambda c: -c[0])
        survivors = []  # (score, tokens, attention, parent row, log-probs)
        for score, b, t, lp in candidates:
            toks, attn = beams[b][1] + [t], beams[b][2] + [weights[b]]
            lps = beams[b][3] + [lp]
            if t == eos_id or loops(toks, params.loop_ngram):
                finished.append((score / len(toks), toks, attn, states[:, :, b: b + 1], lps))
            else:
                survivors.append((score, toks, attn, b, lps))
            if len(survivors) == width:
                break
        best_done = max((f[0] for f in finished), default=float("-inf"))
        if (not survivors or len(finished) >= width
                or best_done >= max(s[0] / len(s[1]) for s in survivors)
                or len(survivors[0][1]) >= params.max_new_tokens):
            break
        beams = [(s[0], s[1], s[2], s[4]) for s in survivors]
        parents = torch.tensor([s[3] for s in survivors], device=logits.device)
        tokens = torch.tensor([s[1][-1] for s in survivors], device=logits.device)
        logits, weights, states = step(tokens, states[:, :, parents])
    if finished:
        _, toks, attn, final_state, lps = max(finished, key=lambda f: f[0])
        reason = "stop" if toks[-1] == eos_id else "loop"
        gen.outcome = Outcome(reason, final_state, toks[-1])
    elif survivors:
        _, toks, attn, b, lps = max(survivors, key=lambda s: s[0] / len(s[1]))
        gen.outcome = Outcome("length", states[:, :, b: b + 1], toks[-1])
    else:
        return
    gen.probs = [math.exp(lp) for lp in lps]
    for t, w in zip(toks, attn):
        if t != eos_id:
            yield Token(t, w)
