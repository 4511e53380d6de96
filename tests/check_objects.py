"""How well a model's object slots read the objects of a corpus's pictures.

For every image attachment of the split that names its ``objects`` (docs/data.md), the
model's slots are computed as serving computes them, and slot ``i`` counts as right
when the object head's top pieces are exactly the pieces of object ``i`` (as many as it
has), or, past the last object, when it says "nothing" (a model trained with
``object_order = "any"`` is scored on the slots matched to the objects, as it was
trained). Prints the share right per slot, by how many objects the picture has, the
share of pictures with every slot right, and the share of the objects' pieces among
their slots' top pieces (partial credit).

Usage: python tests/check_objects.py CHECKPOINT DATA_DIR [--split test] [--limit 600]
"""

import argparse
import sys
from collections import defaultdict

import torch

from mmchat import checkpoint
from mmchat.dataset import read_dataset
from mmchat.objects import matching, object_targets
from mmchat.plugins import PluginHost


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=600)
    args = parser.parse_args(argv)
    host = PluginHost()
    model, tokenizer, _ = checkpoint.load(args.checkpoint, host.modalities)
    model.eval()
    K, V = model.config.object_slots, model.config.vocab_size
    if model.object_head is None:
        print(f"{args.checkpoint} has no object slots")
        return 1
    seen: set[bytes] = set()
    right: dict[int, list[int]] = defaultdict(lambda: [0] * K)
    totals: dict[int, int] = defaultdict(int)
    whole: dict[int, int] = defaultdict(int)
    pieces_right, pieces_all = 0, 0
    for dialogue in read_dataset(f"{args.data}/{args.split}.jsonl"):
        for turn in dialogue.turns:
            for att in turn.attachments:
                data = att.read()
                if not att.objects or att.modality not in model.config.objects_for \
                        or data in seen or len(seen) >= args.limit:
                    continue
                seen.add(data)
                modality = host.modalities[att.modality]
                x, lengths = modality.collate([modality.decode(data, att.mime_type)])
                with torch.inference_mode():
                    slots = model.encode(att.modality, x, lengths)[0][-K:]  # (K, d)
                    scores = model.object_head(slots)  # (K, V + 1)
                shown = [tokenizer.encode(o) for o in att.objects]
                want = object_targets([shown], K, V)[0]  # (K, V + 1)
                if model.config.object_order == "any":  # each object's matched slot
                    cost = -torch.einsum("jv,iv->ij", want, scores.log_softmax(-1))
                    slots, objects = matching(cost[None])
                    scores = scores[slots[0][objects[0].argsort()]]
                n = len(att.objects)
                ok = []
                for i in range(K):
                    pieces = (want[i] > 0).nonzero().squeeze(1)
                    top = scores[i].topk(len(pieces)).indices
                    ok.append(set(top.tolist()) == set(pieces.tolist()))
                    if i < n:
                        pieces_right += len(set(top.tolist()) & set(pieces.tolist()))
                        pieces_all += len(pieces)
                    right[n][i] += ok[-1]
                totals[n] += 1
                whole[n] += all(ok)
    print(f"{args.checkpoint}: {sum(totals.values())} pictures of {args.split}")
    for n in sorted(totals):
        per_slot = " ".join(f"{r / totals[n]:.3f}" for r in right[n])
        print(f"  {n} object(s): {totals[n]:4d} pictures, right per slot {per_slot}, "
              f"every slot right {whole[n] / totals[n]:.3f}")
    print(f"  pieces of the objects among their slots' top pieces: "
          f"{pieces_right / max(pieces_all, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
