"""The admin endpoint: Sans-I/O (mmchat.admin.handle_admin) and served by the WebSocket
server over real HTTP, where a token's subject owns the sessions it makes."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from http import HTTPStatus

from test_server import running_server, server_config

from mmchat.admin import handle_admin, make_admin_token
from mmchat.client import Client
from mmchat.protocol import make_token
from mmchat.stores.memory import MemoryStore

SECRET = "admin-test-secret-0123456789"
NOW = 1_000_000.0
ADMIN = f"Bearer {make_admin_token(SECRET, int(NOW) + 60)}"


async def _call(store, method: str, target: str, authorization: str | None = ADMIN,
                secret: bytes | None = SECRET.encode()):
    return await handle_admin(store, secret, method, target, authorization, now=NOW)


async def _sessions_of(store, subject: str, *ids: str) -> None:
    for sid in ids:
        await store.claim_session(sid, f"sub:{subject}")
        await store.save_turn(sid, state=b"s", memory_added=[], max_memory=4, turns=[
            {"role": "user", "id": f"{sid}-u", "time": "t", "text": "hi", "attachments": []},
            {"role": "assistant", "id": f"{sid}-a", "time": "t", "text": "hello",
             "finish_reason": "stop"}])


async def test_only_an_admin_token_opens_it():
    store = MemoryStore()
    path = "/admin/subjects/alice/sessions"
    user_token = make_token(SECRET, "admin", int(NOW) + 60)  # a user's, subject "admin"
    for authorization, why in [(None, "Bearer"), ("Basic abc", "Bearer"),
                               (f"Bearer {user_token}", "bad signature"),
                               ("Bearer v1.x", "malformed"),
                               (f"Bearer {make_admin_token(SECRET, int(NOW) - 1)}",
                                "expired")]:
        answer = await _call(store, "GET", path, authorization)
        assert answer.status == HTTPStatus.UNAUTHORIZED, authorization
        assert why in json.loads(answer.body)["message"]
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    off = await _call(store, "GET", path, secret=None)
    assert off.status == HTTPStatus.NOT_FOUND and b"auth_secret_env" in off.body
    assert await _call(store, "GET", "/healthz") is None


async def test_list_export_and_erase_a_subject():
    store = MemoryStore()
    await _sessions_of(store, "José", "j1", "j2")
    await _sessions_of(store, "bob", "b1")
    quoted = urllib.parse.quote("José", safe="")
    listed = await _call(store, "GET", f"/admin/subjects/{quoted}/sessions?x=1")
    assert listed.status == HTTPStatus.OK and listed.headers["Cache-Control"] == "no-store"
    assert json.loads(listed.body) == {"subject": "José", "sessions": ["j1", "j2"]}
    exported = await _call(store, "GET", f"/admin/subjects/{quoted}/export")
    assert exported.headers["Content-Type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in exported.body.decode().splitlines()]
    assert [(r["session"], r["role"], r["subject"]) for r in lines] == [
        ("j1", "user", "José"), ("j1", "assistant", "José"), ("j2", "user", "José"),
        ("j2", "assistant", "José")]
    erased = await _call(store, "DELETE", f"/admin/subjects/{quoted}")
    assert json.loads(erased.body)["erased"] == {
        "sessions": 2, "messages": 4, "memory": 0, "stream_events": 0, "message_ids": 0}
    assert await store.load("j1") is None and await store.load("b1") is not None
    again = await _call(store, "GET", f"/admin/subjects/{quoted}/erase")
    assert json.loads(again.body)["erased"]["sessions"] == 0


async def test_bad_requests_are_named():
    store = MemoryStore()
    for method, target, status, code in [
            ("GET", "/admin/subjects/alice", 405, "method_not_allowed"),
            ("DELETE", "/admin/subjects/alice/sessions", 405, "method_not_allowed"),
            ("POST", "/admin/subjects/alice/erase", 405, "method_not_allowed"),
            ("GET", "/admin/users", 404, "no_such_path"),
            ("GET", "/admin/subjects/%FF/sessions", 400, "bad_subject"),
            ("GET", f"/admin/subjects/{'x' * 257}/sessions", 400, "bad_subject")]:
        answer = await _call(store, method, target)
        assert (answer.status, json.loads(answer.body)["error"]) == (status, code), target
    assert (await _call(store, "GET", "/admin/subjects/alice")).headers["Allow"] == "DELETE"


def _get(url: str, token: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            assert response.headers["Content-Length"] == str(len(body))
            return response.status, response.headers["Content-Type"], body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def test_the_server_serves_it_for_its_token_subjects():
    config = server_config(server={"auth_secret_env": "TEST_MMCHAT_SECRET"})
    async with running_server(config, env={"TEST_MMCHAT_SECRET": SECRET}) as server:
        token = make_token(SECRET, "José", 4_000_000_000)
        async with await Client.connect(server.url, token=token) as client:
            await (await client.reply("hello")).wait(30)
            session_id = client.session_id
        base = server.url.replace("ws://", "http://", 1).rstrip("/")
        admin = make_admin_token(SECRET, 4_000_000_000)
        subject = urllib.parse.quote("José", safe="")
        status, kind, body = await asyncio.to_thread(
            _get, f"{base}/admin/subjects/{subject}/sessions", admin)
        assert (status, kind) == (200, "application/json")
        assert json.loads(body)["sessions"] == [session_id]
        status, _, body = await asyncio.to_thread(
            _get, f"{base}/admin/subjects/{subject}/sessions", token)
        assert status == 401
        status, _, body = await asyncio.to_thread(
            _get, f"{base}/admin/subjects/{subject}/erase", admin)
        erased = json.loads(body)["erased"]
        assert status == 200 and erased["sessions"] == 1 and erased["messages"] == 2
        assert erased["stream_events"] >= 3  # started, deltas, done: all of them gone
        assert await server.store.load(session_id) is None
        assert await server.store.read_stream(session_id) == []


async def test_an_unreachable_store_is_a_503():
    from mmchat.stores.redis import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0", connect_timeout=1.0)
    try:
        answer = await _call(store, "GET", "/admin/subjects/alice/sessions")
    finally:
        await store.close()
    assert answer.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert json.loads(answer.body)["error"] == "store_unavailable"


def _call_http(method: str, url: str, token: str) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, method=method,
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


async def test_the_http_port_serves_it_with_delete():
    config = server_config(server={"auth_secret_env": "TEST_MMCHAT_SECRET", "http_port": 0})
    async with running_server(config, env={"TEST_MMCHAT_SECRET": SECRET}) as server:
        subject = "a/José"  # a slash in the subject: the path goes to handle_admin as sent
        token = make_token(SECRET, subject, 4_000_000_000)
        async with await Client.connect(server.url, token=token) as client:
            await (await client.reply("hello")).wait(30)
            session_id = client.session_id
        base = f"{server.http_url}/admin/subjects/{urllib.parse.quote(subject, safe='')}"
        admin = make_admin_token(SECRET, 4_000_000_000)

        def call(method: str, path: str, with_token: str = admin):
            return asyncio.to_thread(_call_http, method, base + path, with_token)

        status, headers, body = await call("GET", "/sessions")
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert json.loads(body) == {"subject": subject, "sessions": [session_id]}
        status, headers, body = await call("GET", "/export")
        assert headers["Content-Type"].startswith("application/jsonl")
        assert [json.loads(line)["session"] for line in body.splitlines()] == [session_id] * 2
        assert (await call("DELETE", "", token))[0] == 401  # a user's token is no admin's
        status, headers, _ = await call("GET", "")
        assert (status, headers["Allow"]) == (405, "DELETE")
        status, _, body = await call("DELETE", "")
        assert status == 200
        assert json.loads(body)["erased"]["sessions"] == 1
        assert await server.store.load(session_id) is None
        assert json.loads((await call("GET", "/sessions"))[2])["sessions"] == []
