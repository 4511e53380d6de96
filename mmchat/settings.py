"""Per-reply generation settings, typed for the checker.

``engine.reply(..., temperature=0.7)`` takes these keywords (``**generation``); each
overrides the ``[generation]`` setting of the same name for that reply. A misspelled
keyword fails in the type checker, and at run time with
:class:`~mmchat.errors.InputError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict


class GenerationSettings(TypedDict, total=False):
    """The keywords ``Engine.reply`` and ``Engine.stream`` (and their sync twins) take;
    docs/configuration.md describes each under ``[generation]``."""

    strategy: Literal["greedy", "sample", "beam"]
    temperature: float
    top_k: int
    top_p: float
    beam_width: int
    no_repeat_ngram: int
    max_new_tokens: int
    stop: Sequence[str]
    seed: int
