"""Dialogues to model inputs: token sequences, turn indices and decoded media.

A dialogue becomes the sequence the model reads at inference time::

    <s> <user> q1 <bot> a1 </s> <user> q2 <bot> a2 </s>

Loss is taken on each assistant answer and its ``</s>`` only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..modality import Modality
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One dialogue, tokenised. ``media`` lists (modality, feature key, turn);
    ``words`` holds each media item's transcript token ids (empty without one) and
    ``objects`` the token ids of each of its objects' phrases (none without them)."""

    tokens: list[int]
    turns: list[int]  # turn index of each position
    prompt_end: list[int]  # position of each turn's <bot> token
    targets: list[int]  # next-token targets, -1 where no loss is taken
    media: list[tuple[str, str, int]] = field(default_factory=list)
    category: str = ""
    answers: list[int] = field(default_factory=list)  # auxiliary answer class per turn, or -1
    words: list[list[int]] = field(default_factory=list)  # transcript ids per media item
    objects: list[list[list[int]]] = field(default_factory=list)  # object phrases per item


def encode_dialogue(turns: Sequence, tokenizer: Tokenizer, max_tokens: int = 256,
                    category: str = "", answer_ids: Mapping[str, int] | None = None
                    ) -> list[Example]:
    """Tokenise user/assistant pairs; attachments become feature keys (content hashes).

    ``turns`` are :class:`mmchat.dataset.Turn` objects. A dialogue longer than
    ``max_tokens`` is cut between pairs into several examples; a later piece starts
    afresh, so it keeps only the attachments sent within it. A single pair longer than
    ``max_tokens`` is dropped. ``answer_ids`` maps an assistant turn's ``answer`` label
    to its auxiliary class.
    """
    examples: list[Example] = []
    current: Example | None = None
    for user, assistant in _pairs(turns):
        prompt = tokenizer.user_turn(user.text)
        answer = tokenizer.encode(assistant.text) + [tokenizer.eos_id]
        if 1 + len(prompt) + len(answer) > max_tokens:
            continue
        if current is None or len(current.tokens) + len(prompt) + len(answer) > max_tokens:
            current = Example([tokenizer.bos_id], [0], [], [], [], category)
            examples.append(current)
        k = len(current.prompt_end)
        current.answers.append((answer_ids or {}).get(assistant.answer or "", -1))
        current.tokens += prompt
        current.turns += [k] * len(prompt)
        current.prompt_end.append(len(current.tokens) - 1)
        current.targets += [-1] * len(prompt)
        current.targets[-1] = answer[0]  # <bot> predicts the first answer token
        current.tokens += answer
        current.turns += [k] * len(answer)
        current.targets += answer[1:] + [-1]
        for att in user.attachments:
            current.media.append((att.modality, feature_key(att.read()), k))
            current.words.append(tokenizer.encode(att.text) if att.text else [])
            current.objects.append([tokenizer.encode(o) for o in att.objects])
    for e in examples:
        e.targets = [-1] + e.targets  # the <s> position predicts nothing
    return examples


def _pairs(turns: Sequence) -> list[tuple]:
    pairs = []
    pending = None
    for turn in turns:
        if turn.role == "user":
            pending = turn
        elif turn.role == "assistant" and pending is not None:
            pairs.append((pending, turn))
            pending = None
    return pairs


def feature_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


class FeatureCache:
    """Decoded features of every distinct attachment, decoded once, kept as float16."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}

    def add_all(self, items: Iterable[tuple[Modality, bytes, str]], workers: int = 2) -> None:
        """Decode ``(modality, data, mime_type)`` items not yet cached (in threads)."""
        todo = {}
        for modality, data, mime in items:
            key = feature_key(data)
            if key not in self.features and key not in todo:
                todo[key] = (modality, data, mime)

        def decode(job):
            modality, data, mime = job
            return modality.decode(data, mime).to(torch.float16)

        with ThreadPoolExecutor(workers) as pool:
            for key, feats in zip(todo, pool.map(decode, todo.values())):
                self.features[key] = feats
        logger.info("decoded %d attachments (%d cached in all)", len(todo), len(self.features))

    def get(self, key: str) -> torch.Tensor:
        return self.features[key].float()


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T)
    turns: torch.Tensor  # (B, T), -1 on padding
    prompt_end: torch.Tensor  # (B, K), -1 where a dialogue has fewer turns
    targets: torch.Tensor  # (B, T), -1 where no loss
    media: list  # list[MediaBatch]
    answers: torch.Tensor | None = None  # (B, K) auxiliary answer classes, -1 where none

    def to(self, device: torch.device | str) -> "Batch":
        from ..model import MediaBatch

        return Batch(self.idx.to(device), self.turns.to(device), self.prompt_end.to(device),
                     self.targets.to(device),
                     [MediaBatch(m.modality, m.x.to(device), m.lengths.to(device),
                                 m.item.to(device), m.turn.to(device), m.words, m.objects)
                      for m in self.media],
                     None if self.answers is None else self.answers.to(device))

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets >= 0).sum())


class _Item(NamedTuple):
    """One attachment of a batch, before its modality collates the features."""

    features: Any
    item: int  # which dialogue of the batch
    turn: int  # the turn that sent it
    words: list[int]  # transcript ids ([] for none)
    objects: list[list[int]]  # object phrases' ids ([] for none)


def collate(examples: Sequence[Example], cache: FeatureCache,
            modalities: Mapping[str, Modality], pad_id: int,
            drop: frozenset[str] = frozenset(),
            augment: torch.Generator | None = None) -> Batch:
    """Pad examples into one batch; modalities named in ``drop`` are left out (ablations).

    With an ``augment`` generator, each attachment's features pass through its
    modality's :meth:`~mmchat.Modality.augment` (training batches only).
    """
    from ..model import MediaBatch

    B = len(examples)
    T = max(len(e.tokens) for e in examples)
    K = max(len(e.prompt_end) for e in examples)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    turns = torch.full((B, T), -1, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    prompt_end = torch.full((B, K), -1, dtype=torch.long)
    answers = torch.full((B, K), -1, dtype=torch.long)
    per_modality: dict[str, list[_Item]] = {}
    for b, e in enumerate(examples):
        n = len(e.tokens)
        idx[b, :n] = torch.tensor(e.tokens)
        turns[b, :n] = torch.tensor(e.turns)
        targets[b, :n] = torch.tensor(e.targets)
        prompt_end[b, : len(e.prompt_end)] = torch.tensor(e.prompt_end)
        answers[b, : len(e.answers)] = torch.tensor(e.answers, dtype=torch.long)
        words = e.words or [[] for _ in e.media]
        objects = e.objects or [[] for _ in e.media]
        for (name, key, k), said, shown in zip(e.media, words, objects):
            if name in drop or name not in modalities:
                continue
            features = cache.get(key)
            if augment is not None:
                features = modalities[name].augment(features, augment)
            per_modality.setdefault(name, []).append(_Item(features, b, k, said, shown))
    media = []
    for name in sorted(per_modality):
        items = per_modality[name]
        x, lengths = modalities[name].collate([i.features for i in items])
        said = [i.words for i in items]
        shown = [i.objects for i in items]
        media.append(MediaBatch(name, x, lengths, torch.tensor([i.item for i in items]),
                                torch.tensor([i.turn for i in items]),
                                said if any(said) else None, shown if any(shown) else None))
    return Batch(idx, turns, prompt_end, targets, media, answers)
