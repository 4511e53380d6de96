"""``mmchat serve --workers N``: N processes serving one port, under a supervisor.

The supervisor loads no model. It binds the port without listening on it (so ``--port
0`` is resolved once, and no other program takes the port while a worker restarts),
then starts N workers (``python -m mmchat.server.worker``), each with its own engine and
all sharing the Redis session store. Each worker listens on the port itself with
SO_REUSEPORT, and the kernel spreads new connections over the listening workers.

* A worker that exits without being asked to is started again, after 1 s, then 2, 4 ...
  up to 30 s while it keeps failing (the count starts over once one has served a
  minute).
* SIGTERM or SIGINT: every worker drains as a single ``mmchat serve`` does (replies in
  flight finish, up to ``server.drain_seconds``); the supervisor exits when all have.
* SIGHUP: a rolling restart. One worker at a time, a new one starts and, once it
  listens, the old one drains and exits; a worker that cannot start ends the round and
  the old one keeps serving.
* ``/metrics`` answers for all workers together (:mod:`.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import ConfigError
from . import metrics

logger = logging.getLogger(__name__)

#: Seconds before a worker that exited is started again, doubled while it keeps failing.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
#: A worker that served this long before it exited starts again after RESTART_DELAY.
STABLE_SECONDS = 60.0
#: Seconds a draining worker may take beyond its drain (see Supervisor._retire).
DRAIN_GRACE = 30.0


def worker_count(config: Config) -> int:
    """How many workers ``[server] workers`` asks for ("auto": one per core this process
    may run on). More than one needs the Redis session store and SO_REUSEPORT."""
    setting = config.server.workers
    count = available_cores() if setting == "auto" else int(setting)
    if count > 1 and config.sessions.backend == "memory":
        raise ConfigError(
            f"server.workers = {setting!r}"
            + (f" ({count} processes)" if setting == "auto" else "")
            + " needs sessions.backend = "
            "'redis': with the memory store each worker would keep sessions of its own, "
            "and a client that reconnects to another worker would lose its conversation")
    if count > 1 and config.server.http_port == 0:
        raise ConfigError(f"server.workers = {setting!r} needs a fixed server.http_port "
                          "(0 would give each worker a port of its own)")
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError(f"server.workers = {setting!r} needs SO_REUSEPORT (Linux, BSD), "
                          "which this system does not have")
    return count


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, as a container limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(eq=False)
class _Worker:
    """One worker process, from its start to its exit."""

    number: int
    process: asyncio.subprocess.Process
    #: Done once the worker listens; fails if it exits first.
    ready: asyncio.Future[None]
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    #: Asked to stop (shutdown or rolling restart): its exit is not a crash.
    retiring: bool = False
    watcher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"


class WorkerFailed(Exception):
    """A worker exited before it listened."""


class Supervisor:
    """Runs ``count`` workers on ``host``:``port`` until SIGTERM or SIGINT; see the
    module's documentation. ``await Supervisor(...).run()`` returns the exit status."""

    def __init__(self, config: Config, host: str | None, port: int | None,
                 count: int) -> None:
        self.config = config
        self.host = host or config.server.host
        self.port = config.server.port if port is None else port
        self.count = count
        #: The worker serving each number (1..count) now.
        self.workers: dict[int, _Worker] = {}
        #: Every worker that has not exited (a rolling restart's old and new included).
        self._live: set[_Worker] = set()
        self._failures: dict[int, int] = {}
        self._restarts: set[asyncio.Task[None]] = set()
        self._rolling: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._serving = False
        self._stopping = False
        self._env: dict[str, str] = {}
        self._metrics_dir = ""

    async def run(self) -> int:
        """Serve until asked to stop: 0 after a clean stop, 1 if the workers could not
        start."""
        loop = asyncio.get_running_loop()
        with self._placeholder() as sock, self._metrics_folder() as folder:
            self.port = sock.getsockname()[1]
            self._metrics_dir = folder
            self._env = {**os.environ, metrics.MULTIPROC_ENV: folder}
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            try:
                for number in range(1, self.count + 1):
                    await self._spawn(number)
                try:
                    if not await self._first_ready():
                        return 0
                except WorkerFailed as exc:
                    logger.error("%s; stopping the others", exc)
                    return 1
                self._serving = True
                logger.info("mmchat ready on %s (%d workers)", self.url, self.count)
                loop.add_signal_handler(signal.SIGHUP, self.rolling_restart)
                await self._stop.wait()
                logger.info("stopping %d workers", len(self._live))
                return 0
            finally:
                await self._stop_all()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
                logger.info("mmchat stopped")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/"

    # -- the port and the metrics folder ----------------------------------------------

    @contextlib.contextmanager
    def _placeholder(self) -> Iterator[socket.socket]:
        """A socket bound to the port, never listening: it takes the port number (0
        resolved) for the workers, who bind it too, and keeps it while they restart.
        The port is first bound without SO_REUSEPORT, so that one held by anything else
        (another ``mmchat serve --workers`` included) is refused, not shared."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # as the workers' listening sockets: connections of an earlier run
                # still in TIME_WAIT do not hold the port
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.port))
                port = probe.getsockname()[1]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"cannot bind {self.host}:{self.port}: {exc}") from None
        with sock:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((self.host, port))
            except OSError as exc:
                raise ConfigError(f"cannot bind {self.host}:{port}: {exc}") from None
            yield sock

    @contextlib.contextmanager
    def _metrics_folder(self) -> Iterator[str]:
        """The workers' metric files: the folder named in the environment (emptied
        first), else a temporary one removed at the end."""
        given = os.environ.get(metrics.MULTIPROC_ENV)
        if given:
            os.makedirs(given, exist_ok=True)
            metrics.clear_worker_values(given)
            yield given
            return
        folder = tempfile.mkdtemp(prefix="mmchat-metrics-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- workers -----------------------------------------------------------------------

    async def _spawn(self, number: int, *, serving: bool = True) -> _Worker:
        """Start worker ``number``. It serves that number at once, unless ``serving`` is
        false (a rolling restart's new worker, which takes over once it listens)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mmchat.server.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=self._env)
        spec = {"config": self.config.to_dict(), "base_dir": self.config.base_dir,
                "host": self.host, "port": self.port, "worker": number,
                "log_level": logging.getLogger().getEffectiveLevel()}
        assert process.stdin is not None
        # The pipe stays open: the worker stops when it closes (this process is gone).
        process.stdin.write(json.dumps(spec).encode() + b"\n")
        worker = _Worker(number, process, asyncio.get_running_loop().create_future())
        self._live.add(worker)
        if serving:
            self.workers[number] = worker
        worker.watcher = asyncio.create_task(self._watch(worker))
        logger.info("%s starting", worker.name)
        return worker

    async def _first_ready(self) -> bool:
        """Wait until every worker listens: False if SIGTERM came first; WorkerFailed
        if one exited."""
        stopped = asyncio.create_task(self._stop.wait())
        try:
            for worker in list(self.workers.values()):
                either: list[asyncio.Future[Any]] = [worker.ready, stopped]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    return False
                worker.ready.result()
        finally:
            stopped.cancel()
        gone = [w.name for w in self.workers.values() if w.process.returncode is not None]
        if gone:
            raise WorkerFailed(f"{', '.join(gone)} exited while the others started")
        return True

    async def _watch(self, worker: _Worker) -> None:
        """Follow a worker's standard output to its ``ready`` line, then its exit."""
        out = worker.process.stdout
        assert out is not None
        while line := await out.readline():
            if line.strip() == b"ready" and not worker.ready.done():
                worker.ready_at = time.monotonic()
                worker.ready.set_result(None)
                logger.info("%s ready", worker.name)
        code = await worker.process.wait()
        self._live.discard(worker)
        metrics.worker_exited(self._metrics_dir, worker.process.pid)
        if not worker.ready.done():
            worker.ready.set_exception(WorkerFailed(
                f"{worker.name} exited with status {code} before it listened"))
            worker.ready.exception()  # retrieved: a restarted worker's is not awaited
        if worker.retiring or self._stopping:
            logger.info("%s stopped (status %d)", worker.name, code)
        elif self._serving and self.workers.get(worker.number) is worker:
            self._schedule_restart(worker, code)

    def _schedule_restart(self, worker: _Worker, code: int) -> None:
        failures = self._failures.get(worker.number, 0)
        if worker.ready_at is not None and time.monotonic() - worker.ready_at >= STABLE_SECONDS:
            failures = 0
        delay = min(RESTART_DELAY * 2 ** failures, RESTART_DELAY_MAX)
        self._failures[worker.number] = failures + 1
        logger.warning("%s exited with status %d; starting it again in %gs", worker.name,
                       code, delay)
        task = asyncio.create_task(self._restart(worker.number, delay))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, number: int, delay: float) -> None:
        await asyncio.sleep(delay)  # the back-off itself, not a wait for an event
        if not self._stopping:
            await self._spawn(number)

    def rolling_restart(self) -> None:
        """Replace the workers one at a time (SIGHUP); does nothing while a round is
        going on or the workers stop."""
        if self._stopping or (self._rolling is not None and not self._rolling.done()):
            logger.info("SIGHUP ignored: a rolling restart is going on")
            return
        self._rolling = asyncio.create_task(self._roll())

    async def _roll(self) -> None:
        logger.info("rolling restart of %d workers", self.count)
        for number in range(1, self.count + 1):
            new = await self._spawn(number, serving=False)
            try:
                await new.ready
            except WorkerFailed as exc:
                logger.error("rolling restart stopped, the old worker keeps serving: %s",
                             exc)
                return
            old = self.workers.get(number)
            self.workers[number] = new
            if old is not None:
                await self._retire(old)
        logger.info("rolling restart done")

    async def _retire(self, worker: _Worker) -> None:
        """SIGTERM a worker and wait until it has drained and exited (killed after
        twice ``server.drain_seconds`` plus :data:`DRAIN_GRACE`: replies get the drain
        time, cancelled ones as long again to end)."""
        worker.retiring = True
        if worker.process.returncode is None:
            logger.info("%s draining", worker.name)
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        assert worker.watcher is not None
        limit = 2 * self.config.server.drain_seconds + DRAIN_GRACE
        try:
            await asyncio.wait_for(asyncio.shield(worker.watcher), limit)
        except TimeoutError:
            logger.error("%s still running %gs after SIGTERM; killing it", worker.name,
                         limit)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.watcher

    async def _stop_all(self) -> None:
        self._stopping = True
        pending = [*self._restarts, *([self._rolling] if self._rolling else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(*(self._retire(w) for w in list(self._live)))
