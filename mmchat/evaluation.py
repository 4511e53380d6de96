"""Measure a model on a dataset split: perplexity, BLEU-4, token F1, exact answers.

Every assistant turn is generated greedily after the *reference* history (the earlier
reference answers are fed, not the model's own), so one mistake does not spoil the
turns after it. Ablations rerun the same dialogues with a modality removed.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .calibration import Bin, expected_calibration_error, reliability
from .dataset import Dialogue
from .generate import GenerationParams, needs_fallback
from .modality import Modality
from .model import DialogueLM
from .runtime import Decoder, start_turn
from .state import MemoryEntry, SessionState
from .tokenizer import Tokenizer
from .training.examples import FeatureCache, collate, encode_dialogue, feature_key

#: Categories in report order; others follow alphabetically.
CATEGORY_ORDER = ("colour", "shape", "count", "position", "digit", "spoken", "followup",
                  "greeting", "chitchat")


@dataclass
class TurnResult:
    dialogue: str
    category: str
    reference: str
    hypothesis: str
    answer: str | None
    attention: dict[str, float]
    confidence: float = 0.0  # the lowest probability of a chosen token (mmchat.generate)
    finish_reason: str = "stop"

    @property
    def exact(self) -> bool:
        return normalize(self.hypothesis) == normalize(self.reference)

    @property
    def key_answer(self) -> bool:
        if not self.answer:
            return self.exact
        return f" {normalize(self.answer)} " in f" {normalize(self.hypothesis)} "


@dataclass
class EvalResult:
    turns: list[TurnResult] = field(default_factory=list)
    perplexity: float = float("nan")
    fallback_threshold: float = 0.0  # the engine's, for :meth:`fallback_rate`
    fallback_text: str = ""  # the engine's, for :meth:`sees_fallback`

    def fell_back(self, turn: TurnResult) -> bool:
        """Whether the engine would have sent its fallback text for this turn."""
        return needs_fallback(turn.finish_reason, turn.confidence, self.fallback_threshold)

    def sees_fallback(self, turn: TurnResult) -> bool:
        """Whether the user gets the fallback text: the engine sends it, or the model says
        it itself (the demo corpus teaches it for out-of-domain prompts)."""
        said = bool(self.fallback_text) and normalize(turn.hypothesis) == normalize(
            self.fallback_text)
        return said or self.fell_back(turn)

    def fallback_rate(self, category: str | None = None) -> float:
        turns = self.turns if category is None else self.by_category().get(category, [])
        return sum(map(self.fell_back, turns)) / len(turns) if turns else float("nan")

    def calibration(self, n_bins: int = 10) -> tuple[list[Bin], float]:
        """Reliability bins of exact-answer accuracy against confidence, and the ECE."""
        bins = reliability([t.confidence for t in self.turns], [t.exact for t in self.turns],
                           n_bins)
        return bins, expected_calibration_error(bins)

    def by_category(self) -> dict[str, list[TurnResult]]:
        groups: dict[str, list[TurnResult]] = defaultdict(list)
        for t in self.turns:
            groups[t.category].append(t)
        order = {c: i for i, c in enumerate(CATEGORY_ORDER)}
        return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))

    def accuracy(self, category: str | None = None) -> float:
        turns = self.turns if category is None else self.by_category().get(category, [])
        return sum(t.exact for t in turns) / len(turns) if turns else float("nan")

    def summary(self) -> dict[str, float]:
        hyps = [t.hypothesis for t in self.turns]
        refs = [t.reference for t in self.turns]
        return {"perplexity": self.perplexity, "bleu4": bleu4(hyps, refs),
                "token_f1": mean(token_f1(h, r) for h, r in zip(hyps, refs)),
                "exact": self.accuracy(), "turns": len(self.turns)}

    def attention_by_category(self) -> dict[str, dict[str, float]]:
        out = {}
        for cat, turns in self.by_category().items():
            sums: Counter = Counter()
            for t in turns:
                sums.update(t.attention)
            out[cat] = {m: v / len(turns) for m, v in sorted(sums.items())}
        return out


def normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def token_f1(hypothesis: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1."""
    h, r = normalize(hypothesis).split(), normalize(reference).split()
    if not h or not r:
        return float(h == r)
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, exponential smoothing), 0-100."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return sacrebleu.corpus_bleu([normalize(h) for h in hypotheses],
                                 [[normalize(r) for r in references]]).score


