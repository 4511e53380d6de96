"""WebSocket serving: streamed tokens/s and time to first token with 64 clients.

Measured in one run, each server in its own process and every client in this one,
all on loopback, through :class:`mmchat.client.Client`:

* a bare ``websockets`` server that answers each message with as many frames as a
  reply has tokens, written with the same protocol code: the transport limit;
* ``mmchat serve`` with one client sending one message at a time: the baseline;
* ``mmchat serve`` with 64 clients at once, each sending messages back to back, text
  only and with a 96x96 PNG; and once more with the Redis session store (a private
  ``redis-server`` started for the run, else one answering on 127.0.0.1:6379), by one
  server and by two sharing it (scale-out on one machine).

The model is what ``config.toml`` serves (an untrained one at the ``[model]`` sizes
when its checkpoint is not there), greedy, replies capped at ``REPLY_TOKENS``. Time to
first token is from sending a message to receiving its first delta. A full run writes
its tables into ``docs/benchmarks.md``; ``--quick`` only prints them.

    python -m bench server          python -m bench.bench_server --quick --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ROOT, load_config, machine_notes, percentile, table, write_section

REPLY_TOKENS = 32
#: The most tokens a delta carries after a reply's first (``hello.coalesce``), as the
#: bench's clients ask; one phase streams every token in its own frame to compare.
COALESCE = 8
#: Torch threads of the served model: one per core the server may use. On a shared
#: 2-core machine, two threads make oneDNN's prompt prefill 20-30x slower.
THREADS = 1
#: A reply that takes longer counts as an error (and the run goes on).
REPLY_TIMEOUT = 300
CLIENTS = 64
#: Each load runs this many times with new connections and sessions, so that its p99 is
#: not the second-slowest of 192 replies.
ROUNDS = 5
TARGET_TTFT_TEXT_MS, TARGET_TTFT_IMAGE_MS, TARGET_SPEEDUP = 50.0, 100.0, 10.0
#: Issue 19: a picture's TTFT p99 within 2x the text p99; the server's CPU per text reply
#: within 1.3x the engine alone's, its front end (the CPU beyond the engine alone's) half
#: that of the code before; 80% of the engine alone's tokens/s.
TARGET_IMAGE_VS_TEXT, TARGET_CPU_VS_ENGINE, TARGET_CPU_VS_BEFORE = 2.0, 1.3, 0.5
TARGET_VS_ENGINE = 0.8


@dataclass
class Phase:
    """One measured load: its replies' first-token times and tokens, and its wall time."""

    name: str
    clients: int
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    replies: int = 0
    errors: int = 0
    wall: float = 0.0
    #: CPU seconds the phase cost, when measured: the server's event-loop thread, its
    #: other threads (model, encoders, media), and this process's clients.
    cpu: dict[str, float] = field(default_factory=dict)
    #: Frames the clients received per reply (``started``, deltas, ``done``).
    frames: int = 0
    #: Each reply's ``done.timings`` (ms): where its first token's time went.
    timings: list[dict[str, float]] = field(default_factory=list)
    #: With a private Redis: its read events (about one per round trip) and commands
    #: over the phase.
    redis: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def _png() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), fill="red")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


async def _client_loop(url: str, phase: Phase, messages: int, attachments: list,
                       coalesce: int | None) -> None:
    from mmchat.client import Client

    client = await Client.connect(url, coalesce=coalesce)
    try:
        for i in range(messages):
            start = time.perf_counter()
            reply = await client.send(f"what colour is the circle? ({i})", attachments)
            try:
                await asyncio.wait_for(reply.__anext__(), REPLY_TIMEOUT)
                phase.ttft.append(time.perf_counter() - start)
                done = await reply.wait(REPLY_TIMEOUT)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                phase.errors += 1
                continue
            phase.tokens += done.usage.completion_tokens
            phase.replies += 1
            phase.frames += 2 + len(reply.deltas)
            phase.timings.append(dict(done.timings))
    finally:
        await client.close()


