"""``mmchat.client`` and ``mmchat chat --url``: attachments from paths and bytes, binary
frames, unsolicited and replayed replies, errors, reconnecting, and the seq rules,
against the real server and, for the rules, a scripted one."""

from __future__ import annotations

import asyncio
import sys

import pytest
from click.testing import CliRunner
from test_server import check_reply, running_server
from websockets.asyncio.server import serve

from mmchat import Attachment
from mmchat.client import CannotConnect, Client, ConnectionLost, ServerError
from mmchat.protocol import (
    Delta,
    Done,
    Ready,
    Started,
    Usage,
    parse_client_event,
    serialize,
    verify_token,
)


@pytest.fixture
async def server():
    async with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    """A PNG over the client's binary-frame threshold (noise does not compress)."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("big") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    assert path.stat().st_size > 64 * 1024
    return path


async def test_attachments_from_paths_bytes_and_objects(server, image_dir, big_png):
    png = (image_dir / "circle.png").read_bytes()
    async with await Client.connect(server.url) as client:
        sent = []
        original = client._ws.send

        async def spy(frame):
            sent.append(type(frame).__name__)
            await original(frame)

        client._ws.send = spy
        for attachments in ([image_dir / "circle.png"], [str(image_dir / "circle.jpg")],
                            [(png, "image/png")], [Attachment(png, "image/png", "image")],
                            [big_png]):
            sent.clear()
            reply = await client.reply("what is it?", attachments, timeout=60)
            check_reply(reply)
            assert set(reply.done.attention) == {"image"}
            assert sent == (["str", "bytes"] if attachments[0] == big_png else ["str"])
        with pytest.raises(TypeError):
            await client.send("no type", [png])


async def test_replies_it_did_not_ask_for_arrive_on_next_reply(server):
    async with await Client.connect(server.url) as first:
        asked = [await first.reply(f"message {i}") for i in range(2)]
    async with await Client.connect(server.url, session_id=first.session_id,
                                    last_seq=0) as second:
        replayed = [await second.next_reply(20) for _ in asked]
        for mine, theirs in zip(asked, replayed):
            await theirs.wait(20)
            assert theirs.message_id == mine.message_id
            assert theirs.done == mine.done and theirs.deltas == mine.deltas
        assert second.last_seq == first.last_seq


async def test_a_refused_message_raises_and_others_go_on(server):
    async with await Client.connect(server.url) as client:
        refused = await client.send("", message_id="empty")
        with pytest.raises(ServerError) as caught:
            async for _ in refused:
                pass
        assert (caught.value.code, caught.value.ref, caught.value.fatal) == (
            "empty_message", "empty", False)
        assert (await client.reply("fine")).done.text


async def test_resuming_twice_repeats_nothing(server):
    async with await Client.connect(server.url) as client:
        reply = await client.reply("hello")
        for _ in range(2):
            await client.resume()
            assert await client.ping()
        assert reply.done.seq == client.last_seq
        with pytest.raises(asyncio.TimeoutError):
            await client.next_reply(0.2)


async def test_connection_errors(server):
    with pytest.raises(CannotConnect, match="cannot connect"):
        await Client.connect("ws://127.0.0.1:9/")
    with pytest.raises(CannotConnect):
        await Client.connect("http://not-a-websocket-url/")
    client = await Client.connect(server.url)
    await client.close()
    with pytest.raises(ConnectionLost, match="resume"):
        await client.send("hello")
    with pytest.raises(RuntimeError):
        await Client("ws://x").resume()


async def test_seq_rules_against_a_scripted_server():
    """Duplicates of seen events are dropped; a reply numbered from 1 again (a session
    store that lost the session) is followed, not dropped."""
    script = [
        [Started("m-1", "r-1", 10), Delta("r-1", 11, "a"), Delta("r-1", 11, "a"),
         Done("r-1", 12, "a", "stop", Usage(1, 1))],
        [Done("r-1", 12, "a", "stop", Usage(1, 1)), Started("m-2", "r-2", 1),
         Delta("r-2", 2, "b"), Done("r-2", 3, "b", "stop", Usage(1, 1))],
    ]

    async def handler(ws):
        assert parse_client_event(await ws.recv()).type == "hello"
        await ws.send(serialize(Ready("s-1")))
        for events in script:
            parse_client_event(await ws.recv())
            for event in events:
                await ws.send(serialize(event))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as scripted:
        port = scripted.sockets[0].getsockname()[1]
        async with await Client.connect(f"ws://127.0.0.1:{port}/") as client:
            one = await client.reply("x", message_id="m-1", timeout=10)
            assert [d.seq for d in one.deltas] == [11] and client.last_seq == 12
            two = await client.reply("y", message_id="m-2", timeout=10)
            assert [d.text for d in two.deltas] == ["b"] and client.last_seq == 3


def test_mmchat_token_mints_tokens_the_server_accepts(monkeypatch, tmp_path):
    from mmchat.commands.serve import token_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMCHAT_SERVER__AUTH_SECRET_ENV", "TEST_TOKEN_SECRET")
    monkeypatch.setenv("TEST_TOKEN_SECRET", "0123456789abcdef-secret")
    result = CliRunner().invoke(token_command, ["alice", "--ttl", "60"])
    assert result.exit_code == 0, result.output
    assert verify_token(b"0123456789abcdef-secret", result.output.strip(), 0) == "alice"
    monkeypatch.setenv("MMCHAT_SERVER__AUTH_SECRET_ENV", "")
    result = CliRunner().invoke(token_command, ["alice"])
    assert result.exit_code != 0 and "does not use tokens" in str(result.exception)


async def _chat(url: str, script: str, cwd) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mmchat", "chat", "--url", url, cwd=cwd,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_chat_url_uses_the_same_repl(server, image_dir, tmp_path):
    script = "\n".join([
        "hello",
        f"/image {image_dir / 'circle.png'} what colour is the circle?",
        f"/image {image_dir / 'corrupt.png'} broken",
        "/reset",
        "again",
        "/quit",
    ]) + "\n"
    code, out, err = await _chat(server.url, script, tmp_path)
    assert code == 0, err
    assert f"mmchat — {server.url}. Session " in out
    assert out.count("bot> ") == 4
    assert "error [corrupt_media]" in out and "(conversation reset)" in out


async def test_chat_url_reports_a_server_it_cannot_reach(tmp_path):
    code, out, err = await _chat("ws://127.0.0.1:9/", "hello\n", tmp_path)
    assert code == 2 and "cannot connect to ws://127.0.0.1:9/" in err
