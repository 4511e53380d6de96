"""One SyncEngine shared by a pool of threads, as a Flask, Django or Celery worker would.

Run it: ``python docs/examples/thread_pool.py``. It serves the bundled model;
``MMCHAT_<SECTION>__<KEY>`` variables change settings (docs/configuration.md).
"""

from concurrent.futures import ThreadPoolExecutor

from mmchat import ReplyTimeout, SyncEngine


def main() -> None:
    with SyncEngine.from_config() as engine:  # closes on exit; a forgotten close is fine too

        def ask(user: int) -> str:
            return engine.reply(f"user-{user}", "hello!", timeout=60).text

        with ThreadPoolExecutor(8) as pool:
            for text in pool.map(ask, range(8)):
                print(text)

        stream = engine.stream("user-0", "how are you?", max_new_tokens=16)
        for delta in stream:  # leaving this loop early would cancel the turn
            print(delta.text, end="", flush=True)
        print()
        assert stream.reply is not None
        print(stream.reply.finish_reason, stream.reply.completion_tokens)

        try:
            engine.reply("user-1", "one more thing", timeout=0.001)
        except ReplyTimeout as exc:  # also a TimeoutError
            print("timed out; the turn was saved as cancelled:", exc.reply is None or
                  exc.reply.finish_reason)
        print(len(engine.history("user-1")), "turns in user-1's history")


if __name__ == "__main__":
    main()