async def measure(url: str | list[str], name: str, clients: int, messages: int,
                  attachments: list = (), rounds: int = 1, pid: int | None = None,
                  coalesce: int | None = COALESCE, redis: Any = None) -> Phase:
    """``clients`` connections sending ``messages`` each, back to back, all at once; then
    again with new connections and sessions, ``rounds`` times in all. Wall time counts
    the rounds, not the pauses between them. With several URLs the clients take them in
    turn. With the server's ``pid`` (and Linux's /proc) the phase's CPU time is kept."""
    urls = [url] if isinstance(url, str) else url
    phase = Phase(name, clients)
    before = _cpu(pid, clients=True)
    stats = await _redis_stats(redis)
    for _ in range(rounds):
        start = time.perf_counter()
        await asyncio.gather(*(_client_loop(urls[i % len(urls)], phase, messages,
                                            list(attachments), coalesce)
                               for i in range(clients)))
        phase.wall += time.perf_counter() - start
    after = _cpu(pid, clients=True)
    if before and after:
        phase.cpu = {k: after[k] - before[k] for k in after}
    if redis is not None:
        phase.redis = {k: v - stats[k] - 1 for k, v in (await _redis_stats(redis)).items()}
    return phase


async def _redis_stats(client: Any) -> dict[str, int]:
    """A Redis's read events so far (about one per round trip: a pipeline is one) and
    commands; empty without a client."""
    if client is None:
        return {}
    info = await client.info("stats")
    return {"round trips": info["total_reads_processed"],
            "commands": info["total_commands_processed"]}


def _cpu(pid: int | None, *, clients: bool) -> dict[str, float]:
    """CPU seconds so far of process ``pid``: its main thread (the event loop) and its
    other threads (model, encoders, media), and with ``clients`` this process's; empty
    without a pid or /proc."""
    tasks = Path(f"/proc/{pid}/task")
    if pid is None or not tasks.is_dir():
        return {}
    main = other = 0.0
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            # nanoseconds on a CPU (the stat file's ticks are too coarse per reply)
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            if task.name == str(pid):
                main += seconds
            else:
                other += seconds
    cpu = {"event loop": main, "other threads": other}
    if clients:
        cpu["clients"] = time.process_time()
    return cpu


async def measure_engine(config, name: str, sessions: int, messages: int,
                         rounds: int = 1, warm_rounds: int = 0) -> Phase:
    """The same load on an in-process :class:`~mmchat.engine.Engine`, no server: what the
    model side gives by itself (with the collector set as ``mmchat serve`` sets it).
    ``warm_rounds`` more rounds run first, unmeasured (a new engine's first rounds cost
    more: its compiled decode step specialises on the first calls)."""
    from mmchat import Engine

    phase = Phase(name, sessions)
    threshold = gc.get_threshold()
    before: dict[str, float] = {}
    async with Engine(config) as engine:
        await engine.reply("warm-up", "hello")
        gc.freeze()  # as `mmchat serve` does (docs/api.md, "Latency under load")
        gc.set_threshold(700, 20, 100)

        async def session(session_id: str, phase: Phase) -> None:
            for m in range(messages):
                start = time.perf_counter()
                stream = await engine.stream(session_id, f"what colour is the circle? ({m})")
                await stream.__anext__()
                phase.ttft.append(time.perf_counter() - start)
                reply = await stream.wait()
                phase.tokens += reply.completion_tokens
                phase.replies += 1

        try:
            warm = Phase("warm-up", sessions)
            for r in range(warm_rounds):
                await asyncio.gather(*(session(f"w{r}-s{i}", warm) for i in range(sessions)))
            before = _cpu(os.getpid(), clients=False)
            for r in range(rounds):
                start = time.perf_counter()
                await asyncio.gather(*(session(f"r{r}-s{i}", phase)
                                       for i in range(sessions)))
                phase.wall += time.perf_counter() - start
            after = _cpu(os.getpid(), clients=False)
            if before and after:
                phase.cpu = {k: after[k] - before[k] for k in after}
        finally:
            gc.set_threshold(*threshold)
            gc.unfreeze()
    return phase


