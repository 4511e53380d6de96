"""Session model state as versioned bytes (safetensors), never pickle.

The blobs are written and read through safetensors' numpy functions: the same format
as its torch ones, at a fifth of the cost for tensors this small (a turn writes one).

Two kinds of blob:

* the RNN state after the last turn, tokens not yet fed and the last turn's query
  (replaced each turn; version 2 added the query, and version 1 blobs still load,
  without one);
* one memory-bank entry per attachment: its encoder vectors (appended).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import StateError

FORMAT = "mmchat-state"
MEMORY_FORMAT = "mmchat-memory"
VERSION = "2"  # of the session state blob
MEMORY_VERSION = "1"  # of a memory entry blob
#: Versions each blob format reads: a version-1 state is one without a turn query.
READABLE = {FORMAT: ("1", "2"), MEMORY_FORMAT: ("1",)}


@dataclass
class SessionState:
    rnn: torch.Tensor  # (S, L, 1, H): S = 2 for LSTM (h, c), 1 for GRU
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next turn
    turns: int = 0
    query: torch.Tensor | None = None  # (1, d) the last turn's query, for models that carry it


@dataclass
class MemoryEntry:
    modality: str
    vectors: torch.Tensor  # (N, d)
    attachment_id: str = ""


def dumps_state(state: SessionState) -> bytes:
    tensors = {
        "rnn": _array(state.rnn),
        "pending": np.asarray(state.pending, dtype=np.int64),
    }
    if state.query is not None:
        tensors["query"] = _array(state.query)
    return st_save(tensors, metadata={"format": FORMAT, "version": VERSION,
                                      "turns": str(state.turns)})


def loads_state(data: bytes) -> SessionState:
    tensors, meta = _load(data, FORMAT)
    try:
        query = tensors.get("query")
        return SessionState(rnn=torch.from_numpy(tensors["rnn"]),
                            pending=tensors["pending"].tolist(),
                            turns=int(meta.get("turns", "0")),
                            query=None if query is None else torch.from_numpy(query))
    except (KeyError, ValueError) as exc:
        raise StateError(f"session state is missing a field: {exc}") from None


def dumps_entry(entry: MemoryEntry) -> bytes:
    return st_save({"vectors": _array(entry.vectors)},
                   metadata={"format": MEMORY_FORMAT, "version": MEMORY_VERSION,
                             "modality": entry.modality, "attachment_id": entry.attachment_id})


def loads_entry(data: bytes) -> MemoryEntry:
    tensors, meta = _load(data, MEMORY_FORMAT)
    if "vectors" not in tensors or "modality" not in meta:
        raise StateError("memory entry is missing its vectors or modality")
    return MemoryEntry(meta["modality"], torch.from_numpy(tensors["vectors"]),
                       meta.get("attachment_id", ""))


def entry_attachment_id(data: bytes) -> str:
    """The attachment id of a serialised memory entry, read from its header only."""
    try:
        return _metadata(bytes(data)).get("attachment_id", "")
    except (ValueError, struct.error) as exc:
        raise StateError(f"memory entry is not readable: {exc}") from None


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def _load(data: bytes, expected: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"session state must be bytes, not {type(data).__name__}")
    try:
        tensors = st_load(bytes(data))
        meta = _metadata(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, struct.error) as exc:
        raise StateError(f"session state is not readable: {exc}") from None
    if meta.get("format") != expected:
        raise StateError(f"expected a {expected} blob, got format {meta.get('format')!r}")
    if meta.get("version") not in READABLE[expected]:
        raise StateError(f"{expected} version {meta.get('version')!r} is not supported "
                         f"(this mmchat reads versions {', '.join(READABLE[expected])})")
    return tensors, meta


def _metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    return header.get("__metadata__", {}) or {}
