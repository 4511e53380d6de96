"""The store's Lua scripts (``scripts/*.lua``), read once and run by their SHA1.

A script whose first lines say ``-- uses queue.lua`` (the fair lock's functions) or
``-- uses whole.lua`` (the check that a session is whole) gets those files put before it.
Redis keeps loaded scripts until it restarts; a call that
finds its script gone (``NOSCRIPT``: nothing ran) loads it and runs again.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.exceptions

_USES = "-- uses "


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
    used = []
    for line in text.splitlines():
        if not line.startswith(_USES):
            break
        used.append(_read(line.removeprefix(_USES).strip().removesuffix(".lua")))
    return Script(name, "\n".join([*used, text]))


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
         "request_cancel", "resume", "claim", "unclaim")
