"""What subjects cost the Redis store (on a private ``redis-server`` started here, never
the shared one on 6379), each against a baseline timed in the same run:

* a claim that indexes the session (a subject's owner: ``SADD`` and ``SCARD`` join the
  ``MULTI``/``EXEC``), against a claim that does not (the anonymous owner);
* listing a subject's ``SESSIONS`` sessions (one pipeline of ``HGET``\\ s), against
  loading one of them;
* erasing them (per session: the turn lock, then one script), against deleting one
  session with ``delete()``.

    python -m bench subjects        python -m bench.bench_subjects --quick
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from bench import table
from bench.bench_store import PrivateRedis

SESSIONS = 100
CLAIMS = 2000
ROUNDS = 20


async def _median(fn: Callable[[int], Awaitable[object]], count: int) -> float:
    """Median seconds of ``fn(i)`` over ``count`` calls."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        await fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _fill(store, owner: str, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    for sid in ids:
        await store.claim_session(sid, owner)
        await store.save_turn(sid, state=b"s" * 256, memory_added=[], max_memory=4,
                              turns=[{"role": "user", "text": "hello there"},
                                     {"role": "assistant", "text": "hi"}])
    return ids


async def _run(quick: bool) -> list[list[object]]:
    from mmchat.stores.redis import RedisStore

    claims, rounds = (200, 5) if quick else (CLAIMS, ROUNDS)
    redis = PrivateRedis()
    try:
        await (await redis.client()).aclose()
        store = RedisStore(redis.url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
        await store.load_scripts()
        anonymous = await _median(lambda i: store.claim_session(f"a-{i}", "anonymous"),
                                  claims)
        indexed = await _median(lambda i: store.claim_session(f"x-{i}", "sub:bench"), claims)
        ids = await _fill(store, "sub:lister", "l", SESSIONS)
        load = await _median(lambda i: store.load(ids[i % len(ids)]), claims // 4)
        listing = await _median(lambda i: store.owned_sessions("sub:lister"), rounds)
        erase_per, delete_one = [], []
        for r in range(rounds):
            ids = await _fill(store, f"sub:erase-{r}", f"e{r}", SESSIONS)
            start = time.perf_counter()
            erased = await store.erase_owned(f"sub:erase-{r}")
            erase_per.append((time.perf_counter() - start) / erased.sessions)
            one = (await _fill(store, "sub:deleted", f"d{r}", 1))[0]
            start = time.perf_counter()
            await store.delete(one)
            delete_one.append(time.perf_counter() - start)
        await store.close()
    finally:
        redis.stop()
    erase, delete = statistics.median(erase_per), statistics.median(delete_one)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    return [
        ["claim, anonymous owner (baseline)", ms(anonymous), "1"],
        ["claim, a subject's (indexed)", ms(indexed), f"{indexed / anonymous:.2f}"],
        ["load one session (baseline)", ms(load), "1"],
        [f"list a subject's {SESSIONS} sessions", ms(listing), f"{listing / load:.1f}"],
        ["delete one session (baseline)", ms(delete), "1"],
        [f"erase a subject's {SESSIONS} sessions, per session", ms(erase),
         f"{erase / delete:.1f}"],
    ]


def main(quick: bool = False) -> None:
    rows = asyncio.run(_run(quick))
    print("## Subjects on Redis (`bench/bench_subjects.py`)\n")
    print(table(["what", "median", "against its baseline"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
