"""Resumable training state (optimiser, step, early stopping) without pickle."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

STATE_FILE = "trainer.safetensors"
META_FILE = "trainer.json"


def dump_optimizer(optimizer: torch.optim.Optimizer, progress: dict[str, Any]
                   ) -> dict[str, bytes]:
    """Optimiser tensors to safetensors, everything else to JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "progress": progress}
    return {STATE_FILE: st_save(tensors), META_FILE: json.dumps(meta, indent=2).encode()}


def load_optimizer(optimizer: torch.optim.Optimizer, folder) -> dict[str, Any]:
    """Restore the optimiser from a checkpoint folder; returns the saved progress."""
    meta = json.loads((folder / META_FILE).read_text())
    tensors = st_load((folder / STATE_FILE).read_bytes())
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["progress"]