# Servers, each in its own process.

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_answers(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Process:
    """A server subprocess, ready once it prints its URL."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.argv, self.env, self.cwd = argv, env, cwd
        self.url = ""

    async def __aenter__(self) -> Process:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        log = []
        while line := (await asyncio.wait_for(self.proc.stdout.readline(), 300)).decode():
            log.append(line)
            found = re.search(r"(?:ready on|echo on) (ws://\S+)", line)
            if found:
                self.url = found.group(1)
                self._drain = asyncio.create_task(self._read_rest())
                return self
        raise RuntimeError("server exited:\n" + "".join(log))

    async def _read_rest(self) -> None:
        while await self.proc.stdout.readline():
            pass

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), 120)
        await self._drain


def _serve_argv(untrained: bool) -> list[str]:
    from mmchat.cli import build_cli

    if "serve" in build_cli().commands:
        argv = [sys.executable, "-m", "mmchat", "serve"]
    else:
        argv = [sys.executable, "-c", "import sys; from mmchat.commands.serve import "
                "serve_command; serve_command.main(sys.argv[1:], prog_name='mmchat serve')"]
    return [*argv, "--host", "127.0.0.1", "--port", str(_free_port()),
            *(["--untrained"] if untrained else [])]


def _serve_env(store: str, threads: int, url: str = "redis://127.0.0.1:6379/0"
               ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    env.update({"MMCHAT_MODEL__THREADS": str(threads),
                "MMCHAT_GENERATION__MAX_NEW_TOKENS": str(REPLY_TOKENS),
                "MMCHAT_GENERATION__STRATEGY": "greedy",
                "MMCHAT_SERVER__MESSAGES_PER_SECOND": "1000",
                "MMCHAT_SERVER__BURST": "1000",
                "MMCHAT_SERVER__PING_INTERVAL_SECONDS": "0",
                "MMCHAT_SESSIONS__BACKEND": store})
    if store == "redis":
        env.update({"MMCHAT_SESSIONS__URL": url,
                    "MMCHAT_SESSIONS__PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
                    "MMCHAT_SESSIONS__TTL_SECONDS": "600"})
    return env


async def echo_server(tokens: int) -> None:
    """The transport limit: hello gets ready, each message ``tokens`` deltas and a done,
    serialised by :mod:`mmchat.protocol` like the real server's."""
    from websockets.asyncio.server import serve

    from mmchat.protocol import (
        Delta,
        Done,
        Message,
        Ready,
        Started,
        Usage,
        parse_client_event,
        serialize,
    )

    async def handler(ws) -> None:
        seq = 0
        async for frame in ws:
            event = parse_client_event(frame)
            if not isinstance(event, Message):
                await ws.send(serialize(Ready(uuid.uuid4().hex)))
                continue
            rid = uuid.uuid4().hex
            seq += 1
            await ws.send(serialize(Started(event.id, rid, seq)))
            for _ in range(tokens):
                seq += 1
                await ws.send(serialize(Delta(rid, seq, " m")))
            seq += 1
            await ws.send(serialize(Done(rid, seq, " m" * tokens, "length",
                                         Usage(5, tokens))))

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"echo on ws://127.0.0.1:{port}/", flush=True)
        await asyncio.Future()


# The run.

@contextlib.contextmanager
def _baseline_tree(rev: str | None):
    """The repository at ``rev`` in a temporary folder (``git archive``), or ``None``."""
    if rev is None:
        yield None
        return
    import subprocess
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmchat-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


