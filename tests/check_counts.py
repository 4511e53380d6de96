"""Whether a model's count entry counts: its soft counts against the answers of a
corpus's "how many ... in all?" questions.

Plays every several-picture session of the split that ends with a count across its
pictures through ``Engine.reply`` (the model's own replies as the history, as a user
would see them), records the count entry's soft counts at that question (one per count
head, :mod:`mmchat.counting`) and prints, per head, the correlation with the right
answer and the mean count for each answer; then the same for "how many shapes" and
"how many <kind>s" questions apart. A head that counts what was asked shows a mean
that rises one for one with the answer.

Usage: python tests/check_counts.py CHECKPOINT DATA_DIR [--split test] [--limit 120]
"""

import argparse
import sys

import numpy as np
import torch

from mmchat import Attachment, SyncEngine
from mmchat.config import from_dict
from mmchat.counting import CountEntry
from mmchat.dataset import read_dataset

WORDS = "no one two three four five six seven eight nine ten eleven twelve".split()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=120)
    args = parser.parse_args(argv)
    seen: list[torch.Tensor] = []
    counts = CountEntry.counts

    def recorded(self: CountEntry, values: torch.Tensor, countable: torch.Tensor
                 ) -> torch.Tensor:
        c = counts(self, values, countable)
        seen.append(c.detach().clone())
        return c

    CountEntry.counts = recorded  # type: ignore[method-assign]
    config = from_dict({"model": {"checkpoint": args.checkpoint, "threads": 1}}, env={})
    rows, answers, kinds = [], [], []
    with SyncEngine(config) as engine:
        if engine.engine.model.count is None:
            print(f"{args.checkpoint} has no count entry")
            return 1
        for n, dialogue in enumerate(read_dataset(f"{args.data}/{args.split}.jsonl")):
            if len(answers) >= args.limit:
                break
            if not any(t.category == "across_pictures" for t in dialogue.turns):
                continue
            for user, bot in zip(dialogue.turns[::2], dialogue.turns[1::2]):
                engine.reply(f"s{n}", user.text,
                             [Attachment(a.read(), a.mime_type) for a in user.attachments])
                words = bot.text.split()
                if bot.category == "across_pictures" and len(words) > 3 \
                        and words[2] in WORDS and ("in all" in bot.text
                                                   or "in the pictures" in bot.text):
                    rows.append(seen[-1][0].numpy())
                    answers.append(WORDS.index(words[2]))
                    kinds.append(words[3])
    X, y = np.array(rows), np.array(answers)
    print(f"{args.checkpoint}: {len(y)} count questions across pictures of {args.split}")
    for h in range(X.shape[1]):
        means = {int(a): round(float(X[y == a, h].mean()), 2) for a in np.unique(y)}
        print(f"  head {h}: correlation {np.corrcoef(X[:, h], y)[0, 1]:+.2f}, "
              f"mean count by answer {means}")
    shapes = np.array([k.startswith("shape") for k in kinds])
    for name, sel in (('"how many shapes"', shapes), ('"how many <kind>s"', ~shapes)):
        if sel.sum() > 2:
            print(f"  {name} ({int(sel.sum())}): correlation per head "
                  + " ".join(f"{np.corrcoef(X[sel, h], y[sel])[0, 1]:+.2f}"
                             for h in range(X.shape[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
