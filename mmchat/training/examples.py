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

import torch

from ..modality import Modality
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One dialogue, tokenised. ``media`` lists (modality, feature key, turn)."""

    tokens: list[int]
    turns: list[int]  # turn index of each position
    prompt_end: list[int]  # position of each turn's <bot> token
    targets: list[int]  # next-token targets, -1 where no loss is taken
    media: list[tuple[str, str, int]] = field(default_factory=list)
    category: str = ""


def encode_dialogue(turns: Sequence, tokenizer: Tokenizer, max_tokens: int = 256,
                    category: str = "") -> Example | None:
    """Tokenise user/assistant pairs; attachments become feature keys (content hashes).

    ``turns`` are :class:`mmchat.dataset.Turn` objects. Pairs past ``max_tokens`` are
    dropped; returns ``None`` when not even one pair fits.
    """
    tokens = [tokenizer.bos_id]
    turn_ids = [0]
    prompt_end: list[int] = []
    targets: list[int] = []
    media: list[tuple[str, str, int]] = []
    pairs = _pairs(turns)
    for k, (user, assistant) in enumerate(pairs):
        prompt = tokenizer.user_turn(user.text)
        answer = tokenizer.encode(assistant.text) + [tokenizer.eos_id]
        if len(tokens) + len(prompt) + len(answer) > max_tokens:
            break
        tokens += prompt
        turn_ids += [k] * len(prompt)
        prompt_end.append(len(tokens) - 1)
        tokens += answer
        turn_ids += [k] * len(answer)
        for att in user.attachments:
            media.append((att.modality, feature_key(att.read()), k))
    if not prompt_end:
        return None
    # the token at position t is trained to predict token t+1 when t+1 is in an answer
    targets = [-1] * len(tokens)
    answer_positions = _answer_positions(prompt_end, tokens, tokenizer.eos_id)
    for t in answer_positions:
        targets[t - 1] = tokens[t]
    return Example(tokens, turn_ids, prompt_end, targets, media, category)


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


def _answer_positions(prompt_end: list[int], tokens: list[int], eos: int) -> list[int]:
    positions = []
    for end in prompt_end:
        t = end + 1
        while t < len(tokens):
            positions.append(t)
            if tokens[t] == eos:
                break
            t += 1
    return positions


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

    def to(self, device: torch.device | str) -> "Batch":
        from ..model import MediaBatch

        return Batch(self.idx.to(device), self.turns.to(device), self.prompt_end.to(device),
                     self.targets.to(device),
                     [MediaBatch(m.modality, m.x.to(device), m.lengths.to(device),
                                 m.item.to(device), m.turn.to(device)) for m in self.media])

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets >= 0).sum())


def collate(examples: Sequence[Example], cache: FeatureCache,
            modalities: Mapping[str, Modality], pad_id: int,
            drop: frozenset[str] = frozenset()) -> Batch:
    """Pad examples into one batch; modalities named in ``drop`` are left out (ablations)."""
    from ..model import MediaBatch

    B = len(examples)
    T = max(len(e.tokens) for e in examples)
    K = max(len(e.prompt_end) for e in examples)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    turns = torch.full((B, T), -1, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    prompt_end = torch.full((B, K), -1, dtype=torch.long)
    per_modality: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    for b, e in enumerate(examples):
        n = len(e.tokens)
        idx[b, :n] = torch.tensor(e.tokens)
        turns[b, :n] = torch.tensor(e.turns)
        targets[b, :n] = torch.tensor(e.targets)
        prompt_end[b, : len(e.prompt_end)] = torch.tensor(e.prompt_end)
        for name, key, k in e.media:
            if name in drop or name not in modalities:
                continue
            per_modality.setdefault(name, []).append((cache.get(key), b, k))
    media = []
    for name in sorted(per_modality):
        items = per_modality[name]
        x, lengths = modalities[name].collate([f for f, _, _ in items])
        media.append(MediaBatch(name, x, lengths, torch.tensor([b for _, b, _ in items]),
                                torch.tensor([k for _, _, k in items])))
    return Batch(idx, turns, prompt_end, targets, media)