@contextlib.contextmanager
def _private_redis():
    """A throwaway ``redis-server`` (see :mod:`bench.bench_store`), so its counters are
    this run's alone; ``None`` without the binary."""
    import shutil

    if shutil.which("redis-server") is None:
        yield None
        return
    from bench.bench_store import PrivateRedis

    private = PrivateRedis()
    try:
        yield private
    finally:
        private.stop()


def _with_tree(env: dict[str, str], tree: Path) -> dict[str, str]:
    """``env`` with ``tree``'s code (and its plugins) first on the import path."""
    paths = [tree, *sorted((tree / "plugins").glob("*"))]
    return {**env, "PYTHONPATH": os.pathsep.join(str(p) for p in paths if p.is_dir())}


async def _run(quick: bool, clients: int, threads: int,
               baseline: str | None = None) -> tuple[str, list[Phase], str]:
    from mmchat.loading import checkpoint_path

    config = load_config()
    path = checkpoint_path(config)
    untrained = path is None or not path.exists()
    model = "untrained" if untrained else config.model.checkpoint
    png = _png()
    messages, baseline_messages = (1, 4) if quick else (3, 8)
    rounds = 1 if quick else ROUNDS
    phases: list[Phase] = []
    text, image = f"{clients} clients, text", f"{clients} clients, with an image"

    echo = [sys.executable, "-c", "import asyncio, sys; from bench.bench_server import "
            f"echo_server; asyncio.run(echo_server({REPLY_TOKENS}))"]
    async with Process(echo, dict(os.environ)) as server:
        await measure(server.url, "warm-up", 4, 1, coalesce=None)
        phases.append(await measure(server.url, "bare websockets echo", clients, messages,
                                    rounds=rounds, coalesce=None))

    async with Process(_serve_argv(untrained), _serve_env("memory", threads)) as server:
        await measure(server.url, "warm-up", 4, 1, [(png, "image/png")])
        phases.append(await measure(server.url, "mmchat, one request at a time", 1,
                                    baseline_messages, rounds=rounds))
        pid = server.proc.pid
        phases.append(await measure(server.url, f"mmchat, {text}", clients, messages,
                                    rounds=rounds, pid=pid))
        phases.append(await measure(server.url, f"mmchat, {text}, per-token deltas",
                                    clients, messages, rounds=rounds, pid=pid,
                                    coalesce=None))
        phases.append(await measure(server.url, f"mmchat, {image}", clients, messages,
                                    [(png, "image/png")], rounds=rounds, pid=pid))

    engine_config = config.replace(
        model={"threads": threads, **({"checkpoint": "untrained"} if untrained else {})},
        generation={"max_new_tokens": REPLY_TOKENS, "strategy": "greedy"},
        sessions={"backend": "memory"})
    phases.append(await measure_engine(engine_config, f"engine alone, {clients} sessions, "
                                       "text (no server)", clients, messages, rounds))

    with _private_redis() as private:
        redis_url = private.url if private is not None else "redis://127.0.0.1:6379/0"
        client = await private.client() if private is not None else None
        redis = client is not None or _redis_answers()
        with _baseline_tree(baseline) as tree:
            if tree is not None:  # the same loads on the code at `baseline`
                # coalesced as the new server's clients ask, if that code can, else per-token
                old_coalesce = COALESCE if (tree / "mmchat" / "coalesce.py").exists() else None
                for store in ("memory", "redis") if redis else ("memory",):
                    env = _with_tree(_serve_env(store, threads, redis_url), tree)
                    async with Process(_serve_argv(untrained), env, cwd=tree) as server:
                        await measure(server.url, "warm-up", 4, 1, coalesce=old_coalesce)
                        store_name = "" if store == "memory" else " + Redis store"
                        phases.append(await measure(
                            server.url, f"mmchat at {baseline}{store_name}, {text}", clients,
                            messages, rounds=rounds, pid=server.proc.pid,
                            coalesce=old_coalesce, redis=client if store == "redis" else None))
                        if store == "memory":
                            phases.append(await measure(
                                server.url, f"mmchat at {baseline}, {image}", clients,
                                messages, [(png, "image/png")], rounds=rounds,
                                pid=server.proc.pid, coalesce=old_coalesce))

        if redis:
            env = _serve_env("redis", threads, redis_url)
            async with Process(_serve_argv(untrained), env) as server:
                await measure(server.url, "warm-up", 4, 1)
                phases.append(await measure(server.url, f"mmchat + Redis store, {text}",
                                            clients, messages, rounds=rounds,
                                            pid=server.proc.pid, redis=client))
            async with Process(_serve_argv(untrained), env) as a, \
                    Process(_serve_argv(untrained), env) as b:
                await measure([a.url, b.url], "warm-up", 4, 1)
                phases.append(await measure([a.url, b.url], f"2 mmchat processes + Redis "
                                            f"store, {clients} clients (half each), text",
                                            clients, messages, rounds=rounds, redis=client))
        if client is not None:
            await client.aclose()
    sizes = config.model if untrained else _checkpoint_sizes(path)
    setup = (f"model: {sizes.rnn} {sizes.n_layer}x{sizes.n_hidden} ({model}), "
             f"fusion {sizes.fusion}, greedy, at most {REPLY_TOKENS}-token replies; "
             f"{messages} messages per client ({baseline_messages} for the baseline), "
             f"{rounds} rounds of each load with new clients; clients ask for "
             f"`coalesce` {COALESCE} unless the row says per-token (the baseline's "
             f"clients too where its code has the option, else per-token)")
    return setup, phases, machine_notes(threads)


