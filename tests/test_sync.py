"""The sync API: safe from many threads, complete, closed for good, and never holding up
the exit of a program that forgot to close it."""

import asyncio
import atexit
import gc
import inspect
import queue
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmchat import Attachment, Engine, EngineClosed, SyncEngine
from mmchat.threads import DaemonPool

TOY = Attachment(bytes(range(16)), "application/x-toy")
TESTS = Path(__file__).parent


def test_sync_calls_from_many_threads_at_once(tiny_config, toy_host):
    engine = Engine(tiny_config, plugins=toy_host)
    barrier = threading.Barrier(8)

    def ask(i: int) -> str:
        barrier.wait()  # all eight call at the same moment
        if i % 2:
            return engine.reply_sync(f"s{i}", "hello", [TOY]).text
        return "".join(d.text for d in engine.stream_sync(f"s{i}", "hello", [TOY]))

    try:
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(8)))
        assert len(set(texts)) == 1 and texts[0]  # greedy: the same reply for each
        assert engine.reply_sync("s0", "hello", [TOY]).text  # the sessions carry on
    finally:
        engine.close_sync()


def test_every_async_method_has_a_sync_twin(tiny_config, toy_host):
    public = {name for name, fn in inspect.getmembers(Engine, inspect.iscoroutinefunction)
              if not name.startswith("_")}
    assert public == {"start", "close", "reply", "stream", "reset", "history", "seed",
                      "sessions", "export", "erase"}
    for name in public:
        twin = getattr(SyncEngine, name)
        assert callable(twin) and not inspect.iscoroutinefunction(twin), name
    with SyncEngine(tiny_config, plugins=toy_host) as engine:
        assert "toy" in engine.modalities and "untrained" in engine.model_description
        sid = engine.new_session_id()
        stream = engine.stream(sid, "hello", [TOY])
        text = "".join(d.text for d in stream)
        assert stream.reply is not None and stream.reply.text == text
        assert [t["role"] for t in engine.history(sid)] == ["user", "assistant"]
        engine.reset(sid)
        assert engine.history(sid) == []


async def test_a_closed_engine_raises_engine_closed(tiny_config, toy_host):
    engine = Engine(tiny_config, plugins=toy_host)
    await engine.reply("s", "hello")
    await engine.close()
    await engine.close()  # twice is fine
    for call in (engine.start(), engine.reply("s", "hello"), engine.stream("s", "hi"),
                 engine.history("s"), engine.reset("s")):
        with pytest.raises(EngineClosed) as caught:
            await call
        assert caught.value.code == "engine_closed"
    assert engine.model is not None and engine._scheduler is None  # it did not start again


def test_a_closed_sync_engine_raises_engine_closed(tiny_config, toy_host):
    engine = SyncEngine(tiny_config, plugins=toy_host)
    engine.reply("s", "hello")
    engine.close()
    engine.close()
    assert engine.closed and not engine._thread.is_alive()
    for call in (engine.start, lambda: engine.reply("s", "hi"), lambda: engine.stream("s", "hi"),
                 lambda: engine.history("s"), lambda: engine.reset("s")):
        with pytest.raises(EngineClosed):
            call()


async def test_close_ends_every_running_stream_cancelled(tiny_config, toy_host):
    engine = Engine(tiny_config, plugins=toy_host)
    await engine.start()
    decoding = await engine.stream("s", "hello", max_new_tokens=4096)
    await decoding.__anext__()  # it holds the session and decodes
    waiting = await engine.stream("s", "and this?", max_new_tokens=4096)  # waits for "s"
    await engine.close()
    first, second = await decoding.wait(), await waiting.wait()
    assert first.finish_reason == second.finish_reason == "cancelled"
    assert first.completion_tokens < 4096
    assert second.text == "" and second.completion_tokens == 0  # dropped: it never ran
    turns = (await engine.store.load("s")).history  # the store is closed but readable
    assert [t["text"] for t in turns][:1] == ["hello"] and len(turns) == 2


def test_a_sync_engine_closing_under_a_reading_thread(tiny_config, toy_host):
    engine = SyncEngine(tiny_config, plugins=toy_host)
    stream = engine.stream("s", "hello", max_new_tokens=4096)
    deltas = iter(stream)
    next(deltas)
    engine.close()
    rest = list(deltas)  # what was decoded before the close, then the end
    assert len(rest) < 4096 and stream.reply is not None
    assert stream.reply.finish_reason == "cancelled"


