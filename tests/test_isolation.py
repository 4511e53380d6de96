"""A slow or broken modality plugin fails only its own turns (mmchat.isolation)."""

import asyncio
import json
import math
import threading

import pytest
from conftest import TINY_MODEL
from toy_plugin import ToyEncoder, ToyModality

from mmchat import Attachment, Engine, checkpoint, hookimpl
from mmchat.config import from_dict
from mmchat.errors import (
    Cancelled,
    ConfigError,
    PluginError,
    PluginTimeout,
    PluginUnavailable,
    UnsupportedMedia,
)
from mmchat.isolation import Breaker
from mmchat.plugins import PluginHost

TOY = Attachment(b"abcdefgh", "application/x-toy")


def config(**plugins):
    return from_dict({"model": dict(TINY_MODEL), "generation": {"max_new_tokens": 4},
                      "plugins": plugins}, env={})


def host_with(*modalities, name="odd"):
    """The toy plugin, plus a plugin named ``name`` registering ``modalities``."""
    import toy_plugin

    class Plugin:
        @hookimpl
        def register_modalities(self, register):
            for m in modalities:
                register(m)

    host = PluginHost(entry_points=False)
    host.register(toy_plugin, "toy", version=toy_plugin.__version__)
    host.register(Plugin(), name)
    return host


class Gated(ToyModality):
    """A modality whose decode or encoder waits for ``gate`` (released by the test)."""

    name = "gated"
    mime_types = ("application/x-gated",)

    def __init__(self, where="encoder"):
        super().__init__()
        self.where = where
        self.gate = threading.Event()
        self.entered = threading.Event()

    def example(self):  # no start-up warm-up: the test decides when the plugin is slow
        return None

    def _wait(self):
        self.entered.set()
        self.gate.wait(60)

    def decode(self, data, mime_type):
        if self.where == "decode":
            self._wait()
        return super().decode(data, mime_type)

    def build_encoder(self, d_model):
        modality = self

        class Slow(ToyEncoder):
            def forward(self, x, lengths):
                if modality.where == "encoder":
                    modality._wait()
                return super().forward(x, lengths)

        return Slow(d_model)


GATED = Attachment(b"abcd", "application/x-gated")


@pytest.mark.parametrize("where", ["encoder", "decode"])
async def test_a_slow_plugin_times_out_and_holds_no_other_modality(where):
    slow = Gated(where)
    c = config(gated={"timeout_seconds": 0.3})
    async with Engine(c, plugins=host_with(slow, name="sluggish")) as engine:
        try:
            stuck = await engine.stream("a", "look", [GATED])
            with pytest.raises(PluginTimeout, match=rf"plugin 'sluggish' failed: {where} of "
                               r"modality 'gated' took longer than 0.3s") as info:
                await stuck.wait()
            assert info.value.code == "plugin_timeout" and info.value.plugin == "sluggish"
            assert slow.entered.is_set() and not slow.gate.is_set()  # still stuck
            # other sessions, with another modality or none, go on meanwhile
            other = await asyncio.wait_for(engine.reply("b", "look", [TOY]), 60)
            assert other.attention["toy"] > 0
            assert (await asyncio.wait_for(engine.reply("c", "hi"), 60)).completion_tokens
            assert await engine.store.load("a") is None  # nothing of the failed turn kept
        finally:
            slow.gate.set()


async def test_cancel_stops_a_turn_waiting_for_a_slow_plugin():
    slow = Gated("encoder")
    async with Engine(config(), plugins=host_with(slow)) as engine:
        try:
            stream = await engine.stream("a", "look", [GATED])
            await asyncio.to_thread(slow.entered.wait, 60)
            stream.cancel()
            with pytest.raises(Cancelled):
                await asyncio.wait_for(stream.wait(), 60)
        finally:
            slow.gate.set()


class Returns(ToyModality):
    """decode or the encoder returns what ``bad`` makes of the right answer."""

    name = "returns"
    mime_types = ("application/x-returns",)

    def __init__(self, where, bad):
        super().__init__()
        self.where, self.bad = where, bad

    def decode(self, data, mime_type):
        features = super().decode(data, mime_type)
        return self.bad(features) if self.where == "decode" else features

    def build_encoder(self, d_model):
        modality = self

        class Bad(ToyEncoder):
            def forward(self, x, lengths):
                vectors, mask = super().forward(x, lengths)
                if modality.where == "encoder":
                    return modality.bad((vectors, mask))
                return vectors, mask

        return Bad(d_model)


def _nan(out):
    vectors, mask = out
    return vectors * float("nan"), mask


BAD = [
    ("decode", lambda f: f.numpy(), "tensor", "decode returned ndarray"),
    ("decode", lambda f: f.double(), "float32", "dtype torch.float64"),
    ("decode", lambda f: f * float("inf"), "finite", "NaN or infinite"),
    ("decode", lambda f: f[:0], "non_empty", "at least one axis and one value"),
    ("encoder", _nan, "finite", "NaN or infinite vectors"),
    ("encoder", lambda out: (out[0][..., :5], out[1]), "shape", "expected (1, N, 32)"),
    ("encoder", lambda out: (out[0], out[1].float()), "mask", "expected bool"),
    ("encoder", lambda out: out[0], "encoder_output", "(vectors, mask)"),
]


