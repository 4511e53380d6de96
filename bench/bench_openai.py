"""The OpenAI endpoint on long conversations: a continued session against a rebuilt one.

Timed in one run, as plain JSON POSTs on one keep-alive connection to ``mmchat serve``'s
HTTP port (in this process, the repository's config and model, greedy, 16-token
replies; the ``openai`` package adds its own time, which grows with the history it
validates: about 0.5 ms an exchange on this machine, not counted here):
a request with no history (a new session: the baseline), then, in conversations of
``n`` exchanges, the next request (its session continued: the last message alone is
read) and the same request sent again (its session has moved on, so it is rebuilt by
seeding the whole history). The ratios are to the baseline's median.

    python -m bench openai
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import time

from bench import load_config, machine_notes, table

REPLY_TOKENS = 16
LENGTHS = (1, 8, 32)
QUESTIONS = ("hello", "what can you do?", "what colour is the circle?", "thanks",
             "how many shapes are there?", "is it big?")


class _Client:
    """POSTs on one keep-alive connection, each in a worker thread."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def _post(self, body: bytes) -> dict:
        self.connection.request("POST", "/v1/chat/completions", body,
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data}")
        return data


async def _timed(client: _Client, messages) -> tuple[float, str]:
    body = json.dumps({"model": "mmchat", "messages": messages,
                       "max_tokens": REPLY_TOKENS}).encode()
    t0 = time.perf_counter()
    done = await asyncio.to_thread(client._post, body)
    return time.perf_counter() - t0, done["choices"][0]["message"]["content"]


async def _run(quick: bool) -> str:
    import torch

    from mmchat import Engine
    from mmchat.server import ChatServer

    torch.set_num_threads(1)
    config = load_config().replace(server={"openai_requests_per_second": 1000.0,
                                           "openai_burst": 1000})
    lengths = (1, 4) if quick else LENGTHS
    rounds = 1 if quick else 5
    engine = Engine(config)
    server = ChatServer(config, engine=engine)
    await server.start("127.0.0.1", 0, http_port=0)
    client = _Client(server.http.port)
    try:
        await _timed(client, [{"role": "user", "content": "hello"}])  # warm up
        new = [(await _timed(client, [{"role": "user", "content": q}]))[0]
               for q in QUESTIONS * rounds]
        rows = [["no history (new session, baseline)", f"{statistics.median(new) * 1e3:.1f} ms",
                 "1"]]
        for n in lengths:
            continued, rebuilt = [], []
            for r in range(rounds):
                messages: list[dict[str, str]] = []
                for i in range(n):
                    messages.append({"role": "user",
                                     "content": QUESTIONS[(i + r) % len(QUESTIONS)]})
                    _, text = await _timed(client, messages)
                    messages.append({"role": "assistant", "content": text})
                messages.append({"role": "user", "content": "tell me more"})
                continued.append((await _timed(client, messages))[0])
                rebuilt.append((await _timed(client, messages))[0])
            base = statistics.median(new)
            for name, times in (("continued", continued), ("rebuilt", rebuilt)):
                median = statistics.median(times)
                rows.append([f"after {n} exchanges, {name}", f"{median * 1e3:.1f} ms",
                             f"{median / base:.2f}"])
    finally:
        client.connection.close()
        await server.shutdown(drain_seconds=10)
        await engine.close()
    counted = server.metrics.render().decode()
    sessions = {line.split('"')[1]: float(line.split()[-1]) for line in counted.splitlines()
                if line.startswith("mmchat_openai_sessions_total{")}
    return (f"### OpenAI endpoint, continued vs rebuilt sessions ({REPLY_TOKENS}-token replies, "
            f"median of {len(new)} new and {rounds} of each other; {machine_notes(1)})\n\n"
            + table(["request", "median", "ratio to a new session"], rows)
            + f"\n\nSessions counted: {sessions}\n")


def run(quick: bool = False) -> str:
    return asyncio.run(_run(quick))


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick))