EXIT_SCRIPTS = {
    "sync": """
        engine = Engine(config, plugins=host)
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda i: engine.reply_sync(f"s{i}", "hi").text, range(4)))
        left = iter(engine.stream_sync("s0", "hello", max_new_tokens=4096))
        next(left)  # a reply decoding, its reader gone; nobody closes the engine
    """,
    "async": """
        async def main():
            engine = Engine(config, plugins=host)
            stream = await engine.stream("s", "hello", max_new_tokens=4096)
            await stream.__anext__()  # returns without closing the engine

        asyncio.run(main())
    """,
}


@pytest.mark.parametrize("kind", sorted(EXIT_SCRIPTS))
def test_a_program_that_never_closes_its_engine_exits_cleanly(kind, tmp_path):
    script = tmp_path / "forgetful.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys
        from concurrent.futures import ThreadPoolExecutor
        sys.path.insert(0, {tests!r})
        import toy_plugin
        from conftest import TINY_MODEL
        from mmchat import Engine
        from mmchat.config import from_dict
        from mmchat.plugins import PluginHost

        config = from_dict({{"model": TINY_MODEL}}, env={{}})
        host = PluginHost(entry_points=False)
        host.register(toy_plugin, "toy")
    """).format(tests=str(TESTS)) + textwrap.dedent(EXIT_SCRIPTS[kind]) + "print('end')\n")
    for _ in range(3):
        # A hang shows as the timeout; nothing asserts how long a clean exit took.
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "end" and "Traceback" not in done.stderr, done.stderr


def wait_until_idle(pool: DaemonPool) -> None:
    """Until every thread of ``pool`` has finished the work it had (each then runs one
    of the barrier's waits)."""
    barrier = threading.Barrier(len(pool._threads) + 1)
    for _ in pool._threads:
        pool.submit(barrier.wait, 60)
    barrier.wait(60)


def test_an_engine_dropped_unclosed_stops_its_threads_when_collected(tiny_config, toy_host):
    """Its threads used to run on; the atexit hook, holding the engine weakly, then had
    nothing to stop, and a thread still inside torch aborted the interpreter's exit."""
    before = set(threading.enumerate())

    async def forget() -> tuple[weakref.ref[Engine], list[DaemonPool]]:
        engine = Engine(tiny_config, plugins=toy_host)
        assert (await engine.reply("s", "hello", [TOY], max_new_tokens=3)).text
        lanes = engine._guard._lanes.values()
        return weakref.ref(engine), [engine._threads.model, engine._threads.media,
                                     *(lane.decode_pool for lane in lanes),
                                     *engine._guard.encoder_pools()]

    engine, pools = asyncio.run(forget())
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith("mmchat-")]
    assert {"mmchat-model-0", "mmchat-media-0"} <= {t.name for t in started}
    for pool in pools:  # a thread may still be ending the reply's work, holding the engine
        wait_until_idle(pool)
    del pools
    gc.collect()
    assert engine() is None
    for thread in started:
        thread.join(timeout=60)
    assert not [t.name for t in started if t.is_alive()]


def test_the_exit_hook_waits_for_an_encode_in_progress(tiny_config, toy_host):
    """The encoders run torch: an exit must not finalize the interpreter under one (a
    plugin's decode threads, which may never return, are not waited for)."""
    entered, go = threading.Event(), threading.Event()
    opened: queue.SimpleQueue[Engine] = queue.SimpleQueue()
    outcome: list[object] = []

    async def picture_turn() -> None:
        engine = Engine(tiny_config, plugins=toy_host)
        await engine.start()
        encoder = engine.model.encoders["toy"]
        forward = encoder.forward

        def held(*args):
            entered.set()
            go.wait(60)
            return forward(*args)

        encoder.forward = held
        opened.put(engine)
        try:
            outcome.append(await engine.reply("s", "hello", [TOY], max_new_tokens=3))
        except Exception as exc:  # the exit hook stopped the engine's work under it
            outcome.append(exc)

    turn = threading.Thread(target=asyncio.run, args=(picture_turn(),))
    turn.start()
    engine = opened.get(timeout=60)
    atexit.unregister(engine._at_exit)
    assert entered.wait(60)
    exiting = threading.Thread(target=engine._at_exit)  # what the interpreter runs at exit
    exiting.start()
    exiting.join(0.5)
    assert exiting.is_alive()  # waiting for the encode, however long the machine takes
    go.set()
    exiting.join(60)
    turn.join(60)
    assert not exiting.is_alive() and not turn.is_alive() and outcome


def test_sync_engine_refuses_calls_from_its_own_loop_thread(tiny_config, toy_host):
    with SyncEngine(tiny_config, plugins=toy_host) as engine:
        async def inside() -> None:
            engine.history("s")

        future = asyncio.run_coroutine_threadsafe(inside(), engine._loop)
        with pytest.raises(RuntimeError, match="own loop thread"):
            future.result()
