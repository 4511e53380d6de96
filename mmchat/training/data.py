"""Load a dataset folder for training: tokenizer, encoded examples, decoded media."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..dataset import Dialogue, read_dataset
from ..errors import MMChatError
from ..modality import Modality
from ..tokenizer import Tokenizer
from .examples import Example, FeatureCache, encode_dialogue
from .trainer import TrainData

logger = logging.getLogger(__name__)


def split_path(data: Path, split: str) -> Path:
    """``DATA/<split>.jsonl`` (the layout `mmchat data demo` writes)."""
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise MMChatError(f"{data} has no {split}.jsonl; build one with "
                          f"`mmchat data demo {data}` or see docs/data.md")
    return path


def load_dialogues(path: Path) -> list[Dialogue]:
    return list(read_dataset(path))


def texts_of(dialogues: list[Dialogue]) -> list[str]:
    return [t.text for d in dialogues for t in d.turns if t.text]


def used_modalities(dialogues: list[Dialogue], registered: Mapping[str, Modality]
                    ) -> dict[str, Modality]:
    names = {a.modality for d in dialogues for t in d.turns for a in t.attachments}
    missing = sorted(names - set(registered))
    if missing:
        raise MMChatError(f"the data uses modalities {missing} that no loaded plugin provides")
    return {n: registered[n] for n in sorted(names)}


def encode_all(dialogues: list[Dialogue], tokenizer: Tokenizer, max_tokens: int,
               answer_ids: Mapping[str, int] | None = None) -> list[Example]:
    return [e for d in dialogues
            for e in encode_dialogue(d.turns, tokenizer, max_tokens, category=d.category or "",
                                     answer_ids=answer_ids)]


def answer_classes(dialogues: list[Dialogue], *, min_count: int = 5,
                   max_words: int = 3) -> list[str]:
    """Short ``answer`` labels seen at least ``min_count`` times: the auxiliary classes."""
    counts = Counter(t.answer for d in dialogues for t in d.turns
                     if t.role == "assistant" and t.answer
                     and len(t.answer.split()) <= max_words)
    return sorted(a for a, n in counts.items() if n >= min_count)


def decode_media(cache: FeatureCache, dialogues: list[Dialogue],
                 modalities: Mapping[str, Modality]) -> None:
    items = []
    for d in dialogues:
        for t in d.turns:
            for a in t.attachments:
                att = a.to_attachment()
                items.append((modalities[a.modality], att.data, att.mime_type))
    cache.add_all(items)


def load_train_data(data_dir: str | Path | Sequence[str | Path],
                    registered: Mapping[str, Modality], *,
                    vocab_size: int, max_tokens: int, tokenizer: Tokenizer | None = None,
                    modality_names: list[str] | None = None,
                    answers: list[str] | None = None,
                    more_answers: bool = False) -> TrainData:
    """Read ``train.jsonl`` and ``valid.jsonl`` of one dataset folder, or of several
    together (media paths stay relative to each folder); train a tokenizer unless one is
    given. ``modality_names`` are modalities to keep besides those the data uses;
    ``answers`` fixes the auxiliary answer classes (else they come from the data); with
    ``more_answers``, the data's classes that ``answers`` lacks follow them (a warm start
    keeps its classes' ids and learns the new ones)."""
    dirs = [Path(d) for d in ([data_dir] if isinstance(data_dir, (str, Path)) else data_dir)]
    if not dirs:
        raise MMChatError("no dataset folder given")
    train: list[Dialogue] = []
    valid: list[Dialogue] = []
    for folder in dirs:
        part = load_dialogues(split_path(folder, "train"))
        if not part:
            raise MMChatError(f"{folder}/train.jsonl holds no dialogues")
        train += part
        if (folder / "valid.jsonl").is_file():
            valid += load_dialogues(folder / "valid.jsonl")
    modalities = used_modalities(train + valid, registered)
    if modality_names is not None:
        missing = sorted(set(modality_names) - set(registered))
        if missing:
            raise MMChatError(f"modalities {missing} are needed but no loaded plugin "
                              "provides them")
        modalities = {n: registered[n] for n in sorted(set(modality_names) | set(modalities))}
    if tokenizer is None:
        tokenizer = Tokenizer.train(texts_of(train), vocab_size=vocab_size)
        logger.info("trained a tokenizer with %d pieces", tokenizer.vocab_size)
    cache = FeatureCache()
    decode_media(cache, train + valid, modalities)
    found = answer_classes(train)
    if answers is None:
        answers = found
    else:
        answers = [*answers, *(a for a in found if more_answers and a not in answers)]
    ids = {a: i for i, a in enumerate(answers)}
    return TrainData(encode_all(train, tokenizer, max_tokens, ids),
                     encode_all(valid, tokenizer, max_tokens, ids), cache, tokenizer, modalities,
                     answers)
