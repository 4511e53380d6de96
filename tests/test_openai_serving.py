"""The OpenAI endpoint's HTTP port as a service: cancelling, draining, start-up, the
page, health and metrics beside it, keep-alive, ``mmchat serve --http-port`` with the
page in Chromium and curl, and the docs' Python example."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from test_openai import clients, openai_server, post, sessions_counted
from test_server import eventually, server_config
from test_web import (  # noqa: F401  (fixtures)
    BUNDLED,
    ServeProcess,
    _ask,
    _expect,
    _finished,
    _free_port,
    browser,
    page,
    question_wav,
)

from mmchat import Engine
from mmchat.server import ChatServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def server():
    async with openai_server() as s:
        yield s


async def test_a_client_that_closes_its_stream_cancels_the_reply():
    async with openai_server(generation={"max_new_tokens": 4096}) as server:
        _, client = clients(server)
        stream = await client.chat.completions.create(
            model="mmchat", messages=[{"role": "user", "content": "go on and on"}],
            stream=True)
        first = await stream.__anext__()
        session = first.model_extra["mmchat"]["session_id"]
        await stream.close()

        async def cancelled() -> bool:
            history = await server.engine.history(session)
            return len(history) == 2 and history[1]["finish_reason"] == "cancelled"

        await eventually(cancelled, limit=60)
        assert history_tokens(await server.engine.history(session)) < 4096
        await client.close()


def history_tokens(history: list[dict[str, Any]]) -> int:
    return int(history[1]["usage"]["completion_tokens"])


async def test_shutdown_drains_the_http_port_and_cancels_what_outlasts_it():
    config = server_config(server={"http_port": 0}, generation={"max_new_tokens": 4096})
    engine = Engine(config)
    server = ChatServer(config, engine=engine)
    await server.start("127.0.0.1", 0)
    _, client = clients(server)
    try:
        stream = await client.chat.completions.create(
            model="mmchat", messages=[{"role": "user", "content": "go on and on"}],
            stream=True)
        session = (await stream.__anext__()).model_extra["mmchat"]["session_id"]
        await server.shutdown(drain_seconds=0.5)
        with contextlib.suppress(openai.APIError):
            async for _ in stream:
                pass

        async def cancelled() -> bool:
            history = await engine.history(session)
            return len(history) == 2 and history[1]["finish_reason"] == "cancelled"

        await eventually(cancelled, limit=60)
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()
    finally:
        await client.close()
        await engine.close()


async def test_a_taken_http_port_fails_start_up_and_frees_the_websocket_port():
    from mmchat.errors import ConfigError

    config = server_config()
    engine = Engine(config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = ChatServer(config, engine=engine)
        try:
            with pytest.raises(ConfigError, match="server.http_port"):
                await server.start("127.0.0.1", 0, http_port=taken.getsockname()[1])
            with socket.socket() as again:  # the WebSocket port was let go
                again.bind(("127.0.0.1", server.port))
        finally:
            await engine.close()


# -- the page, health and the docs' example -------------------------------------------------

async def test_the_page_health_and_metrics_share_the_http_port(server):
    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as response:
            return response.status, response.read().decode()

    status, html = await asyncio.to_thread(get, "/")
    assert status == 200 and "<title>mmchat</title>" in html
    assert (await asyncio.to_thread(get, "/healthz")) == (200, "ok\n")
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
    assert "mmchat_store_latency_seconds" in (await asyncio.to_thread(get, "/metrics"))[1]
    status, _, raw = await asyncio.to_thread(post, server.http_url + "/v1/nothing", b"{}")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


async def test_pages_of_the_listed_origins_may_call_the_api():
    async with openai_server(server={"origins": ["https://chat.example.com"]}) as server:
        def preflight(origin: str) -> dict[str, str]:
            request = urllib.request.Request(
                server.http_url + "/v1/chat/completions", method="OPTIONS", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return dict(response.headers)
            except urllib.error.HTTPError as exc:
                return dict(exc.headers)

        allowed = await asyncio.to_thread(preflight, "https://chat.example.com")
        assert allowed["access-control-allow-origin"] == "https://chat.example.com"
        assert "POST" in allowed["access-control-allow-methods"]
        refused = await asyncio.to_thread(preflight, "https://evil.example")
        assert "access-control-allow-origin" not in {k.lower() for k in refused}


async def test_keep_alive_connections_send_at_once(server):
    """asyncio sets TCP_NODELAY only on sockets made for IPPROTO_TCP; without it a
    keep-alive client's every request waited about 40 ms for a delayed ACK."""
    client = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)

    def get() -> int:
        client.request("GET", "/healthz")
        response = client.getresponse()
        response.read()
        return response.status

    assert await asyncio.to_thread(get) == 200
    transports = [c.transport for c in server.http._uvicorn.server_state.connections]
    assert transports
    for transport in transports:
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.close()


async def test_the_docs_python_example_runs(server):
    example = ROOT / "docs" / "openai_examples" / "openai_client.py"
    env = {**os.environ, "OPENAI_BASE_URL": server.http_url + "/v1",
           "OPENAI_API_KEY": "unused"}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, str(example)], env=env,
                                   capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sessions_counted(server).get("continued") == 1, done.stdout


def test_only_the_server_package_imports_the_http_layer():
    import ast

    users = set()
    for path in (ROOT / "mmchat").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("starlette", "uvicorn") for n in names):
                users.add(path.relative_to(ROOT / "mmchat").as_posix())
    assert users == {"server/http.py"}


def test_mmchat_serve_serves_the_page_and_curl_on_the_http_port(page, tmp_path):  # noqa: F811
    """The page from the HTTP port chats over the WebSocket port (an origin list in
    force); curl streams from the same port."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    http_port = _free_port()
    server = ServeProcess({"MMCHAT_MODEL__CHECKPOINT": str(BUNDLED),
                           "MMCHAT_SERVER__ORIGINS": '["https://chat.example.com"]'},
                          tmp_path, "--http-port", str(http_port))
    server.start()
    try:
        page.goto(f"http://127.0.0.1:{http_port}/")
        _expect()(page.locator("#status")).to_have_text("Connected", timeout=30_000)
        assert _finished(_ask(page, "hello"), "stop") == "hello! how can i help you?"
        body = json.dumps({"model": "mmchat", "stream": True,
                           "messages": [{"role": "user", "content": "hello"}]})
        done = subprocess.run(
            ["curl", "-sN", f"http://127.0.0.1:{http_port}/v1/chat/completions",
             "-H", "Content-Type: application/json", "-d", body],
            capture_output=True, text=True, timeout=60)
        events = [json.loads(line[6:]) for line in done.stdout.splitlines()
                  if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert text == "hello! how can i help you?"
        assert done.stdout.rstrip().endswith("data: [DONE]")
    finally:
        server.stop()
