"""``mmchat serve --workers N``: streamed tokens/s and time to first token by worker count.

Every server uses the Redis session store on 127.0.0.1:6379 (more than one worker
needs it), so the one-worker row is the baseline with the same store. The servers run
side by side, each its own ``mmchat serve`` process tree, and the rounds alternate
between them, so a load that changes on the shared machine touches every row alike;
the clients (64, as in ``bench server``, text only, each message after the last reply)
run in this process. The ratios compare each row's tokens/s with one worker's, and
the CPU columns count the whole process tree (supervisor and workers) from /proc.

    python -m bench workers         python -m bench.bench_workers --workers 1 2 4 --quick
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

from bench import load_config, machine_notes, percentile, table, write_section
from bench.bench_server import (
    CLIENTS,
    REPLY_TOKENS,
    THREADS,
    Phase,
    Process,
    _redis_answers,
    _serve_argv,
    _serve_env,
    measure,
)

ROUNDS = 6
MESSAGES = 3


def tree_cpu(pid: int) -> tuple[float, float]:
    """Seconds process ``pid`` and its live descendants have run on a CPU so far, and
    seconds their threads have waited for one while runnable (Linux /proc schedstat)."""
    ran = waited = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):  # a process or thread that just ended
            for task in Path(f"/proc/{p}/task").iterdir():
                run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
                ran, waited = ran + int(run_ns) / 1e9, waited + int(wait_ns) / 1e9
                todo += [int(c) for c in (task / "children").read_text().split()]
    return ran, waited


async def _timed(url: str, name: str, clients: int, messages: int) -> Phase:
    """:func:`measure` with this process's CPU over it as the clients' CPU."""
    clock = time.process_time()
    phase = await measure(url, name, clients, messages)
    phase.cpu = {"clients": time.process_time() - clock}
    return phase


def _measure_apart(url: str, name: str, clients: int, messages: int) -> str:
    """One client process's share of a round, as JSON."""
    return json.dumps(dataclasses.asdict(asyncio.run(_timed(url, name, clients, messages))))


async def _measure(url: str, name: str, clients: int, messages: int,
                   pool: concurrent.futures.Executor | None, procs: int) -> Phase:
    """A round's clients in this process, or split over ``procs`` pool processes (their
    wall is the longest share's, their CPU the sum)."""
    if pool is None:
        return await _timed(url, name, clients, messages)
    loop = asyncio.get_running_loop()
    counts = [clients // procs + (i < clients % procs) for i in range(procs)]
    done = await asyncio.gather(*(
        loop.run_in_executor(pool, _measure_apart, url, name, n, messages)
        for n in counts if n))
    shares = [Phase(**json.loads(text)) for text in done]
    total = Phase(name, clients, cpu={"clients": sum(one.cpu["clients"] for one in shares)})
    for one in shares:
        _add(total, one)
    total.wall = max(one.wall for one in shares)
    return total


async def _run(counts: list[int], quick: bool, clients: int, untrained: bool,
               procs: int = 1) -> tuple[str, list[Phase]]:
    from mmchat.loading import checkpoint_path

    config = load_config()
    path = checkpoint_path(config)
    untrained = untrained or path is None or not path.exists()
    rounds, messages = (1, 1) if quick else (ROUNDS, MESSAGES)
    phases = {n: Phase(f"{n} worker{'s' if n > 1 else ''}", clients) for n in counts}
    async with contextlib.AsyncExitStack() as stack:
        pool = None
        if procs > 1:
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                procs, mp_context=multiprocessing.get_context("spawn")))
        servers = {}
        for n in counts:
            argv = [*_serve_argv(untrained), "--workers", str(n)]
            servers[n] = await stack.enter_async_context(
                Process(argv, _serve_env("redis", THREADS)))
            await measure(servers[n].url, "warm-up", 2 * n, 1)
        for _ in range(rounds):
            for n in counts:
                pid = servers[n].proc.pid
                ran, waited = tree_cpu(pid)
                one = await _measure(servers[n].url, phases[n].name, clients, messages,
                                     pool, procs)
                ran_after, waited_after = tree_cpu(pid)
                spent = {"server": ran_after - ran, "waiting": waited_after - waited,
                         "clients": one.cpu["clients"]}
                for key, seconds in spent.items():
                    phases[n].cpu[key] = phases[n].cpu.get(key, 0.0) + seconds
                _add(phases[n], one)
    m = config.model
    model = (f"untrained {m.rnn} {m.n_layer}x{m.n_hidden} (the [model] sizes)" if untrained
             else f"{config.model.checkpoint} (config.toml's)")
    setup = (f"model {model}, greedy, at most {REPLY_TOKENS}-token replies; {clients} "
             f"clients, {messages} messages each per round, {rounds} rounds per row, "
             f"alternating; {len(os.sched_getaffinity(0))} CPUs available to this process"
             + (f"; the clients in {procs} processes of their own" if procs > 1 else ""))
    return setup, [phases[n] for n in counts]


