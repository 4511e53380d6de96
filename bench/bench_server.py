"""WebSocket serving: streamed tokens/s and time to first token with 64 clients.

Measured in one run, each server in its own process and every client in this one,
all on loopback, through :class:`mmchat.client.Client`:

* a bare ``websockets`` server that answers each message with as many frames as a
  reply has tokens, written with the same protocol code: the transport limit;
* ``mmchat serve`` with one client sending one message at a time: the baseline;
* ``mmchat serve`` with 64 clients at once, each sending messages back to back, text
  only and with a 96x96 PNG; and once more with the Redis session store when a Redis
  answers on 127.0.0.1:6379, by one server and by two sharing it (scale-out on one
  machine).

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

from bench import ROOT, load_config, machine_notes, percentile, table, write_section

REPLY_TOKENS = 32
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


async def _client_loop(url: str, phase: Phase, messages: int, attachments: list) -> None:
    from mmchat.client import Client

    client = await Client.connect(url)
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
    finally:
        await client.close()


async def measure(url: str | list[str], name: str, clients: int, messages: int,
                  attachments: list = (), rounds: int = 1, pid: int | None = None) -> Phase:
    """``clients`` connections sending ``messages`` each, back to back, all at once; then
    again with new connections and sessions, ``rounds`` times in all. Wall time counts
    the rounds, not the pauses between them. With several URLs the clients take them in
    turn. With the server's ``pid`` (and Linux's /proc) the phase's CPU time is kept."""
    urls = [url] if isinstance(url, str) else url
    phase = Phase(name, clients)
    before = _cpu(pid)
    for _ in range(rounds):
        start = time.perf_counter()
        await asyncio.gather(*(_client_loop(urls[i % len(urls)], phase, messages,
                                            list(attachments)) for i in range(clients)))
        phase.wall += time.perf_counter() - start
    after = _cpu(pid)
    if before and after:
        phase.cpu = {k: after[k] - before[k] for k in after}
    return phase


