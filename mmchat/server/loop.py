"""The event loop a server process runs on (``[server] event_loop``).

uvloop (libuv's loop, in C) runs the same asyncio code with less interpreter time per
callback, socket read and write; the server's front end is mostly such callbacks
(docs/benchmarks.md, "Event loop"). ``auto`` takes it when it is installed (it is a
dependency on Linux and macOS), ``asyncio`` keeps the standard library's loop, and
``uvloop`` insists on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for ``choice`` (``auto``, ``asyncio``, ``uvloop``); None is
    asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("server.event_loop = 'uvloop' but uvloop is not installed "
                              "(pip install uvloop), or use 'auto' or 'asyncio'") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run ``main`` to completion on a new loop of ``choice``, as :func:`asyncio.run`."""
    factory = loop_factory(choice)
    logger.debug("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
