"""``mmchat sessions list|export|erase|admin-token`` against the configured Redis store."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmchat.admin import handle_admin
from mmchat.cli import cli
from mmchat.commands import sessions as sessions_command
from mmchat.stores.redis import RedisStore

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _fill(prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        for sid, subject in [("e1", "José"), ("e2", "José"), ("b1", "bob")]:
            await store.claim_session(sid, f"sub:{subject}")
            await store.save_turn(sid, state=b"s", memory_added=[], max_memory=4, turns=[
                {"role": "user", "id": f"{sid}u", "time": "t", "text": "hi ✓"},
                {"role": "assistant", "id": f"{sid}a", "time": "t", "text": "hello"}])
    finally:
        await store.close()


async def _clean(prefix: str) -> list[str]:
    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        keys = [k async for k in store.client.scan_iter(f"{prefix}:*")]
        if keys:
            await store.client.delete(*keys)
        return sorted(k.decode() for k in keys)
    finally:
        await store.close()


@pytest.fixture
def config_file(tmp_path: Path):
    prefix = f"test-cli-{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_fill(prefix))
    except Exception as exc:  # StoreUnavailable
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    path = tmp_path / "config.toml"
    path.write_text(f'[sessions]\nbackend = "redis"\nurl = "{REDIS_URL}"\n'
                    f'prefix = "{prefix}"\n[server]\nauth_secret_env = "TEST_ADMIN_SECRET"\n')
    yield path, prefix
    asyncio.run(_clean(prefix))


def _register() -> None:
    if "sessions" not in cli.commands:
        sessions_command.register(cli)


def _run(*args: str, input: str | None = None, **env: str):
    _register()
    return CliRunner().invoke(cli, list(args), input=input, env=env or None)


def test_list_export_and_erase(config_file, tmp_path):
    path, prefix = config_file
    listed = _run("sessions", "list", "José", "--config", str(path))
    assert listed.exit_code == 0, listed.output
    assert listed.output.split() == ["e1", "e2"]

    out = tmp_path / "josé.jsonl"
    done = _run("sessions", "export", "José", "--config", str(path), "-o", str(out))
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert [(r["session"], r["role"]) for r in records] == [
        ("e1", "user"), ("e1", "assistant"), ("e2", "user"), ("e2", "assistant")]
    assert records[0]["text"] == "hi ✓" and records[0]["subject"] == "José"
    one = _run("sessions", "export", "--session", "b1", "--config", str(path))
    assert [json.loads(line)["subject"] for line in one.output.splitlines()] == ["bob"] * 2
    both = _run("sessions", "export", "José", "--session", "b1", "--config", str(path))
    assert both.exit_code == 2 and "one of them" in both.output

    refused = _run("sessions", "erase", "José", "--config", str(path), input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert _run("sessions", "list", "José", "--config", str(path)).output.split() == [
        "e1", "e2"]
    erased = _run("sessions", "erase", "José", "--yes", "--config", str(path))
    assert erased.exit_code == 0, erased.output
    assert json.loads(erased.output) == {"subject": "José", "erased": {
        "sessions": 2, "messages": 4, "memory": 0, "stream_events": 0, "message_ids": 0}}
    assert _run("sessions", "list", "José", "--config", str(path)).output == ""
    left = asyncio.run(_clean(prefix))
    assert left and not [k for k in left if "{e" in k]  # bob's keys only
    assert all("{b1}" in k or ":o:{" in k for k in left)


def test_bad_input_and_a_memory_store_are_named(config_file, tmp_path):
    path, _ = config_file
    bad = _run("sessions", "list", "x" * 257, "--config", str(path))
    assert bad.exit_code == 2 and "subject" in bad.output
    memory = tmp_path / "memory.toml"
    memory.write_text('[sessions]\nbackend = "memory"\n')
    refused = _run("sessions", "list", "José", "--config", str(memory))
    assert refused.exit_code == 2 and "admin endpoint" in refused.output


def test_admin_token_opens_the_admin_endpoint(config_file):
    path, prefix = config_file
    secret = "cli-admin-secret-0123456789"
    done = _run("sessions", "admin-token", "--config", str(path), "--ttl", "60",
                TEST_ADMIN_SECRET=secret)
    assert done.exit_code == 0, done.output
    missing = _run("sessions", "admin-token", "--config", str(path))
    assert missing.exit_code == 2 and "auth_secret_env" in missing.output

    async def ask() -> int:
        store = RedisStore(REDIS_URL, prefix=prefix)
        try:
            answer = await handle_admin(store, secret.encode(), "GET",
                                        "/admin/subjects/bob/sessions",
                                        f"Bearer {done.output.strip()}", now=time.time())
            assert answer is not None
            assert json.loads(answer.body)["sessions"] == ["b1"]
            return answer.status
        finally:
            await store.close()

    assert asyncio.run(ask()) == 200
