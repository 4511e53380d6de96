"""One serving process: ``mmchat serve``, or one worker of ``mmchat serve --workers N``.

:func:`serve_until_stopped` runs a :class:`~mmchat.server.ChatServer` until SIGTERM or
SIGINT, then drains it. ``python -m mmchat.server.worker`` is a worker started by the
supervisor (:mod:`.workers`): it reads one line of JSON from its standard input (the
configuration, the address and its number), shares the port with the other workers
(SO_REUSEPORT), writes ``ready`` to its standard output once it listens, and drains
and exits on SIGTERM or when its standard input closes (the supervisor is gone).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import Config, from_dict
from ..errors import MMChatError
from . import loop as event_loop
from .app import ChatServer

#: Named, not __name__: under ``python -m`` that is "__main__".
logger = logging.getLogger("mmchat.server.worker")

#: The log line format; a worker's lines say which worker they come from.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO, worker: int | None = None) -> None:
    """mmchat's INFO lines on (the ready line, the drain), websockets' per-connection
    lines only at DEBUG; with ``worker``, every line names it."""
    fmt = LOG_FORMAT if worker is None else LOG_FORMAT.replace(
        "%(name)s", f"[worker {worker}] %(name)s")
    logging.basicConfig(level=level, format=fmt)
    mmchat_logger = logging.getLogger("mmchat")
    if mmchat_logger.getEffectiveLevel() > logging.INFO:
        mmchat_logger.setLevel(logging.INFO)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("mmchat.server.websockets").setLevel(logging.WARNING)


async def serve_until_stopped(config: Config, host: str | None, port: int | None, *,
                              worker: int | None = None,
                              started: Callable[[asyncio.Event], Awaitable[None]] | None = None
                              ) -> None:
    """Serve until SIGTERM or SIGINT (or until ``started``'s event is set), then drain.
    A ``worker`` shares the port (SO_REUSEPORT). SIGHUP is ignored (logged when not a
    worker): rolling restarts are the supervisor's."""
    server = ChatServer(config, worker=worker)
    await server.start(host, port, reuse_port=worker is not None)
    # Garbage-collector pauses were most of the slowest first-token times under load
    # (docs/benchmarks.md). The model, plugins and libraries loaded so far live as long
    # as the process, so full passes skip them; and the older generations are collected
    # 2x and 10x less often than Python's default (700, 10, 10).
    gc.freeze()
    gc.set_threshold(700, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def hangup() -> None:  # the supervisor's signal (a rolling restart), not a stop
        if worker is None:
            logger.warning("SIGHUP ignored: rolling restarts are for --workers 2 or more")

    loop.add_signal_handler(signal.SIGHUP, hangup)
    if started is not None:
        await started(stop)
    try:
        await stop.wait()
    finally:
        await server.shutdown()


class _UntilClosed(asyncio.Protocol):
    """Sets an event when the pipe it reads closes."""

    def __init__(self, closed: asyncio.Event) -> None:
        self.closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


def read_spec(line: bytes) -> dict[str, Any]:
    """The worker's orders, as :meth:`mmchat.server.workers.Supervisor` writes them."""
    spec: dict[str, Any] = json.loads(line)
    spec["config"] = from_dict(spec["config"], base_dir=spec["base_dir"], env={})
    return spec


def main() -> None:
    """``python -m mmchat.server.worker``: serve as the worker the supervisor says."""
    spec = read_spec(sys.stdin.buffer.readline())
    configure_logging(spec["log_level"], spec["worker"])

    async def started(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: _UntilClosed(stop), sys.stdin)
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    try:
        event_loop.run(serve_until_stopped(spec["config"], spec["host"], spec["port"],
                                           worker=spec["worker"], started=started),
                       spec["config"].server.event_loop)
    except MMChatError as exc:  # as `mmchat serve` reports it: the message, no traceback
        logger.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