def _checkpoint_sizes(path):
    """The model config a checkpoint folder was trained with."""
    from mmchat.checkpoint import read_meta
    from mmchat.model import DialogueConfig

    return DialogueConfig.from_dict(read_meta(path)["config"])


def _find(phases: list[Phase], name: str) -> Phase | None:
    return next((p for p in phases if p.name == name), None)


def _server_cpu(phase: Phase | None) -> float:
    """The server's CPU seconds per reply (event loop and other threads), or 0."""
    if phase is None or not phase.cpu or not phase.replies:
        return 0.0
    return (phase.cpu["event loop"] + phase.cpu["other threads"]) / phase.replies


def _checks(phases: list[Phase], clients: int) -> list[tuple[str, float, float, str, bool]]:
    """(what, measured, goal, unit, higher is better) for every target the run can tell."""
    base = phases[1]
    text = _find(phases, f"mmchat, {clients} clients, text")
    image = _find(phases, f"mmchat, {clients} clients, with an image")
    alone = next(p for p in phases if p.name.startswith("engine alone"))
    redis = _find(phases, f"mmchat + Redis store, {clients} clients, text")
    p99 = {p.name: percentile(p.ttft, 99) * 1000 for p in phases}
    checks = [
        ("time to first token p99, text", p99[text.name], TARGET_TTFT_TEXT_MS, "ms", False),
        ("time to first token p99, with an image", p99[image.name], TARGET_TTFT_IMAGE_MS,
         "ms", False),
        ("TTFT p99 with an image vs text", p99[image.name] / p99[text.name],
         TARGET_IMAGE_VS_TEXT, "x", False),
        ("aggregate tokens/s vs one at a time", text.tokens_per_second /
         base.tokens_per_second, TARGET_SPEEDUP, "x", True),
        ("tokens/s vs the engine alone", text.tokens_per_second /
         max(alone.tokens_per_second, 1e-9), TARGET_VS_ENGINE, "x", True),
    ]
    engine_cpu = _server_cpu(alone)
    for store, phase in (("memory", text), ("Redis", redis)):
        if engine_cpu and _server_cpu(phase):
            checks.append((f"server CPU per text reply vs the engine alone's, {store} store",
                           _server_cpu(phase) / engine_cpu, TARGET_CPU_VS_ENGINE, "x",
                           False))
    for old in phases:  # the front end's share: the server's CPU beyond the engine's
        if old.name.startswith("mmchat at ") and old.name.endswith(", text"):
            now = redis if "Redis" in old.name else text
            before = _server_cpu(old) - engine_cpu
            if engine_cpu and _server_cpu(now) and before > 0:
                checks.append((f"front-end CPU per text reply (server - engine alone) vs "
                               f"{old.name.split(',')[0]}",
                               (_server_cpu(now) - engine_cpu) / before,
                               TARGET_CPU_VS_BEFORE, "x", False))
    return checks


