"""The chat page (mmchat/web/) and its JavaScript client, in a real Chromium.

The first tests check the static serving over HTTP (headers, caching, size, origins).
The browser tests drive Debian's ``chromium`` with Playwright against real ``mmchat
serve`` processes: the bundled model for what the replies say, an untrained model
(whose replies run to the token limit) for stopping a reply and for killing its server
mid-reply. They type, pick, drop and paste files, speak through Chromium's fake
microphone and read what the page shows; every wait is for something visible.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from html.parser import HTMLParser
from pathlib import Path

import pytest
from alt_renderer import draw_scene
from test_redis_store import needs_redis, redis_server  # noqa: F401  (a fixture)
from test_server import running_server, server_config
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mmchat.config import SessionsConfig
from mmchat.protocol import make_token
from mmchat.server.web import PATHS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "mmchat" / "bundled_model"
WEB = ROOT / "mmchat" / "web"
JS_TESTS = Path(__file__).parent / "web" / "mmchat.test.js"
SECRET = "web-test-secret-0123456789"
#: Milliseconds a browser test waits for what a reply shows (model loads, a loaded machine).
REPLY_MS = 90_000
RED_CIRCLE = draw_scene([("circle", "red", (0, 1))])


def _get(url: str, headers: dict[str, str] | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def _http(server) -> str:
    return server.url.replace("ws://", "http://")


# -- the static files, over plain HTTP --------------------------------------------------

class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [name for name, _ in attrs if name.startswith("on")]


async def test_the_page_is_served_with_csp_caching_headers_and_no_inline_script():
    async with running_server() as server:
        http = _http(server)
        status, headers, body = await asyncio.to_thread(_get, http)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert body == (WEB / "index.html").read_bytes()
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-cache"
        status, again, body = await asyncio.to_thread(
            _get, http + "app.js", {"If-None-Match": headers["ETag"]})
        assert status == 200 and again["Content-Type"] == "text/javascript; charset=utf-8"
        status, _, body = await asyncio.to_thread(
            _get, http + "app.js", {"If-None-Match": again["ETag"]})
        assert (status, body) == (304, b"")
        status, _, _ = await asyncio.to_thread(_get, http + "../pyproject.toml")
        assert status == 404
        parser = _Scripts()
        parser.feed((WEB / "index.html").read_text())
        assert parser.scripts == [{"type": "module", "src": "app.js"}]
        assert parser.handlers == []
        assert server.web.size <= 100 * 1024, server.web.size
        assert {f"/{p.name}" for p in WEB.iterdir()} | {"/"} == set(PATHS)


async def test_the_page_can_be_switched_off():
    async with running_server(server_config(server={"web": False})) as server:
        status, _, _ = await asyncio.to_thread(_get, _http(server) + "app.js")
        assert status == 404
        status, _, _ = await asyncio.to_thread(_get, _http(server))
        assert status == 426  # "/" is the WebSocket alone again


async def test_the_origin_list_admits_the_pages_own_origin():
    config = server_config(server={"origins": ["https://chat.example.com"]})
    async with running_server(config) as server:
        own = f"http://127.0.0.1:{server.port}"
        for origin in (own, "https://chat.example.com"):
            async with connect(server.url, origin=origin):
                pass
        with pytest.raises(InvalidStatus, match="403"):
            await connect(server.url, origin="http://evil.example")
        with pytest.raises(InvalidStatus, match="403"):
            await connect(server.url, origin=f"http://127.0.0.1:{server.port + 1}")


# -- mmchat serve processes and the browser ----------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """``mmchat serve`` in a subprocess, started again on the same port after a kill."""

    def __init__(self, env: dict[str, str], cwd: Path, *args: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MMCHAT_")}
        self.env.update(env)
        self.cwd = cwd
        self.args = args
        self.port = _free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, limit: float = 180.0) -> None:
        ready = threading.Event()
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "mmchat", "serve", *self.args, "--host", "127.0.0.1",
             "--port", str(self.port)], env=self.env, cwd=self.cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def read() -> None:
            for line in proc.stderr:
                self.lines.append(line)
                if "ready on ws://" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(limit) and proc.poll() is None, "".join(self.lines[-30:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed and could not be (.ci/run installs Debian's "
                    "chromium package with apt-get); the browser tests need it")
    return found


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as clip:
        return clip.getnframes() / clip.getframerate()


@pytest.fixture(scope="module")
def question_wav(speech_dir) -> Path:
    return speech_dir / "question.wav"


@pytest.fixture(scope="module")
def browser(question_wav):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={question_wav}%noloop"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda err: page.problems.append(f"uncaught: {err}"))
    page.on("console", lambda msg: "Content Security Policy" in msg.text
            and page.problems.append(msg.text))
    page.on("dialog", lambda dialog: (page.problems.append(f"dialog: {dialog.message}"),
                                      dialog.dismiss()))
    yield page
    context.close()
    assert page.problems == []


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A ``mmchat serve`` with the bundled model and the in-process session store."""
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.fail(f"the bundled model is missing from {BUNDLED}")
    server = ServeProcess({"MMCHAT_MODEL__CHECKPOINT": str(BUNDLED)},
                          tmp_path_factory.mktemp("serve"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_replies(tmp_path_factory, redis_server):  # noqa: F811
    """An untrained model (replies run to 4096 tokens) on Redis, with tokens required
    and an Origin allow-list that names another site only."""
    server = ServeProcess({
        "MMCHAT_MODEL__CHECKPOINT": "untrained", "MMCHAT_GENERATION__MAX_NEW_TOKENS": "4096",
        "MMCHAT_GENERATION__LOOP_NGRAM": "0",  # an untrained reply repeats itself: let it run
        "MMCHAT_SESSIONS__BACKEND": "redis", "MMCHAT_SESSIONS__URL": redis_server.url,
        "MMCHAT_SESSIONS__PREFIX": f"web{os.getpid()}",
        "MMCHAT_SESSIONS__LOCK_LEASE_SECONDS": "1", "MMCHAT_SERVER__RESUME_IDLE_SECONDS": "1",
        "MMCHAT_SERVER__ORIGINS": '["https://chat.example.com"]',
        "MMCHAT_SERVER__AUTH_SECRET_ENV": "WEB_TEST_SECRET", "WEB_TEST_SECRET": SECRET,
    }, tmp_path_factory.mktemp("serve"), "--untrained")
    server.start()
    yield server
    server.stop()


def _expect():
    from playwright.sync_api import expect

    return expect


def _open(page, server, *, token: str | None = None) -> None:
    expect = _expect()
    page.goto(server.http)
    if token is not None:
        expect(page.locator("#token-form")).to_be_visible()
        page.get_by_label("This server needs an access token").fill(token)
        page.press("#token", "Enter")
    expect(page.locator("#status")).to_have_text("Connected", timeout=30_000)


def _ask(page, text: str):
    """Type ``text`` and press Enter; the reply's box."""
    count = page.locator(".msg.bot").count()
    box = page.get_by_role("textbox", name=re.compile("^Message"))
    box.fill(text)
    box.press("Enter")
    return page.locator(".msg.bot").nth(count)


def _finished(reply, finish: str = r"\w+"):
    _expect()(reply).to_have_attribute("data-finish", re.compile(finish), timeout=REPLY_MS)
    return reply.locator(".text").text_content() if reply.locator(".text").count() else None


def _file_payload(name: str, mime: str, data: bytes) -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def _handoff(page, event: str, target: str, name: str, mime: str, data: bytes) -> None:
    """Drop (or paste) a file on ``target`` the way a browser delivers one."""
    page.evaluate("""([event, target, name, mime, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: mime}));
        const init = {bubbles: true, cancelable: true};
        const ev = event === "paste"
            ? new ClipboardEvent("paste", {...init, clipboardData: transfer})
            : new DragEvent(event, {...init, dataTransfer: transfer});
        document.querySelector(target).dispatchEvent(ev);
    }""", [event, target, name, mime, base64.b64encode(data).decode()])


# -- what a person does -------------------------------------------------------------------

def test_typed_hello_streams_a_greeting(page, bundled):
    _open(page, bundled)
    reply = _ask(page, "hello")
    assert _finished(reply, "stop") == "hello! how can i help you?"
    # one text node per delta: the reply came in pieces, as they were generated
    assert reply.locator(".text").evaluate("p => p.childNodes.length") > 1
    details = reply.locator("details")
    assert details.evaluate("d => d.open") is False
    assert details.locator(".timings dt").count() >= 1
    assert page.locator(".msg.user .text").last.text_content() == "hello"
    # Shift+Enter is a new line, not a send
    page.fill("#text", "two")
    page.press("#text", "Shift+Enter")
    page.keyboard.type("lines")
    assert page.input_value("#text") == "two\nlines"
    assert page.locator(".msg.user").count() == 1


def test_the_page_fits_a_phone_and_follows_the_dark_setting(page, bundled):
    _open(page, bundled)
    background = "() => getComputedStyle(document.body).backgroundColor"
    light = page.evaluate(background)
    page.emulate_media(color_scheme="dark")
    assert page.evaluate(background) != light
    page.set_viewport_size({"width": 360, "height": 640})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    for name in ("Send", "Stop", "Record a voice message"):
        _expect()(page.get_by_role("button", name=name)).to_be_visible()


def test_a_picked_picture_is_asked_about(page, bundled):
    expect = _expect()
    _open(page, bundled)
    page.get_by_label("Add a picture or a sound").set_input_files(
        files=[_file_payload("circle.png", "image/png", RED_CIRCLE)])
    expect(page.locator("#tray img")).to_be_visible()
    reply = _ask(page, "what colour is the circle?")
    assert _finished(reply, "stop") == "the circle is red"
    expect(page.locator(".msg.user img.thumb")).to_have_attribute("alt", "picture: circle.png")
    expect(page.locator("#tray li")).to_have_count(0)
    reply.locator("summary").click()
    expect(reply.locator("dt", has_text="image")).to_be_visible()


def test_a_spoken_question_with_a_dropped_picture_is_answered(page, bundled, question_wav):
    expect = _expect()
    _open(page, bundled)
    page.get_by_role("button", name="Record a voice message").click()
    expect(page.locator("#mic")).to_have_attribute("aria-pressed", "true")
    # record the whole clip (the fake microphone plays it once) and a little silence
    page.wait_for_function("s => Number(document.getElementById('recording').dataset.seconds) >= s",
                           arg=_wav_seconds(question_wav) + 0.5, timeout=30_000)
    page.click("#mic")
    expect(page.locator("#tray audio")).to_have_count(1, timeout=30_000)
    _handoff(page, "drop", "#log", "scene.png", "image/png", RED_CIRCLE)
    expect(page.locator("#tray img")).to_have_count(1)
    count = page.locator(".msg.bot").count()
    page.click("#send")
    reply = page.locator(".msg.bot").nth(count)
    assert _finished(reply, "stop") == "the circle is red"
    expect(page.locator(".msg.user").last.locator("audio")).to_have_count(1)
    expect(page.locator(".msg.user").last.locator("img")).to_have_count(1)


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(page, bundled):
    _open(page, bundled)
    markup = "<img src=x onerror=alert(1)>"
    reply = _ask(page, markup)
    _finished(reply)
    assert page.locator(".msg.user .text").last.text_content() == markup
    assert page.locator("#log img").count() == 0
    # page.problems (checked by the fixture) would hold the alert's dialog


def test_an_oversized_picture_shows_the_error_and_the_next_message_works(
        page, bundled, image_dir):
    expect = _expect()
    _open(page, bundled)
    _handoff(page, "paste", "#text", "huge.png", "image/png",
             (image_dir / "huge.png").read_bytes())
    expect(page.locator("#tray img")).to_have_count(1)
    count = page.locator(".msg.bot").count()
    page.click("#send")
    refused = page.locator(".msg.bot").nth(count)
    _finished(refused, "refused")
    error = refused.locator(".error")
    expect(error).to_have_attribute("data-code", "media_too_large")
    expect(error).to_contain_text("That file is too large for this server.")
    assert _finished(_ask(page, "hello"), "stop") == "hello! how can i help you?"


def test_the_js_client_unit_tests_pass_in_the_browser(page, bundled):
    _open(page, bundled)
    page.route("**/__tests__/mmchat.test.js", lambda route: route.fulfill(
        body=JS_TESTS.read_text(), content_type="text/javascript"))
    results = page.evaluate("async () => (await import('/__tests__/mmchat.test.js')).run()")
    assert len(results) >= 8
    failed = [(r["name"], r["error"]) for r in results if not r["ok"]]
    assert failed == [], json.dumps(failed, indent=1)


@needs_redis
def test_stop_cancels_a_reply_mid_way(page, long_replies):
    expect = _expect()
    wrong = make_token(SECRET + "-not", "tester", int(time.time()) + 3600)
    page.goto(long_replies.http)
    page.get_by_label("This server needs an access token").fill(wrong)
    page.press("#token", "Enter")
    expect(page.locator("#status")).to_have_text("The access token was refused.")
    _open(page, long_replies, token=make_token(SECRET, "tester", int(time.time()) + 3600))
    reply = _ask(page, "tell me a long story")
    expect(reply.locator(".text")).to_have_text(re.compile(r"\S"), timeout=REPLY_MS)
    expect(page.locator("#stop")).to_be_enabled()
    page.get_by_role("button", name="Stop").click()
    _finished(reply, "cancelled")
    expect(reply.locator(".note")).to_have_text("(stopped)")
    expect(page.locator("#stop")).to_be_disabled()


@needs_redis
def test_a_reply_survives_its_server_being_killed_and_restarted(page, long_replies,
                                                              redis_server):  # noqa: F811
    expect = _expect()
    token = make_token(SECRET, "tester", int(time.time()) + 3600)
    _open(page, long_replies, token=token)
    reply = _ask(page, "tell me a long story")
    expect(reply.locator(".text")).to_have_text(re.compile(r"\S"), timeout=REPLY_MS)
    long_replies.kill()
    expect(page.locator("#status")).to_have_text("Reconnecting…")
    long_replies.start()
    expect(page.locator("#status")).to_have_text("Resumed", timeout=REPLY_MS)
    shown = _finished(reply, "error")
    expect(reply.locator(".error")).to_have_attribute("data-code", "reply_lost")
    session_id = page.locator("body").get_attribute("data-session")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright owns this thread's loop
        stored = pool.submit(asyncio.run, _stored_reply(
            redis_server.url, long_replies.env, session_id)).result(60)
    assert shown == stored and shown.strip()  # nothing doubled, nothing lost
    after = _ask(page, "are you there?")  # the session goes on (stopped: it is long)
    expect(after.locator(".text")).to_have_text(re.compile(r"\S"), timeout=REPLY_MS)
    page.click("#stop")
    _finished(after, "cancelled")


async def _stored_reply(url: str, env: dict[str, str], session_id: str) -> str:
    """The text of the last reply of the session, as the server stored it."""
    from mmchat.stores import open_store

    store = open_store(SessionsConfig(backend="redis", url=url,
                                      prefix=env["MMCHAT_SESSIONS__PREFIX"]))
    try:
        entries = await store.read_stream(session_id, 0)
    finally:
        await store.close()
    return [e for e in entries if e.kind == "done"][-1].text
