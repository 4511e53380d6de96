"""Accuracy of the fast decode step at fp32 and int8 on the served checkpoint.

Greedy replies to the first test dialogues of the demo corpus (``data/demo``, built by
``mmchat data demo data/demo``), answered after the reference history, through the
reference decoder, the fp32 fast step and the int8 fast step of a dynamic-int8 copy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mmchat import checkpoint, config, evaluation
from mmchat.fastpath import build_decoder
from mmchat.loading import checkpoint_path, quantize
from mmchat.plugins import PluginHost
from mmchat.training.data import decode_media, load_dialogues
from mmchat.training.examples import FeatureCache


def run(quick: bool = False, data: str = "data/demo") -> str:
    torch.set_num_threads(1)
    cfg = config.load(Path("config.toml") if Path("config.toml").is_file() else None)
    host = PluginHost.from_config(cfg)
    model, tok, _ = checkpoint.load(checkpoint_path(cfg) or "", host.modalities)
    dialogues = load_dialogues(Path(data) / "test.jsonl")[: 60 if quick else 400]
    modalities = {m: host.modalities[m] for m in model.config.modalities}
    cache = FeatureCache()
    decode_media(cache, dialogues, modalities)

    def replies(m, decoder):
        return evaluation.generate_turns(m, tok, dialogues, cache, modalities, decoder=decoder)

    reference = replies(model, build_decoder(model, fast=False))
    q = quantize(copy.deepcopy(model)).eval()
    rows = [("reference (the model's modules)", reference),
            ("fast step, fp32", replies(model, build_decoder(model, fast=True))),
            ("fast step, int8", replies(q, build_decoder(q, fast=True)))]
    out = [f"{len(reference)} turns of {len(dialogues)} test dialogues, "
           f"checkpoint {cfg.model.checkpoint}", "",
           "| decoder | exact-answer accuracy | replies identical to the reference |",
           "|---|---:|---:|"]
    for name, rs in rows:
        acc = sum(r.exact for r in rs) / len(rs)
        same = sum(a.hypothesis == b.hypothesis for a, b in zip(rs, reference)) / len(rs)
        out.append(f"| {name} | {acc:.4f} | {same:.1%} |")
    return "\n".join(out)


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    main()