@torch.inference_mode()
def perplexity(model: DialogueLM, tokenizer: Tokenizer, dialogues: Sequence[Dialogue],
               cache: FeatureCache, modalities: Mapping[str, Modality], *,
               drop: frozenset[str] = frozenset(), batch_size: int = 32,
               max_tokens: int = 256) -> float:
    """exp(mean NLL per answer token), teacher-forced."""
    examples = [e for d in dialogues for e in encode_dialogue(d.turns, tokenizer, max_tokens)]
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], cache, modalities, tokenizer.pad_id, drop)
        _, loss = model(batch.idx, batch.turns, batch.prompt_end, batch.media, batch.targets)
        total += loss.item() * batch.n_target_tokens
        count += batch.n_target_tokens
    return math.exp(total / count) if count else float("nan")


@torch.inference_mode()
def generate_turns(model: DialogueLM, tokenizer: Tokenizer, dialogues: Sequence[Dialogue],
                   cache: FeatureCache, modalities: Mapping[str, Modality], *,
                   drop: frozenset[str] = frozenset(), max_new_tokens: int = 48,
                   decoder: Decoder | None = None) -> list[TurnResult]:
    """Greedy reply to every user turn, after the reference history.

    ``decoder`` decodes the reply tokens (default: the model's own modules).
    """
    params = GenerationParams(max_new_tokens=max_new_tokens)
    results = []
    for d in dialogues:
        state: SessionState | None = None
        memory: list[MemoryEntry] = []
        pending_user = None
        for turn in d.turns:
            if turn.role == "user":
                pending_user = turn
                continue
            if turn.role != "assistant" or pending_user is None:
                continue
            new = 0
            for att in pending_user.attachments:
                if att.modality in drop or att.modality not in model.kind_index:
                    continue
                features = cache.get(feature_key(att.read()))
                x, lengths = modalities[att.modality].collate([features])
                memory.append(MemoryEntry(att.modality,
                                          model.encode(att.modality, x, lengths)[0]))
                new += 1
            run = start_turn(model, tokenizer, state, memory, pending_user.text, params,
                             decoder=decoder, new=new)
            while run.next_token() is not None:
                pass
            outcome = run.generation.outcome
            results.append(TurnResult(d.id, turn.category or d.category or "", turn.text,
                                      tokenizer.decode(run.tokens), turn.answer,
                                      run.attention_by_modality(), run.generation.confidence,
                                      outcome.finish_reason if outcome else "cancelled"))
            reference = tokenizer.encode(turn.text)
            rnn = run.prompt_state
            if reference:
                _, rnn = model.run_rnn(torch.tensor([reference]), rnn)
            state = SessionState(rnn=rnn, pending=[tokenizer.eos_id], turns=run.turns_before + 1,
                                 query=run.memory.query)
            pending_user = None
    return results


def evaluate(model: DialogueLM, tokenizer: Tokenizer, dialogues: Sequence[Dialogue],
             cache: FeatureCache, modalities: Mapping[str, Modality], *,
             drop: frozenset[str] = frozenset(), with_perplexity: bool = True,
             fallback_threshold: float = 0.0, fallback_text: str = "") -> EvalResult:
    model.eval()
    result = EvalResult(generate_turns(model, tokenizer, dialogues, cache, modalities,
                                       drop=drop), fallback_threshold=fallback_threshold,
                        fallback_text=fallback_text)
    if with_perplexity:
        result.perplexity = perplexity(model, tokenizer, dialogues, cache, modalities,
                                       drop=drop)
    return result
