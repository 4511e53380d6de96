"""How far a model's reply confidence can be trusted, and what the fallback costs.

A reply's confidence is the lowest probability the model gave a token of it
(:attr:`mmchat.generate.Generation.confidence`). Calibration compares it with how often
replies are right: replies are put in equal-width confidence bins, and the expected
calibration error (ECE) is the turn-weighted mean gap between each bin's accuracy and
its mean confidence (Guo et al., 2017). The fallback rate per category says how often the
engine would send ``fallback_text`` instead, at a given threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .generate import needs_fallback


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    turns: int
    confidence: float  # mean confidence of its turns (nan when empty)
    accuracy: float  # share of its turns answered exactly (nan when empty)


def reliability(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
                ) -> list[Bin]:
    """Equal-width bins over [0, 1]; a confidence of exactly 1 goes in the last."""
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(confidences):
        members[min(int(c * n_bins), n_bins - 1)].append(i)
    bins = []
    for b, idx in enumerate(members):
        n = len(idx)
        conf = sum(confidences[i] for i in idx) / n if n else float("nan")
        acc = sum(bool(correct[i]) for i in idx) / n if n else float("nan")
        bins.append(Bin(b / n_bins, (b + 1) / n_bins, n, conf, acc))
    return bins


def expected_calibration_error(bins: Sequence[Bin]) -> float:
    """sum over bins of turns/total * |accuracy - confidence| (nan with no turns)."""
    total = sum(b.turns for b in bins)
    if not total:
        return float("nan")
    return sum(b.turns / total * abs(b.accuracy - b.confidence) for b in bins if b.turns)


@dataclass(frozen=True)
class Coverage:
    """What a threshold does: the share of replies it replaces, and how good the rest are."""

    threshold: float
    fallback_rate: float
    kept_accuracy: float  # exact-answer accuracy of the replies it keeps (nan if none)


def sweep(confidences: Sequence[float], correct: Sequence[bool], reasons: Sequence[str],
          thresholds: Sequence[float]) -> list[Coverage]:
    """:class:`Coverage` of each threshold over the same replies."""
    out = []
    for t in thresholds:
        falls = [needs_fallback(r, c, t) for r, c in zip(reasons, confidences)]
        kept = [ok for ok, f in zip(correct, falls) if not f]
        n = len(falls)
        out.append(Coverage(t, sum(falls) / n if n else float("nan"),
                            sum(kept) / len(kept) if kept else float("nan")))
    return out
