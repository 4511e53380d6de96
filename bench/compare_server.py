"""Compare the serving of two revisions of mmchat: both servers up at once, the same load
sent to each in turn, round after round, so that both see the same machine.

    python -m bench.compare_server HEAD~1 HEAD --load text --rounds 12

Each revision is checked out with ``git worktree add`` into a temporary folder and
served from there by ``python -m mmchat serve`` (memory store, the bench's settings
from :mod:`bench.bench_server`); only the ``mmchat`` package comes from the revision,
plugins and libraries from the current environment. Loads: ``text`` and ``image`` are
64 clients with 3 messages each (the image load attaches a 96x96 PNG), ``one`` is one
client with 8 messages. Prints tokens/s and time to first token per revision.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
from pathlib import Path

from bench import ROOT, percentile
from bench.bench_server import CLIENTS, Phase, Process, _png, _serve_argv, _serve_env, measure

LOADS = {"text": (CLIENTS, 3, False), "image": (CLIENTS, 3, True), "one": (1, 8, False)}


@contextlib.contextmanager
def checkouts(revisions: list[str]):
    """A worktree folder per revision, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mmchat-compare-") as tmp:
        paths = []
        try:
            for i, rev in enumerate(revisions):
                path = Path(tmp) / f"{i}"
                subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path),
                                rev], cwd=ROOT, check=True)
                paths.append(path)
            yield paths
        finally:
            for path in paths:
                subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                               check=False)


async def compare(revisions: list[str], load: str, rounds: int) -> str:
    clients, messages, image = LOADS[load]
    attachments = [(_png(), "image/png")] if image else []
    with checkouts(revisions) as paths:
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(
                Process(_serve_argv(False), _serve_env("memory", 1), cwd=path))
                for path in paths]
            for server in servers:  # warm up: TorchScript compiles on the first calls
                await measure(server.url, "warm-up", 8, 1, [(_png(), "image/png")],
                              coalesce=None)
            phases = [Phase(rev, clients) for rev in revisions]
            for _ in range(rounds):
                for server, phase in zip(servers, phases):
                    # per-token deltas: what every revision speaks
                    one = await measure(server.url, load, clients, messages, attachments,
                                        coalesce=None)
                    phase.ttft += one.ttft
                    phase.tokens += one.tokens
                    phase.replies += one.replies
                    phase.errors += one.errors
                    phase.wall += one.wall
    lines = [f"{load}: {clients} client(s) x {messages} messages, {rounds} interleaved rounds",
             "", "| revision | replies | errors | tokens/s | TTFT p50 ms | TTFT p90 ms | "
             "TTFT p99 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in phases:
        lines.append(f"| {p.name} | {p.replies} | {p.errors} | {p.tokens_per_second:,.0f} | "
                     + " | ".join(f"{percentile(p.ttft, q) * 1000:.1f}" for q in (50, 90, 99))
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+", help="git revisions to serve, e.g. HEAD~1 HEAD")
    parser.add_argument("--load", choices=sorted(LOADS), default="text")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print(asyncio.run(compare(args.revisions, args.load, args.rounds)))


if __name__ == "__main__":
    main()