def _add(total: Phase, one: Phase) -> None:
    total.ttft += one.ttft
    total.tokens += one.tokens
    total.replies += one.replies
    total.errors += one.errors
    total.wall += one.wall


def report(setup: str, phases: list[Phase], notes: str, untrained: bool = False,
           command: str = "") -> str:
    base = phases[0]
    rows = [[p.name, p.replies, p.errors, f"{p.tokens_per_second:,.0f}",
             f"{p.tokens_per_second / base.tokens_per_second:.2f}x",
             f"{percentile(p.ttft, 50) * 1000:.1f}", f"{percentile(p.ttft, 99) * 1000:.1f}",
             f"{p.tokens / max(p.replies, 1):.1f}",
             f"{p.cpu['server'] / max(p.replies, 1) * 1000:.2f}",
             f"{p.cpu['server'] / p.wall:.2f}", f"{p.cpu['waiting'] / p.wall:.2f}",
             f"{p.cpu['clients'] / p.wall:.2f}"]
            for p in phases]
    return "\n".join([
        "## Workers: one port, N processes (`bench/bench_workers.py`)"
        + (", the model at the [model] sizes" if untrained else ""),
        "",
        f"Command: `{command or _command(untrained)}`",
        "",
        f"Machine: {notes}. {setup}. Redis and the clients share the machine with the "
        "servers.",
        "",
        table(["server", "replies", "errors", "tokens/s", "vs 1 worker", "TTFT p50 ms",
               "TTFT p99 ms", "tokens per reply", "server CPU ms per reply",
               "server cores busy", "server threads waiting for a core",
               "clients cores busy"], rows),
        "",
        "Cores busy: CPU seconds over the wall time. Waiting: seconds the server's "
        "runnable threads spent in the kernel's run queue, over the wall time; where it "
        "is as large as the cores busy, the machine's other load is what limits the row.",
        "",
    ])


def _command(untrained: bool) -> str:
    return "python -m bench.bench_workers --untrained" if untrained else "python -m bench workers"


def run(counts: list[int], quick: bool = False, clients: int = CLIENTS,
        untrained: bool = False, procs: int = 1, section: str | None = None,
        command: str = "") -> str:
    """Measure, and unless ``quick`` write the section (the configured model's section,
    or with ``untrained`` the section of the model at the [model] sizes, or the one
    named ``section``)."""
    if not _redis_answers():
        return "bench workers: no Redis on 127.0.0.1:6379 (workers need it); skipped"
    notes = machine_notes(THREADS)
    setup, phases = asyncio.run(_run(counts, quick, clients, untrained, procs))
    text = report(setup, phases, notes, untrained, command)
    if not quick:
        write_section(section or ("bench_workers_untrained" if untrained else "bench_workers"),
                      text)
    return text


def main(quick: bool = False) -> None:
    print(run([1, 2], quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts to compare; the first is the baseline")
    parser.add_argument("--quick", action="store_true",
                        help="one round, one message per client, nothing written to docs/")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--untrained", action="store_true",
                        help="serve an untrained model at the [model] sizes (longer "
                             "replies, more model work per reply) instead of the checkpoint")
    parser.add_argument("--client-processes", type=int, default=1, metavar="K",
                        help="run the clients in K processes of their own (a many-core "
                             "machine needs more than one Python process to load it)")
    parser.add_argument("--section", metavar="NAME",
                        help="the docs/benchmarks.md section to write (a many-core run "
                             "keeps its own beside the 2-core one)")
    args = parser.parse_args()
    started = time.perf_counter()
    command = " ".join(["python -m bench.bench_workers", *sys.argv[1:]])
    print(run(args.workers, args.quick, args.clients, args.untrained, args.client_processes,
              args.section, command if len(sys.argv) > 1 else ""))
    print(f"({time.perf_counter() - started:.0f} s)")
