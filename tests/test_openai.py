"""The OpenAI-compatible endpoint, driven by the real ``openai`` package (sync, async,
streamed, concurrent), with real pictures and espeak-ng speech, over the HTTP port of
a real server: replies, auth, limits and errors. The harness here (:func:`clients`,
:func:`sessions_counted`, ...) serves tests/test_openai_sessions.py and
tests/test_openai_serving.py too."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from test_server import SECRET, running_server, server_config

from mmchat.protocol import make_token
from mmchat.server.openai_wire import StopTrimmer, conversation_key, read_messages


def openai_server(**sections: dict[str, Any]) -> Any:
    """A running server (the tiny model) with its HTTP port on a free port."""
    sections.setdefault("server", {})["http_port"] = 0
    return running_server(server_config(**sections))


@pytest.fixture
async def server():
    async with openai_server() as s:
        yield s


def clients(server, api_key: str = "anything") -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    base = server.http_url + "/v1"
    return (openai.OpenAI(base_url=base, api_key=api_key, max_retries=0),
            openai.AsyncOpenAI(base_url=base, api_key=api_key, max_retries=0))


def sessions_counted(server) -> dict[str, float]:
    text = server.metrics.render().decode()
    return {how: float(n) for how, n in
            re.findall(r'^mmchat_openai_sessions_total\{how="(\w+)"\} (\S+)$', text, re.M)}


def follow_up(messages: list[dict[str, Any]], reply: Any, text: str) -> None:
    """Add ``reply`` (a completion, or the text a stream gave) and the user's ``text``
    to ``messages``, as a client sends its history back."""
    content = reply if isinstance(reply, str) else reply.choices[0].message.content
    messages += [{"role": "assistant", "content": content}, {"role": "user", "content": text}]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def post(url: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- the openai package, sync and async ---------------------------------------------------

async def test_models_and_a_whole_reply_with_the_sync_client(server):
    sync, _ = clients(server)

    def use() -> tuple[Any, Any]:
        return sync.models.list(), sync.chat.completions.create(
            model="mmchat", messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "hello there"}])

    models, done = await asyncio.to_thread(use)
    assert [m.id for m in models.data] == ["mmchat"]
    assert done.object == "chat.completion" and done.model == "mmchat"
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.completion_tokens > 0 and done.usage.prompt_tokens > 0
    session = done.model_extra["mmchat"]["session_id"]
    history = await server.engine.history(session)
    assert [(t["role"], t["text"]) for t in history] == [
        ("system", "be brief"), ("user", "hello there"),
        ("assistant", choice.message.content)]
    assert sessions_counted(server) == {"new": 1}


async def test_the_async_client_and_generation_settings(server):
    _, client = clients(server)
    first = await client.chat.completions.create(
        model="mmchat", messages=[{"role": "user", "content": "hi"}], temperature=0.8,
        seed=3, max_tokens=3)
    again = await client.chat.completions.create(
        model="mmchat", messages=[{"role": "user", "content": "hi"}], temperature=0.8,
        seed=3, max_tokens=3)
    assert first.usage.completion_tokens <= 3
    assert first.choices[0].message.content == again.choices[0].message.content
    history = await server.engine.history(first.model_extra["mmchat"]["session_id"])
    assert history[1]["generation"]["strategy"] == "sample"
    assert history[1]["generation"]["temperature"] == 0.8
    await client.close()


async def test_a_streamed_reply_with_usage(server):
    _, client = clients(server)
    stream = await client.chat.completions.create(
        model="mmchat", messages=[{"role": "user", "content": "tell me"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    await client.close()


async def test_a_stream_ends_before_its_stop_string_as_the_whole_reply_does(server):
    _, client = clients(server)
    messages = [{"role": "user", "content": "hello"}]
    whole = await client.chat.completions.create(model="mmchat", messages=messages)
    text = whole.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip() and len(text) > 4
    cut = await client.chat.completions.create(model="mmchat", messages=messages, stop=stop)
    stream = await client.chat.completions.create(model="mmchat", messages=messages,
                                                  stop=[stop], stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert streamed == cut.choices[0].message.content == text[:text.index(stop)]
    await client.close()


def test_the_stop_trimmer_holds_back_what_may_begin_a_stop_string():
    trimmer = StopTrimmer(["END", "##"])
    assert [trimmer.feed(p) for p in ("hel", "lo E", "N", "x #", "#tail")] == [
        "hel", "lo ", "", "ENx ", ""]
    assert trimmer.end() == "" and trimmer.text == "hello ENx "
    trimmer = StopTrimmer([])
    assert trimmer.feed("a#") + trimmer.end() == "a#"


async def test_the_events_are_server_sent_events_ending_with_done(server):
    body = json.dumps({"model": "mmchat", "stream": True,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    status, headers, raw = await asyncio.to_thread(
        post, server.http_url + "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


async def test_twenty_concurrent_streams(server):
    """From one caller, at the default per-caller limits (server.openai_burst)."""
    _, client = clients(server)

    async def chat(i: int) -> str:
        stream = await client.chat.completions.create(
            model="mmchat", messages=[{"role": "user", "content": f"hello number {i}"}],
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    texts = await asyncio.gather(*(chat(i) for i in range(20)))
    assert all(t.strip() for t in texts)
    assert sessions_counted(server) == {"new": 20}
    await client.close()


# -- pictures and voice ---------------------------------------------------------------------

async def test_a_picture_as_a_data_url(server, image_dir):
    _, client = clients(server)
    done = await client.chat.completions.create(model="mmchat", messages=[{
        "role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": data_url(image_dir / "circle.png",
                                                                "image/png")}}]}])
    extra = done.model_extra["mmchat"]
    assert extra["attention"]["image"] > 0
    history = await server.engine.history(extra["session_id"])
    assert history[0]["text"] == "what is this?"
    assert [a["modality"] for a in history[0]["attachments"]] == ["image"]
    await client.close()


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
async def test_a_voice_clip_as_input_audio(server, speech_dir, fmt):
    import io

    import soundfile

    clip = (speech_dir / "hello.wav").read_bytes()
    if fmt == "mp3":  # the same speech, encoded as MP3 by libsndfile
        samples, rate = soundfile.read(io.BytesIO(clip))
        out = io.BytesIO()
        soundfile.write(out, samples, rate, format="MP3")
        clip = out.getvalue()
    _, client = clients(server)
    done = await client.chat.completions.create(model="mmchat", messages=[{
        "role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(),
                                                    "format": fmt}}]}])
    extra = done.model_extra["mmchat"]
    assert extra["attention"]["voice"] > 0
    history = await server.engine.history(extra["session_id"])
    assert [a["mime_type"] for a in history[0]["attachments"]] == [
        {"wav": "audio/wav", "mp3": "audio/mpeg"}[fmt]]
    await client.close()


def test_messages_become_alternating_turns_after_the_leading_system_text():
    conversation = read_messages([
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "and kind"}]},
        {"role": "system", "content": " "},
        {"role": "assistant", "content": "welcome!"},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "user", "content": "and now?"}], 1024)
    assert [(t.role, t.text) for t in conversation.history] == [
        ("user", ""), ("assistant", "welcome!"), ("user", "hi\nthere"), ("assistant", "no")]
    assert (conversation.message.role, conversation.message.text) == ("user", "and now?")
    assert conversation.system == "be brief\nand kind"  # the later developer text: left out
    assert read_messages([{"role": "user", "content": "hi"}], 1024).system is None


def test_the_conversation_key_counts_what_the_session_saw():
    def key(owner: str, reply: str, system: str | None = None) -> str:
        lead = [] if system is None else [{"role": "system", "content": system}]
        conversation = read_messages([*lead, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": reply},
                                      {"role": "user", "content": "next"}], 1024)
        return conversation_key(owner, conversation.history, conversation.system)

    assert key("anonymous", "hello") == key("anonymous", " hello\n")
    assert key("anonymous", "hello") != key("anonymous", "hello!")
    assert key("anonymous", "hello") != key("sub:alice", "hello")
    # a changed system text is another conversation
    assert len({key("anonymous", "hello", s) for s in (None, "be brief", "be kind")}) == 3


# -- auth, limits and bad input -------------------------------------------------------------

async def test_auth_takes_the_websocket_servers_tokens():
    config = server_config(server={"http_port": 0, "auth_secret_env": "TEST_MMCHAT_SECRET"})
    async with running_server(config, env={"TEST_MMCHAT_SECRET": SECRET}) as server:
        for key, why in [("sk-nope", "malformed"),
                         (make_token(SECRET, "alice", 1), "expired")]:
            _, client = clients(server, key)
            with pytest.raises(openai.AuthenticationError, match=why) as caught:
                await client.chat.completions.create(
                    model="mmchat", messages=[{"role": "user", "content": "hi"}])
            assert caught.value.status_code == 401
            assert caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        status, _, raw = await asyncio.to_thread(
            post, server.http_url + "/v1/chat/completions", b"{}")
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        _, client = clients(server, make_token(SECRET, "alice", 4_000_000_000))
        done = await client.chat.completions.create(
            model="mmchat", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content
        # the same conversation from another subject is not alice's session
        messages = [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": done.choices[0].message.content},
                    {"role": "user", "content": "more"}]
        _, bob = clients(server, make_token(SECRET, "bob", 4_000_000_000))
        await bob.chat.completions.create(model="mmchat", messages=messages)
        assert sessions_counted(server) == {"new": 1, "rebuilt": 1}
        await client.chat.completions.create(model="mmchat", messages=messages)
        assert sessions_counted(server) == {"new": 1, "rebuilt": 1, "continued": 1}


async def test_bad_input_gets_openai_errors_and_the_server_goes_on(server, image_dir):
    _, client = clients(server)
    corrupt = {"type": "image_url",
               "image_url": {"url": data_url(image_dir / "corrupt.png", "image/png")}}
    cases: list[tuple[Any, type[Exception], int, str, str | None]] = [
        ([{"role": "user", "content": [corrupt]}], openai.BadRequestError, 400,
         "corrupt_media", None),
        ([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}],
         openai.BadRequestError, 400, "unsupported_part", "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]}], openai.BadRequestError, 400,
         "remote_url_refused", "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": "!!!", "format": "wav"}}]}], openai.BadRequestError, 400, "bad_input",
         "messages[0].content[0].input_audio.data"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         openai.BadRequestError, 400, "bad_input", "messages"),
        ([{"role": "tool", "content": "42", "tool_call_id": "x"}], openai.BadRequestError,
         400, "bad_input", "messages[0].role"),
        ([{"role": "user", "content": "x" * 5000}], openai.BadRequestError, 400,
         "message_too_long", None),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:application/pdf;base64,JVBERi0xLjQ="}}]}],
         openai.APIStatusError, 415,
         "unsupported_media", None),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + "A" * 40_000_000}}]}], openai.APIStatusError,
         413, "request_too_large", None),
    ]
    for messages, kind, status, code, param in cases:
        with pytest.raises(kind) as caught:
            await client.chat.completions.create(model="mmchat", messages=messages)
        assert caught.value.status_code == status, (code, caught.value)
        assert caught.value.code == code and caught.value.param == param
        assert caught.value.type == "invalid_request_error"
        assert caught.value.message
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        await client.chat.completions.create(
            model="mmchat", n=2, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"
    assert (await client.models.retrieve("mmchat")).id == "mmchat"
    status, _, raw = await asyncio.to_thread(
        post, server.http_url + "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["code"] == "malformed_json"
    stream = await client.chat.completions.create(
        model="mmchat", messages=[{"role": "user", "content": "still here?"}], stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream])
    assert sessions_counted(server) == {"new": 2}  # the corrupt picture's turn began too
    await client.close()


async def test_an_attachment_over_the_limit_and_the_rate_limit():
    config = server_config(server={"http_port": 0, "max_attachment_bytes": 1024,
                                   "openai_requests_per_second": 0.001,
                                   "openai_burst": 2})
    async with running_server(config) as server:
        _, client = clients(server)
        big = base64.b64encode(b"\0" * 2048).decode()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="mmchat", messages=[{
                "role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": big, "format": "wav"}}]}])
        assert caught.value.status_code == 413 and caught.value.code == "media_too_large"
        await client.chat.completions.create(
            model="mmchat", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model="mmchat", messages=[{"role": "user", "content": "hi"}])
        assert limited.value.status_code == 429
        assert limited.value.code == "rate_limit_exceeded"
        counted = server.metrics.render().decode()
        assert 'mmchat_errors_total{code="rate_limit_exceeded"} 1.0' in counted
        assert 'mmchat_errors_total{code="media_too_large"} 1.0' in counted
        assert int(limited.value.response.headers["Retry-After"]) >= 1


async def test_remote_image_urls_when_the_setting_allows_them(image_dir):
    fetched: list[str] = []

    class Pictures(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(image_dir), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            fetched.append(self.path)

    pictures = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=pictures.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{pictures.server_address[1]}"
    config = server_config(server={"http_port": 0, "openai_remote_urls": True})
    try:
        async with running_server(config) as server:
            _, client = clients(server)
            with pytest.raises(openai.BadRequestError, match="could not fetch") as caught:
                await client.chat.completions.create(model="mmchat", messages=[{
                    "role": "user", "content": [{"type": "image_url", "image_url": {
                        "url": base + "/missing.png"}}]}])
            assert caught.value.code == "fetch_failed"
            messages: list[dict[str, Any]] = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": base + "/circle.png"}}]}]
            done = await client.chat.completions.create(model="mmchat", messages=messages)
            assert done.model_extra["mmchat"]["attention"]["image"] > 0
            follow_up(messages, done, "and?")
            await client.chat.completions.create(model="mmchat", messages=messages)
            assert sessions_counted(server) == {"new": 1, "continued": 1}
            assert fetched.count("/circle.png") == 1  # not again for the continued session
            await client.close()
    finally:
        pictures.shutdown()
        pictures.server_close()
