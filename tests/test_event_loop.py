"""``[server] event_loop``: which loop a server process runs on."""

import asyncio
import builtins

import pytest

from mmchat.config import from_dict
from mmchat.errors import ConfigError
from mmchat.server import loop as event_loop


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop():
    pytest.importorskip("uvloop")

    async def kind():
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert event_loop.run(kind(), "auto") == "uvloop"
    assert event_loop.run(kind(), "uvloop") == "uvloop"
    assert event_loop.run(kind(), "asyncio") == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    real = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert event_loop.loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        event_loop.loop_factory("uvloop")


def test_the_setting_is_checked():
    assert from_dict({}, env={}).server.event_loop == "auto"
    with pytest.raises(ConfigError, match="event_loop"):
        from_dict({"server": {"event_loop": "trio"}}, env={})
