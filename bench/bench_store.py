"""Sizing a deployment: memory per session, per picture, per connection and per node.

Measured in one run against ``mmchat serve`` (the model ``config.toml`` serves, in its
own process) with the Redis session store on a private ``redis-server`` started here
(never the shared one on 6379):

* per node: the server process's resident memory (RSS) once it has served a warm-up;
* per session: Redis ``used_memory`` after ``SESSIONS`` new sessions of one short text
  turn each, less before, divided by ``SESSIONS`` (the server's RSS likewise);
* per picture: the same with one 96x96 PNG in each session's turn, less a text session;
* per connection: the server's RSS with ``CONNECTIONS`` idle connections open (each
  said hello), less before, divided by ``CONNECTIONS``;
* per session at the caps: a session's Redis keys (``MEMORY USAGE``) after ``LONG``
  picture turns, bounded by ``[sessions]`` ``history_max_len`` and ``stream_max_len``
  and ``fusion.max_memory`` however long it runs;
* the in-process store over time: a server with ``backend = "memory"`` and a TTL of
  ``TTL`` seconds serves ``PHASES`` phases of ``SESSIONS`` sessions (a picture each),
  each phase after the sessions of the one before expired; its RSS after each phase,
  against the first (expired sessions are freed without being looked up, so it levels
  off).

    python -m bench store           python -m bench.bench_store --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from bench import load_config, machine_notes, table
from bench.bench_server import Process, _free_port, _png, _serve_argv, _serve_env

SESSIONS = 200
CONNECTIONS = 200
LONG = 40
PHASES = 3
TTL = 3


def _rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class PrivateRedis:
    """A throwaway ``redis-server`` on a free port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench store needs redis-server (apt-get install redis-server)")
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-store-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def client(self):
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.url)
        for _ in range(500):
            try:
                await client.ping()
                return client
            except (redis.exceptions.ConnectionError, OSError):
                await asyncio.sleep(0.02)
        raise RuntimeError("the private redis-server did not answer")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _used(client) -> int:
    return (await client.info("memory"))["used_memory"]


async def _sessions(url: str, count: int, attachments: list) -> list[str]:
    from mmchat.client import Client

    async def one() -> str:
        async with await Client.connect(url) as client:
            await client.reply("hello there", attachments, timeout=300)
            return client.session_id

    out = []
    for start in range(0, count, 16):  # 16 at a time: a loaded machine keeps up
        out += await asyncio.gather(*(one() for _ in range(min(16, count - start))))
    return out


async def _memory_phases(untrained: bool, ttl: int, sessions: int,
                         attachments: list) -> list[int]:
    """Server RSS after each phase of ``sessions`` new sessions, in-process store with
    a TTL of ``ttl`` seconds; each phase starts once the one before has expired."""
    env = _serve_env("memory", 1)
    env["MMCHAT_SESSIONS__TTL_SECONDS"] = str(ttl)
    levels = []
    async with Process(_serve_argv(untrained), env) as server:
        await _sessions(server.url, 4, attachments)  # warm-up
        for _ in range(PHASES):
            await _sessions(server.url, sessions, attachments)
            levels.append(_rss(server.proc.pid))
            await asyncio.sleep(TTL + 1)
    return levels


async def _run(quick: bool) -> tuple[list[list[object]], str]:
    from mmchat.client import Client

    config = load_config()
    untrained = not (config.model.checkpoint
                     and config.resolve(config.model.checkpoint).exists())
    sessions, connections, long = (30, 30, 20) if quick else (SESSIONS, CONNECTIONS, LONG)
    png = [(_png(), "image/png")]
    redis = PrivateRedis()
    try:
        client = await redis.client()
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        env = _serve_env("redis", 1)
        env.update({"MMCHAT_SESSIONS__URL": redis.url, "MMCHAT_SESSIONS__PREFIX": prefix,
                    "MMCHAT_SERVER__MAX_CONNECTIONS": str(connections + 64)})
        async with Process(_serve_argv(untrained), env) as server:
            pid = server.proc.pid
            await _sessions(server.url, 4, png)  # warm-up
            node = _rss(pid)

            rss = _rss(pid)  # before any session: freed memory would hide connections
            idle = [await Client.connect(server.url) for _ in range(connections)]
            conn_rss = (_rss(pid) - rss) / connections
            for c in idle:
                await c.close()

            used, rss = await _used(client), _rss(pid)
            await _sessions(server.url, sessions, [])
            text_redis = (await _used(client) - used) / sessions
            text_rss = (_rss(pid) - rss) / sessions

            used = await _used(client)
            await _sessions(server.url, sessions, png)
            picture_redis = (await _used(client) - used) / sessions - text_redis

            async with await Client.connect(server.url) as chat:
                for n in range(long):
                    await chat.reply(f"and now? {n}", png, timeout=300)
                keys = [f"{prefix}:s:{{{chat.session_id}}}:{name}" for name in
                        ("state", "memory", "history", "meta", "stream", "msgids")]
                sizes = [await client.memory_usage(k) or 0 for k in keys]
    finally:
        redis.stop()

    levels = {ttl: await _memory_phases(untrained, ttl, sessions, png)
              for ttl in (TTL, 86_400)}
    kb = lambda n: f"{n / 1024:.1f} KB"  # noqa: E731
    s = config.sessions
    rows = [
        ["node (server RSS after a warm-up)", f"{node / 2**20:.0f} MB", ""],
        ["session, one short text turn (Redis)", kb(text_redis),
         f"server RSS grew {kb(text_rss)} a session meanwhile"],
        ["picture held (Redis, on top of a session)", kb(picture_redis),
         f"at most fusion.max_memory = {config.fusion.max_memory} a session"],
        ["idle connection (server RSS)", kb(conn_rss), ""],
        [f"session after {long} picture turns (Redis, its keys)", kb(sum(sizes)),
         f"state {kb(sizes[0])}, memory {kb(sizes[1])}, history {kb(sizes[2])}, "
         f"stream {kb(sizes[4])}; bounded by history_max_len = {s.history_max_len}, "
         f"stream_max_len = {s.stream_max_len}"],
        *([f"in-process store: server RSS after each of {PHASES} phases of {sessions} "
           f"sessions with a picture, TTL {ttl}s",
           " → ".join(f"{n / 2**20:.0f} MB" for n in rss),
           f"last / first = {rss[-1] / rss[0]:.2f}"
           + (" (the baseline: nothing expires)" if ttl != TTL else "")]
          for ttl, rss in levels.items()),
    ]
    notes = (f"{machine_notes(1)}; model: "
             f"{'untrained' if untrained else config.model.checkpoint}; {sessions} sessions "
             f"per phase, {connections} idle connections")
    return rows, notes


def run(quick: bool = False) -> str:
    start = time.perf_counter()
    rows, notes = asyncio.run(_run(quick))
    return (table(["what", "memory", "notes"], rows)
            + f"\n\n{notes}; {time.perf_counter() - start:.0f}s.\n")


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
    os._exit(0)