@pytest.mark.parametrize(("where", "bad", "rule", "says"), BAD,
                         ids=[f"{w}-{r}" for w, _, r, _ in BAD])
async def test_bad_output_is_a_plugin_error_naming_the_rule_and_nothing_is_stored(
        where, bad, rule, says):
    async with Engine(config(), plugins=host_with(Returns(where, bad), name="sloppy")) as engine:
        await engine.reply("s", "hello")
        before = await engine.store.load("s")
        stream = await engine.stream("s", "look", [Attachment(b"abcd", "application/x-returns")])
        with pytest.raises(PluginError, match=r"plugin 'sloppy' failed: ") as info:
            await stream.wait()
        assert f"(rule: {rule})" in str(info.value) and says in str(info.value)
        assert info.value.code == "plugin_error"
        after = await engine.store.load("s")
        assert (after.memory, after.history) == (before.memory, before.history)
        # the session goes on, and everything about it is finite JSON
        reply = await engine.reply("s", "look", [TOY])
        json.dumps(reply.to_dict(), allow_nan=False)
        assert all(math.isfinite(v) for v in reply.attention.values())


class Flaky(ToyModality):
    """decode fails on b"bad!" (a plugin bug), works otherwise."""

    name = "flaky"
    mime_types = ("application/x-flaky",)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def decode(self, data, mime_type):
        self.calls += 1
        if data == b"bad!":
            raise ValueError("plugin bug")
        return super().decode(data, mime_type)


def flaky(data):
    return Attachment(data, "application/x-flaky")


async def test_a_plugin_that_keeps_failing_is_taken_out_of_service():
    plugin = Flaky()
    c = config(breaker_failures=2, breaker_cooldown_seconds=3600)
    async with Engine(c, plugins=host_with(plugin, name="flakes")) as engine:
        for _ in range(2):
            with pytest.raises(PluginError, match="decode raised ValueError: plugin bug"):
                await engine.reply("s", "look", [flaky(b"bad!")])
        calls = plugin.calls
        with pytest.raises(PluginUnavailable, match=r"plugin 'flakes' failed: modality 'flaky' "
                           r"is out of service after 2 failures in a row") as info:
            await engine.reply("s", "look", [flaky(b"good")])
        assert info.value.code == "plugin_unavailable" and plugin.calls == calls
        health = {h["modality"]: h for h in engine.plugin_health()}
        assert health["flaky"]["state"] == "open" and health["flaky"]["failures"] == 2
        assert health["toy"]["state"] == "closed"
        assert (await engine.reply("t", "look", [TOY])).attention["toy"] > 0


async def test_after_the_cool_down_one_good_call_brings_it_back():
    plugin = Flaky()
    c = config(breaker_failures=1, breaker_cooldown_seconds=0)
    async with Engine(c, plugins=host_with(plugin)) as engine:
        with pytest.raises(PluginError):
            await engine.reply("s", "look", [flaky(b"bad!")])
        assert {h["modality"]: h["state"] for h in engine.plugin_health()}["flaky"] == "half_open"
        reply = await engine.reply("s", "look", [flaky(b"good")])
        assert reply.attention["flaky"] > 0
        assert {h["modality"]: h["state"] for h in engine.plugin_health()}["flaky"] == "closed"


