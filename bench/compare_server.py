"""Compare the serving of two revisions of mmchat: both servers up at once, the same load
sent to each in turn, round after round, so that both see the same machine.

    python -m bench.compare_server HEAD~1 HEAD --load text --rounds 12

Each revision is checked out with ``git worktree add`` into a temporary folder and
served from there by ``python -m mmchat serve`` (memory store, the bench's settings
from :mod:`bench.bench_server`); only the ``mmchat`` package comes from the revision,
plugins and libraries from the current environment. Loads: ``text`` and ``image`` are
64 clients with 3 messages each (the image load attaches a 96x96 PNG), ``one`` is one
client with 8 messages. Prints tokens/s, time to first token and the server's CPU per
reply (event loop and other threads, from /proc) per revision; with ``--engine`` also
the engine alone's CPU per reply, measured each round between the servers' loads (a new
engine each time, after a round unmeasured), and each server's as a multiple of it
(issue 19's ratio). ``--store redis`` serves from a
private ``redis-server``; ``--coalesce 8`` has the clients ask for coalesced deltas
(every revision compared must have the option; the default is per-token).

    python -m bench.compare_server 8a5eff2 HEAD --store redis --coalesce 8 --engine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
from pathlib import Path

from bench import ROOT, load_config, percentile
from bench.bench_server import (
    CLIENTS,
    REPLY_TOKENS,
    Phase,
    Process,
    _png,
    _private_redis,
    _serve_argv,
    _serve_env,
    _server_cpu,
    measure,
    measure_engine,
)

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


async def compare(revisions: list[str], load: str, rounds: int, store: str = "memory",
                  coalesce: int | None = None, engine: bool = False) -> str:
    clients, messages, image = LOADS[load]
    attachments = [(_png(), "image/png")] if image else []
    alone = Phase("engine alone", clients)
    redis = _private_redis() if store == "redis" else contextlib.nullcontext()
    with checkouts(revisions) as paths, redis as private:
        url = private.url if private is not None else "redis://127.0.0.1:6379/0"
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(
                Process(_serve_argv(False), _serve_env(store, 1, url), cwd=path))
                for path in paths]
            for server in servers:  # warm up: TorchScript compiles on the first calls
                await measure(server.url, "warm-up", 8, 1, [(_png(), "image/png")],
                              coalesce=coalesce)
            phases = [Phase(rev, clients) for rev in revisions]
            for _ in range(rounds):
                for server, phase in zip(servers, phases):
                    _add(phase, await measure(server.url, load, clients, messages,
                                              attachments, pid=server.proc.pid,
                                              coalesce=coalesce))
                if engine:
                    _add(alone, await measure_engine(_engine_config(), load, clients,
                                                     messages, warm_rounds=1))
    lines = [f"{load}: {clients} client(s) x {messages} messages, {rounds} interleaved "
             f"rounds, {store} store, "
             + (f"coalesce {coalesce}" if coalesce else "per-token deltas"),
             "", "| revision | replies | errors | tokens/s | TTFT p50 ms | TTFT p90 ms | "
             "TTFT p99 ms | CPU ms per reply: event loop | other threads | total | "
             "vs engine alone |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    engine_cpu = _server_cpu(alone)
    for p in [*phases, *([alone] if engine else [])]:
        cpu = _server_cpu(p)
        lines.append(f"| {p.name} | {p.replies} | {p.errors} | {p.tokens_per_second:,.0f} | "
                     + " | ".join(f"{percentile(p.ttft, q) * 1000:.1f}" for q in (50, 90, 99))
                     + " | " + " | ".join(f"{p.cpu.get(k, 0) / max(p.replies, 1) * 1000:.2f}"
                                          for k in ("event loop", "other threads"))
                     + f" | {cpu * 1000:.2f} | "
                     + (f"{cpu / engine_cpu:.2f}x" if engine_cpu else "-") + " |")
    return "\n".join(lines)


def _add(phase: Phase, one: Phase) -> None:
    """Add one round's measures to the phase of its revision."""
    phase.ttft += one.ttft
    phase.tokens += one.tokens
    phase.replies += one.replies
    phase.errors += one.errors
    phase.wall += one.wall
    for key, seconds in one.cpu.items():
        phase.cpu[key] = phase.cpu.get(key, 0.0) + seconds


def _engine_config():
    """The engine alone as the servers serve (bench.bench_server's settings)."""
    return load_config().replace(
        model={"threads": 1}, generation={"max_new_tokens": REPLY_TOKENS,
                                          "strategy": "greedy"},
        sessions={"backend": "memory"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+", help="git revisions to serve, e.g. HEAD~1 HEAD")
    parser.add_argument("--load", choices=sorted(LOADS), default="text")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--coalesce", type=int, default=None,
                        help="tokens per delta the clients ask for (default: per-token)")
    parser.add_argument("--engine", action="store_true",
                        help="also measure the engine alone each round, for the ratio")
    args = parser.parse_args()
    print(asyncio.run(compare(args.revisions, args.load, args.rounds, args.store,
                              args.coalesce, args.engine)))


if __name__ == "__main__":
    main()
