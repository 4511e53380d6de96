"""Costly pictures cannot keep the decoders busy for others: through a real server, a
client's 40-megapixel PNGs decode one at a time on the threads left to costly decodes,
while another user's small picture is decoded and answered meanwhile; and a connection
that used its allowance of decode time gets ``media_busy`` and goes on.

The big decodes are held at a gate (a ``threading.Event``) until the small picture's
reply is done, so the test decides by the order of events, never by a clock: had the
small picture queued behind the big ones, its reply could not come before the gate
opened.
"""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from test_server import running_server, server_config

from mmchat import DecodeAllowance, MediaBusy
from mmchat.client import Client, ServerError


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 40-megapixel RGB drawing (7745x5164, just under the default max_pixels)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (7745, 5164), "white")
    ImageDraw.Draw(img).ellipse((600, 800, 2600, 2800), fill="red")
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()


def small_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (96, 96), "blue").save(out, "PNG")
    return out.getvalue()


class Gate:
    """Wraps a modality's ``decode`` and ``is_costly``: costly decodes wait until
    :meth:`open`; counts what it saw."""

    def __init__(self, modality) -> None:
        self.modality = modality
        self.decode, self.is_costly = modality.decode, modality.is_costly
        self.opened = threading.Event()
        self.lock = threading.Lock()
        self.judged = 0  # is_costly calls (on the event loop, before a decode is queued)
        self.costly_running = self.costly_peak = self.costly_done = 0
        self.cheap_done = 0

    def judge(self, data: bytes, mime_type: str) -> bool:
        self.judged += 1
        return self.is_costly(data, mime_type)

    def gated_decode(self, data: bytes, mime_type: str):
        costly = self.is_costly(data, mime_type)
        if costly:
            with self.lock:
                self.costly_running += 1
                self.costly_peak = max(self.costly_peak, self.costly_running)
            assert self.opened.wait(600), "the gate was never opened"
        try:
            return self.decode(data, mime_type)
        finally:
            with self.lock:
                if costly:
                    self.costly_running -= 1
                    self.costly_done += 1
                else:
                    self.cheap_done += 1


async def until(check, limit: float = 300.0) -> None:
    """Wait for ``check()``; fail after ``limit`` seconds (a hang guard, not a measure)."""
    async with asyncio.timeout(limit):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_small_picture_is_not_held_behind_another_clients_big_ones(big_png,
                                                                          monkeypatch):
    # the four wait for each other's decodes, which the time limit counts: a loaded
    # machine must not turn the wait into plugin_timeout
    async with running_server(server_config(plugins={"timeout_seconds": 600})) as server:
        image = server.engine.modalities["image"]
        gate = Gate(image)
        monkeypatch.setattr(image, "decode", gate.gated_decode)
        monkeypatch.setattr(image, "is_costly", gate.judge)
        big_clients = [await Client.connect(server.url) for _ in range(4)]
        small_client = await Client.connect(server.url)
        try:
            big_replies = [await c.send("what is this?", [(big_png, "image/png")])
                           for c in big_clients]
            # all four are costly, judged and waiting for (or holding) a decode thread
            await until(lambda: gate.judged == 4 and gate.costly_running >= 1)

            small = await small_client.reply("and this?", [(small_png(), "image/png")],
                                             timeout=300)
            assert small.done.finish_reason in ("stop", "length")
            assert gate.cheap_done == 1
            assert gate.costly_done == 0 and not any(r.done for r in big_replies)

            gate.opened.set()
            for reply in big_replies:
                done = await reply.wait(300)
                assert done.finish_reason in ("stop", "length")
            assert gate.costly_done == 4
            assert gate.costly_peak == 1  # one big picture in memory at a time
        finally:
            gate.opened.set()
            for client in [*big_clients, small_client]:
                await client.close()


async def test_a_connection_that_used_its_decode_time_gets_media_busy_and_goes_on():
    config = server_config(server={"media_decode_seconds": 1e-6, "media_decode_rate": 1e-6})
    async with running_server(config) as server:
        async with await Client.connect(server.url) as client:
            first = await client.reply("one", [(small_png(), "image/png")], timeout=300)
            assert first.done.finish_reason in ("stop", "length")
            with pytest.raises(ServerError) as refused:
                await client.reply("two", [(small_png(), "image/png")], timeout=300)
            assert refused.value.code == "media_busy"
            assert not refused.value.fatal
            assert "media decode time" in refused.value.message
            text = await client.reply("no picture this time", timeout=300)
            assert text.done.finish_reason in ("stop", "length")
        async with await Client.connect(server.url) as other:  # its own allowance
            again = await other.reply("one", [(small_png(), "image/png")], timeout=300)
            assert again.done.finish_reason in ("stop", "length")


def test_the_allowance_admits_while_time_is_left_and_names_the_wait():
    now = [0.0]
    allowance = DecodeAllowance(rate=0.5, burst=2.0, clock=lambda: now[0])
    allowance.admit()
    allowance.charge(3.0)  # one costly decode: 1 s owed
    with pytest.raises(MediaBusy) as busy:
        allowance.admit()
    assert busy.value.code == "media_busy"
    assert busy.value.retry_after == pytest.approx(2.0, abs=0.01)
    now[0] = 1.9
    with pytest.raises(MediaBusy):
        allowance.admit()
    now[0] = 2.1
    allowance.admit()
    now[0] = 100.0
    assert allowance.balance == 2.0  # never more than the burst
    assert allowance.spent == 3.0
    with pytest.raises(ValueError):
        DecodeAllowance(rate=0.0, burst=1.0)