def report(setup: str, phases: list[Phase], notes: str) -> str:
    echo, base = phases[0], phases[1]
    rows = []
    for p in phases:
        ratio = f"{p.tokens_per_second / base.tokens_per_second:.1f}x" if p is not echo else "-"
        rows.append([p.name, p.clients, p.replies, p.errors, p.tokens, f"{p.wall:.2f}",
                     f"{p.tokens_per_second:,.0f}", ratio,
                     f"{percentile(p.ttft, 50) * 1000:.1f}",
                     f"{percentile(p.ttft, 99) * 1000:.1f}"])
    text = _find(phases, f"mmchat, {echo.clients} clients, text")
    alone = next(p for p in phases if p.name.startswith("engine alone"))
    targets = [[what, f"{value:.2f} {unit}", f"{'>=' if higher else '<='} {goal:g} {unit}",
                "met" if (value >= goal if higher else value <= goal) else "MISSED"]
               for what, value, goal, unit, higher in _checks(phases, echo.clients)]
    return "\n".join([
        "## Serving over WebSocket (`bench/bench_server.py`)",
        "",
        "Command: `python -m bench server` (with `python -m bench.bench_server --baseline "
        "REV` the same loads also run on a server built from the code at REV, in the same "
        "run)",
        "",
        f"Machine: {notes}. Servers and clients share the machine, on loopback; {setup}. "
        "Tokens/s counts reply tokens (the echo server's frames) over the phase's wall "
        "time; time to first token runs from sending a message to its first delta.",
        "",
        table(["server and load", "clients", "replies", "errors", "tokens", "wall s",
               "tokens/s", "vs one at a time", "TTFT p50 ms", "TTFT p99 ms"], rows),
        "",
        table(["target", "measured", "goal", ""], targets),
        "",
        f"The echo server bounds what the transport and the clients can carry: "
        f"{echo.tokens_per_second:,.0f} frames/s with {echo.clients} clients, "
        f"{echo.tokens_per_second / max(text.tokens_per_second, 1e-9):.1f}x what mmchat "
        f"streams. The engine alone, same load without server or clients, gives "
        f"{alone.tokens_per_second:,.0f} tokens/s and a first token at "
        f"{percentile(alone.ttft, 50) * 1000:.0f} ms (p50): serving keeps "
        f"{text.tokens_per_second / max(alone.tokens_per_second, 1e-9):.0%} of its "
        "throughput while sharing the cores with the clients.",
        "",
        *_cpu_table(phases),
        *_timings_table(phases),
        *_redis_table(phases),
        *_scale_out(phases),
        "Every client sends its next message as soon as its reply is done, so the 64 "
        "messages of a round arrive together. The engine decodes all running replies in "
        "one batched step per token and prefills the turns that arrived meanwhile as one "
        "batch between two steps; the engine-alone row shows the first-token times "
        "without any server, and the server's own share is the gap between the mmchat "
        "rows and the engine-alone row.",
        "",
    ])


