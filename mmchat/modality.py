"""The modality contract: what a plugin provides so mmchat can take a kind of attachment.

A plugin builds a :class:`Modality` and hands it to the ``register`` callback of the
``register_modalities`` hook. Everything here is public API.
"""

from __future__ import annotations

import hashlib
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


class Modality(ABC):
    """One kind of input the model can see or hear.

    Subclasses set the class attributes and implement :meth:`decode` and
    :meth:`build_encoder`. ``decode`` runs in a worker thread, never on the event
    loop, and must raise :class:`mmchat.errors.CorruptMedia` or
    :class:`mmchat.errors.MediaTooLarge` for bad payloads.
    """

    #: Unique name, used in config, checkpoints and the protocol (``"image"``).
    name: str = ""
    #: MIME types this modality accepts (``("image/png", ...)``).
    mime_types: tuple[str, ...] = ()
    #: Largest accepted payload, in bytes, before decoding.
    max_bytes: int = 10 * 1024 * 1024
    #: Version of the encoder architecture, recorded in checkpoints. A checkpoint whose
    #: major version (the part before the first ".") differs is refused.
    version: str = "0"
    #: When several served modalities take an attachment's MIME type and the client names
    #: none, the highest priority wins (then the first name in alphabetical order).
    priority: int = 0
    #: Settings that only bound what is accepted (bytes, pixels, seconds) and leave the
    #: features the encoder sees as they are: a checkpoint served with other values of
    #: these loads without a warning.
    limits: tuple[str, ...] = ()
    #: Name and version of the plugin that registered this modality (set by the host).
    plugin_name: str = ""
    plugin_version: str | None = None

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})

    @abstractmethod
    def decode(self, data: bytes, mime_type: str) -> "torch.Tensor":
        """Turn raw bytes into a feature tensor (float32, shape chosen by the plugin).

        Variable-length features put the variable axis last; :meth:`collate` pads it.
        """

    @abstractmethod
    def build_encoder(self, d_model: int) -> "nn.Module":
        """Return a fresh encoder whose weights live in the model checkpoint.

        ``encoder(x, lengths)`` takes a collated batch and returns
        ``(vectors, mask)``: vectors ``(B, N, d_model)`` and a bool mask ``(B, N)``
        that is ``True`` where a vector is real.
        """

    def inference_encoder(self, encoder: "nn.Module") -> "nn.Module":
        """The module to serve with, made from the trained ``encoder`` (weights loaded, in
        eval mode) when the engine or ``mmchat eval`` loads a checkpoint; training never
        calls it. It must compute the same function up to float rounding: fold batch
        norms into the convolutions before them, choose a faster memory layout. The
        default returns ``encoder`` itself. Return a new module rather than change
        ``encoder``: if this raises, the trained encoder is served and the error logged.
        """
        return encoder

    def collate(self, features: list["torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Stack decoded features into a batch, right-padding the last axis with zeros.

        Returns ``(batch, lengths)`` where ``lengths`` is a ``(B,)`` long tensor.
        """
        import torch

        if not features:
            raise ValueError("collate() needs at least one item")
        lengths = torch.tensor([f.shape[-1] for f in features], dtype=torch.long)
        longest = int(lengths.max())
        batch = features[0].new_zeros((len(features), *features[0].shape[:-1], longest))
        for i, f in enumerate(features):
            batch[i, ..., : f.shape[-1]] = f
        return batch, lengths

    def is_costly(self, data: bytes, mime_type: str) -> bool:
        """Whether decoding ``data`` is costly (a big picture, a long clip), judged from
        its header alone: this runs on the event loop, so it must read a few bytes and
        never decode. Costly decodes of a modality never take the last of its decode
        threads (``[plugins] decode_threads``), so cheap ones are not queued behind
        them. The default, ``False``, treats every payload as cheap.
        """
        return False

    def augment(self, features: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """Return a randomly perturbed copy of one item's decoded features, for training.

        Training calls this on every attachment of every batch, with a generator seeded
        from the step (so runs stay reproducible and resumable); inference never does.
        The default returns ``features`` unchanged.
        """
        return features

    def example(self) -> tuple[bytes, str] | None:
        """A small valid payload and its MIME type, or ``None`` (the default).

        :meth:`mmchat.Engine.start` decodes and encodes it once, in its worker threads,
        before the engine reports ready: imports, JIT compilation (librosa's numba
        functions) and lazy set-up then happen at start-up, not in the first reply.
        """
        return None

    def accepts(self, mime_type: str) -> bool:
        """Whether this modality takes ``mime_type`` (parameters such as ``; codecs=1`` ignored)."""
        return mime_type.split(";", 1)[0].strip().lower() in self.mime_types

    def describe(self) -> dict[str, Any]:
        """What clients are told about this modality."""
        return {"name": self.name, "mime_types": list(self.mime_types), "max_bytes": self.max_bytes}


@dataclass(frozen=True)
class Attachment:
    """Bytes plus a MIME type. ``modality`` may name the target modality explicitly."""

    data: bytes = field(repr=False)
    mime_type: str
    modality: str | None = None

    @classmethod
    def from_path(cls, path: str | Path, mime_type: str | None = None) -> "Attachment":
        path = Path(path)
        if mime_type is None:
            mime_type = guess_mime_type(path)
        return cls(data=path.read_bytes(), mime_type=mime_type)

    @property
    def id(self) -> str:
        """Content hash, stable across processes."""
        return hashlib.sha256(self.data).hexdigest()[:16]


_EXTRA_TYPES = {
    ".webp": "image/webp",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
}


def guess_mime_type(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(str(path))
    return guessed or "application/octet-stream"


def read_settings(modality: str, settings: Mapping[str, Any],
                  spec: Mapping[str, tuple[Any, type, Any, Any]]) -> dict[str, Any]:
    """Validate ``[plugins.<modality>]`` against ``spec`` and fill in defaults.

    ``spec`` maps each key to ``(default, type, minimum, maximum)``; ``None`` means
    unbounded. Raises ConfigError naming the key, the value and what is allowed.
    """
    unknown = sorted(set(settings) - set(spec))
    if unknown:
        raise ConfigError(
            f"unknown setting plugins.{modality}.{unknown[0]}; allowed: {', '.join(spec)}")
    values = {}
    for key, (default, kind, low, high) in spec.items():
        value = settings.get(key, default)
        where = f"plugins.{modality}.{key} = {value!r} is not allowed"
        expected = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, expected):
            raise ConfigError(f"{where}: expected {'a number' if kind is float else 'an integer'}")
        if low is not None and value < low:
            raise ConfigError(f"{where}: minimum is {low}")
        if high is not None and value > high:
            raise ConfigError(f"{where}: maximum is {high}")
        values[key] = kind(value)
    return values
