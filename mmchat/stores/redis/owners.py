"""Each subject's sessions in Redis: the owner index, and erasing a subject.

A subject's index is a set, ``{prefix}:o:{<hash>}:sessions`` (:func:`.keys.owner_index`),
of the ids of the sessions it claimed. :meth:`RedisStore.claim_session` adds to it in
the same ``MULTI``/``EXEC`` that records the owner. Expiry is lazy: the index has no
TTL (a session renewed for months must stay listed and erasable), and reading it checks
each id's owner in one pipeline and removes the ids whose session expired, was deleted
or belongs to another owner, so a list never shows them and the index shrinks to the
live sessions each time it is read. A claim that finds the index at a size of
:data:`PRUNE_FROM` times a power of two prunes it too, so the index of a subject nobody
lists stays within about twice its live sessions, at an amortized cost of O(1) per
claim. The index and a session live in different Cluster
slots, so the checks are a plain pipeline, and erasing runs one script per session
(``scripts/erase.lua``: it checks the owner and deletes the session's keys in its slot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...subjects import Erased
from . import lua
from .keys import owner_index

if TYPE_CHECKING:
    from .store import RedisStore


#: The smallest index a claim prunes (see :func:`due_for_pruning`).
PRUNE_FROM = 64


def due_for_pruning(size: int) -> bool:
    """Whether a claim that left the index with ``size`` ids prunes it: at 64, 128,
    256, ... ids."""
    return size >= PRUNE_FROM and size % PRUNE_FROM == 0 and (size & (size - 1)) == 0


async def owned_sessions(store: RedisStore, owner: str) -> list[str]:
    """The ids in ``owner``'s index whose session is live and ``owner``'s, sorted; the
    others leave the index. Two round trips (three when some left)."""
    index = owner_index(store.prefix, owner)
    async with store._guard("owned_sessions"):
        members = sorted(m.decode() for m in await store.client.smembers(index))
        if not members:
            return []
        pipe = store.client.pipeline(transaction=False)
        for session_id in members:
            pipe.hget(store.keys(session_id).meta, "owner")
        owners = await pipe.execute()
        gone = [sid for sid, found in zip(members, owners, strict=True)
                if found is None or found.decode() != owner]
        if gone:
            await store.client.srem(index, *gone)
    return [sid for sid in members if sid not in gone]


async def erase_owned(store: RedisStore, owner: str) -> Erased:
    """Erase each of ``owner``'s sessions under its turn lock, then the index."""
    index = owner_index(store.prefix, owner)
    async with store._guard("erase_owned"):
        members = sorted(m.decode() for m in await store.client.smembers(index))
    erased = Erased()
    for session_id in members:
        keys = store.keys(session_id)
        async with store.lock(session_id), store._guard("erase_owned"):
            found = await lua.run(store.client, "erase",
                                  [*keys.data, keys.msgids_old, keys.cancel], [owner])
        if found[0] == 1:
            erased += Erased(1, *map(int, found[1:]))
    if members:
        async with store._guard("erase_owned"):
            await store.client.srem(index, *members)
    return erased
