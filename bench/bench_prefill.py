"""Prefill of picture turns: what the model thread spends to start a batch of turns.

A burst of 64 turns, each asking about the pictures of its session (1, 2 or 3 of them in
its memory), goes through :func:`mmchat.runtime.start_turns` as one batch on the bundled
model with the fast decoder, one thread, as the server's model thread runs it: the
prompt's RNN pass, the memory bank, the entry tags, FiLM and the summaries, the first
token's logits. Reported as milliseconds per turn (the median of the repetitions), and
a checksum of every turn's first logits, which must not change when the code only gets
faster.

    python -m bench prefill
    python -m bench.bench_prefill --baseline 5a4ea39 --rounds 6

With ``--baseline`` the given revision's ``mmchat`` (a ``git worktree``) is timed in its
own process, alternating with the current code's, round after round, and the table gives
each round's ratio; the two processes run one at a time, so both see the same machine.
"""

from __future__ import annotations

import argparse

from bench import ROOT, run_probe, table
from bench.prefill_probe import PICTURES, measure

#: Both revisions run this checkout's weights.
BUNDLED = ROOT / "mmchat" / "bundled_model"


def compare(baseline: str, rounds: int, reps: int) -> str:
    from bench.compare_server import checkouts

    rows = []
    with checkouts([baseline]) as (path,):
        for r in range(rounds):
            old, new = (run_probe("prefill_probe.py", p, reps, BUNDLED) for p in (path, ROOT))
            for k in map(str, PICTURES):
                rows.append([r + 1, k, f"{old[k]['ms']:.3f}", f"{new[k]['ms']:.3f}",
                             f"{old[k]['ms'] / new[k]['ms']:.2f}x",
                             "yes" if old[k]["checksum"] == new[k]["checksum"] else "NO"])
    return table(["round", "pictures per turn", f"{baseline} ms per turn", "now ms per turn",
                  "speed-up", "first logits identical"], rows)


def main(quick: bool = False) -> None:
    result = measure(3 if quick else 10)
    print(table(["pictures per turn", "ms per turn", "first logits checksum"],
                [[k, f"{v['ms']:.3f}", v["checksum"]] for k, v in result.items()]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", help="a git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if args.baseline:
        print(compare(args.baseline, args.rounds, args.reps))
    else:
        main()