def _cpu_table(phases: list[Phase]) -> list[str]:
    """CPU milliseconds per reply, by thread, where the phases measured it, and each
    as a multiple of the engine alone's."""
    measured = [p for p in phases if p.cpu and p.replies]
    if not measured:
        return []
    alone = next((p for p in measured if p.name.startswith("engine alone")), None)
    engine = _server_cpu(alone)
    rows = []
    for p in measured:
        server = _server_cpu(p)
        rows.append([p.name, f"{p.cpu['event loop'] / p.replies * 1000:.2f}",
                     f"{p.cpu['other threads'] / p.replies * 1000:.2f}",
                     f"{server * 1000:.2f}",
                     f"{server / engine:.2f}x" if engine else "-",
                     f"{p.cpu['clients'] / p.replies * 1000:.2f}" if "clients" in p.cpu
                     else "-",
                     f"{p.frames / p.replies:.1f}" if p.frames else "-",
                     f"{sum(p.cpu.values()) / p.wall:.2f}"])
    return ["CPU per reply (ms, per thread from /proc's schedstat; for the engine alone, this "
            "process's event loop and model thread). A process's Python holds one "
            "interpreter lock, so its threads together run on about one core:", "",
            table(["load", "event loop", "other threads (model ...)", "server total",
                   "vs engine alone", "clients", "frames per reply", "cores busy"], rows),
            ""]


def _timings_table(phases: list[Phase]) -> list[str]:
    """Where the first token's time goes in the server, from each reply's ``done``."""
    measured = [p for p in phases if p.timings and p.name.startswith("mmchat")
                and p.clients > 1]
    if not measured:
        return []
    names = ("queue", "decode_media", "prefill", "first_token")
    rows = []
    for p in measured:
        cells = []
        for name in names:
            values = [t.get(name, 0.0) / 1000 for t in p.timings]
            cells.append(f"{sum(values) / len(values) * 1000:.1f} / "
                         f"{percentile(values, 99) * 1000:.1f}")
        rows.append([p.name, *cells])
    return ["Where a reply's first token waits, inside the server (each `done`'s timings, "
            "ms, mean / p99: `queue` for the session, `decode_media` decoding and "
            "encoding attachments, `prefill` waiting for and running the batched "
            "prefill, `first_token` all of it from the turn's start):", "",
            table(["load", *names], rows), ""]


def _redis_table(phases: list[Phase]) -> list[str]:
    """Redis round trips and commands per reply, from the private Redis's counters."""
    measured = [p for p in phases if p.redis and p.replies]
    if not measured:
        return []
    rows = [[p.name, f"{p.redis['round trips'] / p.replies:.2f}",
             f"{p.redis['commands'] / p.replies:.2f}"] for p in measured]
    return ["Redis per reply (a private `redis-server`'s `total_reads_processed`, about "
            "one per round trip since a pipeline is read at once, and "
            "`total_commands_processed`; the connections' hellos included):", "",
            table(["load", "round trips", "commands"], rows), ""]


def _scale_out(phases: list[Phase]) -> list[str]:
    """A paragraph on the two-process row, when Redis was there to run it."""
    one = next((p for p in phases if p.name.startswith("mmchat + Redis")), None)
    two = next((p for p in phases if p.name.startswith("2 mmchat processes")), None)
    if one is None or two is None or not one.tokens_per_second:
        return []
    return [f"Two server processes sharing one Redis stream "
            f"{two.tokens_per_second:,.0f} tokens/s, "
            f"{two.tokens_per_second / one.tokens_per_second:.2f}x one Redis-backed process: "
            "a process's Python runs on about one core, and more processes are how a "
            "node uses more (here two cores are shared with the clients and Redis).", ""]


def write_doc(section: str) -> None:
    write_section("bench_server", section)


def run(quick: bool = False, clients: int = CLIENTS, threads: int = THREADS,
        baseline: str | None = None) -> str:
    setup, phases, notes = asyncio.run(_run(quick, clients, threads, baseline))
    section = report(setup, phases, notes)
    if not quick:
        write_doc(section)
    return section


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one message per client, nothing written to docs/")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads of the served model (model.threads)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also measure a server built from the code at this git "
                             "revision (git archive) in the same run (its clients ask "
                             "for coalesced deltas where that code can)")
    args = parser.parse_args()
    print(run(args.quick, args.clients, args.threads, args.baseline))