def test_the_breaker_opens_waits_its_cool_down_and_lets_one_probe_through():
    now = [0.0]
    breaker = Breaker(threshold=3, cooldown=10.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.failed()
    assert breaker.admit() and breaker.state == "closed"
    breaker.failed()
    assert breaker.state == "open" and not breaker.admit() and breaker.retry_in() == 10.0
    now[0] = 10.0
    assert breaker.admit() and not breaker.admit()  # one probe at a time
    breaker.failed()  # the probe failed: open again for a whole cool-down
    assert breaker.state == "open" and breaker.retry_in() == 10.0
    now[0] = 20.0
    assert breaker.admit()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.admit() and breaker.failures == 4


def test_timeouts_are_checked_and_never_reach_the_plugin():
    with pytest.raises(ConfigError, match=r"plugins.image.timeout_seconds = -1"):
        PluginHost(settings={"image": {"timeout_seconds": -1}})
    host = PluginHost(settings={"image": {"timeout_seconds": 2.5, "size": 32}})
    settings = host.modalities["image"].settings  # read_settings would refuse the timeout
    assert settings["size"] == 32 and "timeout_seconds" not in settings


class Rival(ToyModality):
    """Another plugin's modality that also takes the toy MIME type."""

    name = "a_rival"
    priority = 10


async def test_the_modality_chosen_is_one_the_loaded_model_has(tmp_path):
    import toy_plugin

    only_toy = PluginHost(entry_points=False)
    only_toy.register(toy_plugin, "toy")
    async with Engine(config(), plugins=only_toy) as engine:  # a model with "toy" only
        checkpoint.save(tmp_path / "ckpt", engine.model, engine.tokenizer, engine.modalities)
    c = from_dict({"model": {"checkpoint": str(tmp_path / "ckpt")},
                   "generation": {"max_new_tokens": 4}}, env={})
    async with Engine(c, plugins=host_with(Rival(), name="rival")) as engine:
        assert set(engine.served_modalities) == {"toy"}
        reply = await engine.reply("s", "look", [TOY])  # no modality named
        assert reply.attention["toy"] > 0
        with pytest.raises(UnsupportedMedia, match="not trained with modality 'a_rival'"):
            await engine.stream("s", "look", [Attachment(TOY.data, TOY.mime_type, "a_rival")])


class Humble(Rival):
    priority = -1


@pytest.mark.parametrize(("rival", "chosen"), [(Rival, "a_rival"), (Humble, "toy")])
async def test_among_served_modalities_the_highest_priority_wins(rival, chosen):
    async with Engine(config(), plugins=host_with(rival(), name="rival")) as engine:
        assert set(engine.served_modalities) == {"toy", "a_rival"}
        reply = await engine.reply("s", "look", [TOY])
        assert set(reply.attention) == {chosen}


async def test_websocket_clients_see_the_codes_and_readyz_and_metrics_say_so():
    from test_server import http_get

    from mmchat.client import Client, ServerError
    from mmchat.server import ChatServer

    slow = Gated("decode")
    c = from_dict({"model": dict(TINY_MODEL), "generation": {"max_new_tokens": 4},
                   "server": {"messages_per_second": 100.0, "burst": 50,
                              "ping_interval_seconds": 0.0},
                   "plugins": {"breaker_failures": 1, "breaker_cooldown_seconds": 3600,
                               "gated": {"timeout_seconds": 0.3}}}, env={})
    engine = Engine(c, plugins=host_with(slow, name="sluggish"))
    server = await ChatServer(c, engine=engine).start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with await Client.connect(server.url) as client:
            assert {m.name for m in client.modalities} == {"toy", "gated"}
            for code in ("plugin_timeout", "plugin_unavailable"):
                with pytest.raises(ServerError) as info:
                    await client.reply("look", [GATED], timeout=60)
                assert info.value.code == code and "'sluggish'" in str(info.value)
            assert (await client.reply("look", [TOY], timeout=60)).done.text is not None
        status, _, body = await asyncio.to_thread(http_get, base + "/readyz")
        assert status == 200 and body.startswith("ready; degraded: modality 'gated' (plugin "
                                                 "'sluggish') is out of service")
        metrics = (await asyncio.to_thread(http_get, base + "/metrics"))[2]
        assert 'mmchat_plugin_up{modality="gated",plugin="sluggish"} 0.0' in metrics
        assert 'mmchat_plugin_up{modality="toy",plugin="toy"} 1.0' in metrics
        assert 'mmchat_plugin_failures{modality="gated",plugin="sluggish"} 1.0' in metrics
    finally:
        slow.gate.set()
        await server.shutdown(drain_seconds=10)
        await engine.close()


class Judging(Gated):
    """Every payload's decode waits at the gate; ``is_costly`` reads the first byte
    (``b"C"``: costly; ``b"!"``: the plugin's own check raises)."""

    name = "judging"
    mime_types = ("application/x-judging",)

    def __init__(self):
        super().__init__("decode")
        self.at_gate = {True: 0, False: 0}  # costly or not: decodes waiting at the gate
        self.lock = threading.Lock()

    def is_costly(self, data, mime_type):
        if data.startswith(b"!"):
            raise RuntimeError("cannot judge")
        return data.startswith(b"C")

    def decode(self, data, mime_type):
        with self.lock:
            self.at_gate[data.startswith(b"C")] += 1
        return super().decode(data, mime_type)


def judged(first: bytes) -> Attachment:
    return Attachment(first + b"bcd", "application/x-judging")


async def test_costly_decodes_leave_a_thread_to_cheap_ones_and_a_failing_judge_is_the_plugins():
    judging = Judging()

    async def until(check) -> None:
        async with asyncio.timeout(60):
            while not check():
                await asyncio.sleep(0.01)

    async with Engine(config(decode_threads=3), plugins=host_with(judging)) as engine:
        try:
            bigs = [await engine.stream(f"big{i}", "look", [judged(b"C")]) for i in range(4)]
            await until(lambda: judging.at_gate[True] == 2)  # decode_threads - 1
            small = await engine.stream("small", "look", [judged(b"c")])
            await until(lambda: judging.at_gate[False] == 1)  # the last thread was free
            assert judging.at_gate[True] == 2
            with pytest.raises(PluginError, match="is_costly raised RuntimeError"):
                await (await engine.stream("odd", "look", [judged(b"!")])).wait()
        finally:
            judging.gate.set()
        await small.wait()  # all five replies end well once the gate opens
        for big in bigs:
            await big.wait()
