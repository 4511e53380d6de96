"""The store's Lua scripts (``scripts/*.lua``), read once and run by their SHA1.

A script that starts with ``-- uses <name>.lua`` lines gets those files put before it
(``queue.lua``: the fair lock's functions; ``stream.lua``: appending reply events;
``whole.lua``: the check that a session is whole; ``claims.lua``: message id claims).
Redis keeps loaded scripts until it restarts; a call that finds its script gone
(``NOSCRIPT``: nothing ran) loads it and runs again.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.exceptions

_USES = re.compile(r"-- uses (\w+)\.lua\n")


@dataclass(frozen=True)
class Script:
    name: str
    text: str

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()


def _read(name: str) -> str:
    return (resources.files(__package__) / "scripts" / f"{name}.lua").read_text("utf-8")


@functools.cache
def script(name: str) -> Script:
    """The script ``scripts/<name>.lua``, read on first use."""
    text = _read(name)
    parts, at = [], 0
    while found := _USES.match(text, at):
        parts.append(_read(found.group(1)))
        at = found.end()
    return Script(name, "\n".join([*parts, text]))


def is_noscript(result: Any) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)


async def run(client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
    """Run script ``name`` in one round trip (two more the first time after a restart)."""
    found = script(name)
    try:
        return await client.evalsha(found.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        await client.script_load(found.text)
        return await client.evalsha(found.sha, len(keys), *keys, *args)


def queue(pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
    """Queue script ``name`` on a pipeline (see :func:`is_noscript` for its result)."""
    pipe.evalsha(script(name).sha, len(keys), *keys, *args)


async def load(client: Any, name: str) -> None:
    await client.script_load(script(name).text)


#: Every script the store runs.
NAMES = ("acquire", "append", "begin_turn", "end_turn", "leave", "release", "renew",
         "request_cancel", "resume", "claim", "unclaim", "load", "erase")
