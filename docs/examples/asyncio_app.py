"""The engine inside an asyncio application: streaming, a deadline, and cancelling.

Run it: ``python docs/examples/asyncio_app.py``. It serves the bundled model.
"""

import asyncio

from mmchat import Engine, ReplyTimeout


async def main() -> None:
    async with Engine.from_config() as engine:
        session = engine.new_session_id()
        stream = await engine.stream(session, "hello!", strategy="sample", temperature=0.7,
                                     seed=1, timeout=60)
        async for delta in stream:
            print(delta.text, end="", flush=True)
        print()
        assert stream.reply is not None
        print(stream.reply.finish_reason, stream.reply.timings["total"], "ms")

        try:
            await engine.reply(session, "and now?", timeout=0.001)
        except ReplyTimeout:
            print("timed out; the turn was cancelled")

        # Cancelling the task that awaits a reply cancels its turn (saved as cancelled);
        # asyncio.timeout and asyncio.wait_for do that when their time runs out.
        try:
            async with asyncio.timeout(0.05):
                await engine.reply(session, "tell me more", max_new_tokens=64)
        except TimeoutError:
            print("cancelled")
        turns = await engine.history(session)
        print([turn["finish_reason"] for turn in turns if turn["role"] == "assistant"])


if __name__ == "__main__":
    asyncio.run(main())
