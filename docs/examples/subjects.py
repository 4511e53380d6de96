"""A user's sessions: claim them for a subject, start one with a system text, list,
export (JSON Lines) and erase them ("forget this user").

Run it: ``python docs/examples/subjects.py``. It serves the bundled model with the
store ``[sessions]`` configures (in memory by default; ``MMCHAT_SESSIONS__BACKEND=redis``
shares them with a server).
"""

import asyncio
import json

from mmchat import Engine, SessionForbidden


async def main() -> None:
    async with Engine() as engine:
        user = "José <jose@example.com>"  # any UTF-8 text up to 256 characters
        first, second = engine.new_session_id(), engine.new_session_id()
        await engine.seed(first, system="You are a helpful assistant.", subject=user)
        reply = await engine.reply(first, "hello!", subject=user)
        await engine.reply(second, "what is your name?", subject=user)
        print("reply:", reply.text)
        try:
            await engine.reply(first, "let me in", subject="someone else")
        except SessionForbidden:
            print("another subject's session is refused")

        print("sessions:", await engine.sessions(user))
        for line in (await engine.export(subject=user)).splitlines():
            record = json.loads(line)
            print(record["session"][:8], record["role"], record["time"], record["text"][:40])

        erased = await engine.erase(user)
        print("erased:", erased.as_dict())
        assert await engine.sessions(user) == [] and await engine.history(first) == []


if __name__ == "__main__":
    asyncio.run(main())
