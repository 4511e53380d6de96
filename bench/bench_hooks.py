"""What the hooks around every reply (prepare_turn, redact_text, record_turn) cost a turn.

Timed in the same run: whole text turns through ``Engine.reply`` with the repository's
config and model (the baseline), and the hook calls a turn makes, alone, with no plugin
implementing them and with one no-op plugin implementing all three. The ratios are the
share of a turn the hooks take.

    python -m bench hooks
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench import load_config, load_plugins, machine_notes, table


class NoOp:
    """One plugin with every reply hook, each doing nothing."""

    from mmchat import hookimpl

    @hookimpl
    def prepare_turn(self, text, attachments):
        return None

    @hookimpl
    def redact_text(self, text):
        return None

    @hookimpl
    def record_turn(self, reply):
        return None


async def _hook_calls(hooks, reply, n: int, deltas: int) -> float:
    """Median seconds of one turn's hook calls: prepare, a redactor for ``deltas`` deltas
    and the finished text, and record."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        text, atts = await hooks.prepare("s", "what colour is the circle?", [])
        redactor = hooks.redactor("s")
        if redactor is not None:
            for _ in range(deltas):
                redactor.text("piece", final=False)
            redactor.text(reply.text, final=True)
        await hooks.record("s", text, atts, reply)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def _run(quick: bool) -> str:
    from mmchat import Engine
    from mmchat.turnhooks import TurnHooks

    config = load_config()
    host = load_plugins(config)
    turns = 5 if quick else 30
    async with Engine(config, plugins=host) as engine:
        await engine.reply("warm", "hello")
        times, replies = [], []
        for i in range(turns):
            t0 = time.perf_counter()
            replies.append(await engine.reply(f"s{i}", "what colour is the circle?"))
            times.append(time.perf_counter() - t0)
        turn = statistics.median(times)
        deltas = max(1, round(statistics.median(r.completion_tokens for r in replies)))
        calls = 200 if quick else 2000
        none = await _hook_calls(engine._hooks, replies[-1], calls, deltas)
        host.register(NoOp(), "noop")
        one = await _hook_calls(TurnHooks(host), replies[-1], calls, deltas)
    rows = [
        ["a text turn (`Engine.reply`, baseline)", f"{turn * 1e3:.2f} ms", "1"],
        ["its hook calls, no plugin implementing them", f"{none * 1e6:.1f} µs",
         f"{none / turn:.5f}"],
        ["its hook calls, one no-op plugin with all three", f"{one * 1e6:.1f} µs",
         f"{one / turn:.5f}"],
    ]
    return (f"### Reply hooks ({deltas} deltas a reply; {machine_notes(1)})\n\n"
            + table(["what", "median", "share of a turn"], rows))


def run(quick: bool = False) -> str:
    return asyncio.run(_run(quick))


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))
