"""``mmchat serve --workers N``: real supervisor and worker processes on one port, a real
Redis (started on a free port), real WebSocket clients.

Which worker took a connection is read from the handshake's ``X-Mmchat-Worker``
header; the kernel spreads connections over the workers (SO_REUSEPORT), so the tests
connect until they reach the worker they want.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import urllib.request
from collections.abc import AsyncIterator

import pytest
from test_redis_store import (  # noqa: F401  (a fixture)
    _free_port,
    needs_redis,
    redis_server,
)
from test_scaleout import SUBPROCESS_TEST_S, node_env, serve_argv
from test_server import check_reply, http_get

from mmchat import config as config_module
from mmchat.client import Client
from mmchat.errors import ConfigError
from mmchat.server.workers import available_cores, worker_count

#: Connections to try before concluding the kernel never hands one to a worker (with two
#: listening workers, the chance that 200 all go to one is 2**-199).
TRIES = 200
#: The voice plugin is not needed here; its warm-up is most of a worker's start.
QUICK = {"MMCHAT_PLUGINS__DISABLED": "voice"}


class Supervised:
    """A ``mmchat serve --workers N`` process whose log lines the test can wait for."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._grew = asyncio.Condition()
        self.url = ""

    async def read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._grew:
                self.lines.append(line.decode(errors="replace"))
                self._grew.notify_all()
        async with self._grew:
            self.lines.append("")  # the end
            self._grew.notify_all()

    async def wait_for(self, pattern: str, start: int = 0) -> re.Match[str]:
        """The first log line from ``start`` on that matches ``pattern``."""
        async with self._grew:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if found := re.search(pattern, line):
                        return found
                    if line == "":
                        raise AssertionError(f"no line matched {pattern!r}:\n{self.log}")
                seen = len(self.lines)
                await self._grew.wait()

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextlib.asynccontextmanager
async def supervisor(env: dict[str, str], tmp_path, workers: int = 2
                     ) -> AsyncIterator[Supervised]:
    metrics = tmp_path / "metrics"  # PROMETHEUS_MULTIPROC_DIR: kept under tmp_path
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(), "--untrained", "--host", "127.0.0.1", "--port", "0", "--workers",
        str(workers), env={**env, **QUICK, "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    sup = Supervised(proc)
    reader = asyncio.create_task(sup.read())
    try:
        sup.url = (await sup.wait_for(r"mmchat ready on (ws://\S+) \(")).group(1)
        yield sup
    finally:
        if proc.returncode is None:
            proc.kill()  # the workers see their standard input close and stop
        await proc.wait()
        await reader


def worker_of(client: Client) -> tuple[int, int]:
    """(worker number, pid) from the handshake."""
    number, _, pid = client.server_headers["X-Mmchat-Worker"].partition(" pid ")
    return int(number), int(pid)


async def connect_to(url: str, want: set[int] | None = None, **options) -> Client:
    """A client on a worker whose pid is in ``want`` (any worker when None)."""
    for _ in range(TRIES):
        client = await Client.connect(url, **options)
        if want is None or worker_of(client)[1] in want:
            return client
        await client.close()
    raise AssertionError(f"{TRIES} connections, none to pid {want}")


async def pids_serving(url: str, count: int) -> set[int]:
    """Connect until ``count`` different workers have answered; their pids."""
    pids: set[int] = set()
    for _ in range(TRIES):
        client = await Client.connect(url)
        pids.add(worker_of(client)[1])
        await client.close()
        if len(pids) == count:
            return pids
    raise AssertionError(f"{TRIES} connections reached only the workers {pids}")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


# Settings, without processes.

def test_the_workers_setting_takes_a_number_or_auto():
    load = config_module.from_dict
    assert load({}).server.workers == 1
    assert load({"server": {"workers": 3}}).server.workers == 3
    assert load({}, env={"MMCHAT_SERVER__WORKERS": "auto"}).server.workers == "auto"
    assert load({}, env={"MMCHAT_SERVER__WORKERS": "4"}).server.workers == 4
    for bad, why in ((0, "minimum is 1"), ("many", "a whole number or 'auto'"),
                     (True, "a whole number or 'auto'"), (2.5, "a whole number")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            load({"server": {"workers": bad}})


def test_more_than_one_worker_needs_the_redis_store():
    redis = {"sessions": {"backend": "redis"}}
    assert worker_count(config_module.from_dict({"server": {"workers": 3}, **redis})) == 3
    auto = config_module.from_dict({"server": {"workers": "auto"}, **redis})
    assert worker_count(auto) == available_cores()
    assert worker_count(config_module.from_dict({})) == 1
    with pytest.raises(ConfigError, match="needs sessions.backend = 'redis'"):
        worker_count(config_module.from_dict({"server": {"workers": 2}}))


async def test_serve_refuses_workers_with_the_memory_store(tmp_path):
    env = {**node_env("redis://unused", "unused"), "MMCHAT_SESSIONS__BACKEND": "memory"}
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(), "--untrained", "--port", "0", "--workers", "2", env=env,
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TEST_S)
    assert proc.returncode == 2
    assert "server.workers = 2 needs sessions.backend = 'redis'" in err.decode()


# Real workers.

async def test_a_worker_that_cannot_start_stops_them_all(tmp_path):
    env = {**node_env("redis://127.0.0.1:1/0", "unused"), **QUICK}
    proc = await asyncio.create_subprocess_exec(
        *serve_argv(), "--checkpoint", str(tmp_path / "missing"), "--port", "0",
        "--workers", "2", env=env, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TEST_S)
    log = err.decode()
    assert proc.returncode == 1, log
    assert re.search(r"\[worker \d\] mmchat.server.worker: model.checkpoint .*missing does "
                     r"not exist", log), log
    assert re.search(r"worker \d \(pid \d+\) exited with status 2 before it listened; "
                     "stopping the others", log), log
    assert "Traceback" not in log

@needs_redis
async def test_two_workers_share_the_port_a_session_and_their_metrics(redis_url, prefix,
                                                                      tmp_path):
    env = node_env(redis_url, prefix)
    async with asyncio.timeout(SUBPROCESS_TEST_S), supervisor(env, tmp_path) as sup:
        one, two = sorted(await pids_serving(sup.url, 2))
        on_one = await connect_to(sup.url, {one})
        first = await on_one.reply("hello", timeout=60)
        await on_one.close()
        on_two = await connect_to(sup.url, {two}, session_id=on_one.session_id,
                                  last_seq=on_one.last_seq)
        assert on_two.ready.resumed
        second = await on_two.reply("and then?", timeout=60)
        await on_two.close()
        assert second.started.seq == first.done.seq + 1
        check_reply(second)
        # Whichever worker answers /metrics, it counts both workers' replies.
        base = sup.url.replace("ws://", "http://", 1).rstrip("/")
        for _ in range(4):
            status, _, body = await asyncio.to_thread(http_get, base + "/metrics")
            assert status == 200
            assert metric(body, "mmchat_turns_total") == 2
            assert metric(body, "mmchat_connections_opened_total") >= 2
        assert list((tmp_path / "metrics").glob("counter_*.db"))  # the folder given
        # The port is taken: a second `serve --workers` is refused, not let in beside.
        port = sup.url.rsplit(":", 1)[1].strip("/")
        second = await asyncio.create_subprocess_exec(
            *serve_argv(), "--untrained", "--port", port, "--workers", "2", env=env,
            cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await second.communicate()
        assert second.returncode == 2
        assert f"cannot bind 127.0.0.1:{port}" in err.decode()
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.proc.wait() == 0


@needs_redis
async def test_sigterm_drains_every_worker(redis_url, prefix, tmp_path):
    """Long replies (2000 tokens), so that both are still running when SIGTERM comes."""
    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="2000")
    async with asyncio.timeout(SUBPROCESS_TEST_S), supervisor(env, tmp_path) as sup:
        pids = sorted(await pids_serving(sup.url, 2))
        clients = [await connect_to(sup.url, {pid}) for pid in pids]
        replies = [await c.send("hello") for c in clients]
        for reply in replies:
            await reply.__anext__()
        sup.proc.send_signal(signal.SIGTERM)
        for client, reply in zip(clients, replies):
            done = await reply.wait(120)
            assert (done.finish_reason, done.usage.completion_tokens) == ("length", 2000)
            check_reply(reply)
            event = await client.next_event(60)
            assert (event.code, event.fatal) == ("going_away", True)
        assert await sup.proc.wait() == 0
        assert [c.close_code for c in clients] == [1001, 1001]
    for pid in pids:
        assert re.search(rf"worker \d \(pid {pid}\) stopped \(status 0\)", sup.log), sup.log
    assert sup.log.count("draining: 1 replies in flight") == 2, sup.log


@needs_redis
async def test_a_killed_worker_is_restarted_and_sighup_replaces_each(redis_url, prefix,
                                                                     tmp_path):
    env = node_env(redis_url, prefix, MMCHAT_GENERATION__MAX_NEW_TOKENS="300")
    async with asyncio.timeout(SUBPROCESS_TEST_S), supervisor(env, tmp_path) as sup:
        pids = await pids_serving(sup.url, 2)
        survivor = await connect_to(sup.url)
        number, victim = worker_of(await connect_to(sup.url, pids - {worker_of(survivor)[1]}))
        mark = len(sup.lines)
        os.kill(victim, signal.SIGKILL)
        await sup.wait_for(rf"worker {number} \(pid {victim}\) exited with status -9; "
                           "starting it again", mark)
        check_reply(await survivor.reply("still there?", timeout=60))
        reborn = int((await sup.wait_for(rf"worker {number} \(pid (\d+)\) ready",
                                         mark)).group(1))
        assert reborn != victim
        assert await pids_serving(sup.url, 2) == pids - {victim} | {reborn}

        # SIGHUP: each worker in turn is replaced; a reply in flight on one finishes.
        mark = len(sup.lines)
        reply = await survivor.send("a long story")
        await reply.__anext__()
        sup.proc.send_signal(signal.SIGHUP)
        await sup.wait_for("rolling restart done", mark)
        assert (await reply.wait(120)).usage.completion_tokens == 300
        check_reply(reply)
        new = {int(p) for p in re.findall(r"worker \d \(pid (\d+)\) ready",
                                          "".join(sup.lines[mark:]))}
        assert len(new) == 2 and not new & (pids | {reborn})
        assert await pids_serving(sup.url, 2) == new
        await survivor.close()
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.proc.wait() == 0


def _complete(url: str, messages: list[dict[str, str]]) -> tuple[int, dict]:
    """POST a chat completion on a new connection: (the answering worker's pid, body)."""
    request = urllib.request.Request(url, json.dumps({"model": "mmchat", "messages": messages})
                                     .encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        pid = int(response.headers["X-Mmchat-Worker"].partition(" pid ")[2])
        return pid, json.loads(response.read())


@needs_redis
async def test_both_workers_serve_the_openai_endpoint_on_one_port(redis_url, prefix,
                                                                  tmp_path):
    """One conversation, a new connection per request, until both workers have answered:
    each request continues the session the other worker left (one Redis)."""
    http_port = _free_port()
    env = node_env(redis_url, prefix, MMCHAT_SERVER__HTTP_PORT=str(http_port))
    async with asyncio.timeout(SUBPROCESS_TEST_S), supervisor(env, tmp_path) as sup:
        url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
        messages = [{"role": "user", "content": "hello"}]
        pids: set[int] = set()
        sessions: set[str] = set()
        for _ in range(TRIES):
            pid, done = await asyncio.to_thread(_complete, url, messages)
            pids.add(pid)
            sessions.add(done["mmchat"]["session_id"])
            if len(pids) == 2:
                break
            messages += [{"role": "assistant", "content": done["choices"][0]["message"]
                          ["content"]}, {"role": "user", "content": "and then?"}]
        assert len(pids) == 2, f"{TRIES} requests reached only the worker {pids}"
        assert len(sessions) == 1  # continued across the workers, never rebuilt
        assert pids == await pids_serving(sup.url, 2)  # the workers of the WebSocket port
        sup.proc.send_signal(signal.SIGTERM)
        assert await sup.proc.wait() == 0
