"""A sentencepiece tokenizer trained in-process, with mmchat's special tokens."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, BOT = "<user>", "<bot>"
ROLE_TOKENS = (USER, BOT)

#: Typing habits that do not change what is asked: a space before punctuation
#: ("is it red ?") and a run of question or exclamation marks ("is it red??").
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[?!.,;:](?:\s|$))")
_REPEATED_MARKS = re.compile(r"([?!])[?!]+")


class Tokenizer:
    """Wraps a sentencepiece model; ids 0-3 are pad, unk, bos, eos, then the role tokens."""

    def __init__(self, model_proto: bytes) -> None:
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.pad_id = self.sp.pad_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.user_id = self.sp.piece_to_id(USER)
        self.bot_id = self.sp.piece_to_id(BOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4000) -> "Tokenizer":
        """Train a unigram model on ``texts``, read as :meth:`encode` reads them
        (:func:`normalize`); shrinks the vocabulary if the text is small."""
        sentences = [normalize(t.strip()) for t in texts if t and t.strip()]
        if not sentences:
            raise ValueError("cannot train a tokenizer on no text")
        proto = io.BytesIO()
        kwargs = dict(
            sentence_iterator=iter(sentences),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            user_defined_symbols=list(ROLE_TOKENS),
            hard_vocab_limit=False,
            minloglevel=2,
            num_threads=1,  # one thread keeps training deterministic
        )
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as exc:
            raise ValueError(f"sentencepiece training failed: {exc}") from exc
        return cls(proto.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, lower-cased and with its punctuation normalised
        (:func:`normalize`)."""
        return self.sp.encode(normalize(text)) if text else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i > self.eos_id and i not in
                               (self.user_id, self.bot_id)])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def user_turn(self, text: str) -> list[int]:
        """Tokens fed before a reply: ``<user> text <bot>``."""
        return [self.user_id, *self.encode(text), self.bot_id]


def normalize(text: str) -> str:
    """``text`` as the tokenizer reads it: lower case, no space before a punctuation mark
    that ends a word ("is it red ?" → "is it red?"), and a run of "?" and "!" cut to its
    first ("is it red?!" → "is it red?")."""
    text = _REPEATED_MARKS.sub(r"\1", text.lower())
    return _SPACE_BEFORE_PUNCT.sub("", text)