def _cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far: server process ``pid``'s main thread and other threads, and
    this process; empty without a pid or /proc."""
    tasks = Path(f"/proc/{pid}/task")
    if pid is None or not tasks.is_dir():
        return {}
    main = other = 0.0
    for task in tasks.iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if task.name == str(pid):
                main += seconds
            else:
                other += seconds
    return {"server event loop": main, "server other threads": other,
            "clients": time.process_time()}


async def measure_engine(config, name: str, sessions: int, messages: int,
                         rounds: int = 1) -> Phase:
    """The same load on an in-process :class:`~mmchat.engine.Engine`, no server: what the
    model side gives by itself (with the collector set as ``mmchat serve`` sets it)."""
    from mmchat import Engine

    phase = Phase(name, sessions)
    threshold = gc.get_threshold()
    async with Engine(config) as engine:
        await engine.reply("warm-up", "hello")
        gc.freeze()  # as `mmchat serve` does (docs/api.md, "Latency under load")
        gc.set_threshold(700, 20, 100)

        async def session(session_id: str) -> None:
            for m in range(messages):
                start = time.perf_counter()
                stream = await engine.stream(session_id, f"what colour is the circle? ({m})")
                await stream.__anext__()
                phase.ttft.append(time.perf_counter() - start)
                reply = await stream.wait()
                phase.tokens += reply.completion_tokens
                phase.replies += 1

        try:
            for r in range(rounds):
                start = time.perf_counter()
                await asyncio.gather(*(session(f"r{r}-s{i}") for i in range(sessions)))
                phase.wall += time.perf_counter() - start
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


def _serve_env(store: str, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
    env.update({"MMCHAT_MODEL__THREADS": str(threads),
                "MMCHAT_GENERATION__MAX_NEW_TOKENS": str(REPLY_TOKENS),
                "MMCHAT_GENERATION__STRATEGY": "greedy",
                "MMCHAT_SERVER__MESSAGES_PER_SECOND": "1000",
                "MMCHAT_SERVER__BURST": "1000",
                "MMCHAT_SERVER__PING_INTERVAL_SECONDS": "0",
                "MMCHAT_SESSIONS__BACKEND": store})
    if store == "redis":
        env.update({"MMCHAT_SESSIONS__URL": "redis://127.0.0.1:6379/0",
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

async def _run(quick: bool, clients: int, threads: int) -> tuple[str, list[Phase], str]:
    from mmchat.loading import checkpoint_path

    config = load_config()
    path = checkpoint_path(config)
    untrained = path is None or not path.exists()
    model = "untrained" if untrained else config.model.checkpoint
    png = _png()
    messages, baseline_messages = (1, 4) if quick else (3, 8)
    rounds = 1 if quick else ROUNDS
    phases: list[Phase] = []

    echo = [sys.executable, "-c", "import asyncio, sys; from bench.bench_server import "
            f"echo_server; asyncio.run(echo_server({REPLY_TOKENS}))"]
    async with Process(echo, dict(os.environ)) as server:
        await measure(server.url, "warm-up", 4, 1)
        phases.append(await measure(server.url, "bare websockets echo", clients, messages,
                                    rounds=rounds))

    async with Process(_serve_argv(untrained), _serve_env("memory", threads)) as server:
        await measure(server.url, "warm-up", 4, 1, [(png, "image/png")])
        phases.append(await measure(server.url, "mmchat, one request at a time", 1,
                                    baseline_messages, rounds=rounds))
        pid = server.proc.pid
        phases.append(await measure(server.url, f"mmchat, {clients} clients, text", clients,
                                    messages, rounds=rounds, pid=pid))
        phases.append(await measure(server.url, f"mmchat, {clients} clients, with an image",
                                    clients, messages, [(png, "image/png")], rounds=rounds,
                                    pid=pid))

    engine_config = config.replace(
        model={"threads": threads, **({"checkpoint": "untrained"} if untrained else {})},
        generation={"max_new_tokens": REPLY_TOKENS, "strategy": "greedy"},
        sessions={"backend": "memory"})
    phases.append(await measure_engine(engine_config, f"engine alone, {clients} sessions, "
                                       "text (no server)", clients, messages, rounds))

    if _redis_answers():
        env = _serve_env("redis", threads)
        async with Process(_serve_argv(untrained), env) as server:
            await measure(server.url, "warm-up", 4, 1)
            phases.append(await measure(server.url,
                                        f"mmchat + Redis store, {clients} clients, text",
                                        clients, messages, rounds=rounds))
        async with Process(_serve_argv(untrained), env) as a, \
                Process(_serve_argv(untrained), env) as b:
            await measure([a.url, b.url], "warm-up", 4, 1)
            phases.append(await measure([a.url, b.url], f"2 mmchat processes + Redis store, "
                                        f"{clients} clients (half each), text", clients,
                                        messages, rounds=rounds))
    sizes = config.model if untrained else _checkpoint_sizes(config.resolve(model))
    setup = (f"model: {sizes.rnn} {sizes.n_layer}x{sizes.n_hidden} ({model}), "
             f"fusion {sizes.fusion}, greedy, at most {REPLY_TOKENS}-token replies; "
             f"{messages} messages per client ({baseline_messages} for the baseline), "
             f"{rounds} rounds of each load with new clients")
    return setup, phases, machine_notes(threads)


def _checkpoint_sizes(path):
    """The model config a checkpoint folder was trained with."""
    from mmchat.checkpoint import read_meta
    from mmchat.model import DialogueConfig

    return DialogueConfig.from_dict(read_meta(path)["config"])


def report(setup: str, phases: list[Phase], notes: str) -> str:
    echo, base = phases[0], phases[1]
    rows = []
    for p in phases:
        ratio = f"{p.tokens_per_second / base.tokens_per_second:.1f}x" if p is not echo else "-"
        rows.append([p.name, p.clients, p.replies, p.errors, p.tokens, f"{p.wall:.2f}",
                     f"{p.tokens_per_second:,.0f}", ratio,
                     f"{percentile(p.ttft, 50) * 1000:.1f}",
                     f"{percentile(p.ttft, 99) * 1000:.1f}"])
    text = next(p for p in phases if p.name == f"mmchat, {echo.clients} clients, text")
    alone = next(p for p in phases if p.name.startswith("engine alone"))
    image = next(p for p in phases if p.name.endswith("with an image"))
    checks = [
        ("time to first token p99, text", percentile(text.ttft, 99) * 1000,
         TARGET_TTFT_TEXT_MS, "ms", False),
        ("time to first token p99, with an image", percentile(image.ttft, 99) * 1000,
         TARGET_TTFT_IMAGE_MS, "ms", False),
        ("aggregate tokens/s vs one at a time", text.tokens_per_second /
         base.tokens_per_second, TARGET_SPEEDUP, "x", True),
    ]
    targets = [[what, f"{value:.1f} {unit}", f"{'>=' if higher else '<='} {goal:g} {unit}",
                "met" if (value >= goal if higher else value <= goal) else "MISSED"]
               for what, value, goal, unit, higher in checks]
    return "\n".join([
        "## Serving over WebSocket (`bench/bench_server.py`)",
        "",
        "Command: `python -m bench server`",
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
    """CPU milliseconds per reply, where the phases measured it."""
    measured = [p for p in phases if p.cpu and p.replies]
    if not measured:
        return []
    names = list(measured[0].cpu)
    rows = [[p.name, *(f"{p.cpu[n] / p.replies * 1000:.2f}" for n in names),
             f"{sum(p.cpu.values()) / p.wall:.2f}"] for p in measured]
    return ["CPU per reply (ms, from /proc and this process's CPU time; the server's "
            "Python holds one interpreter lock, so its threads together run on about one "
            "core):", "",
            table(["load", *names, "cores busy"], rows), ""]


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


def run(quick: bool = False, clients: int = CLIENTS, threads: int = THREADS) -> str:
    setup, phases, notes = asyncio.run(_run(quick, clients, threads))
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
    args = parser.parse_args()
    print(run(args.quick, args.clients, args.threads))
