"""``mmchat sessions``: list, export and erase a subject's sessions in the configured
store (``[sessions]``), and print admin tokens. No model is loaded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import ConfigError, InputError
from .options import config_option, load_config

T = TypeVar("T")


def register(cli: click.Group) -> None:
    cli.add_command(sessions_group)


@click.group("sessions")
def sessions_group() -> None:
    """A subject's sessions in the configured store: list, export, erase."""


def _with_store(config_path: Path | None, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(store)`` against the store ``[sessions]`` configures, then close it."""
    from ..stores import open_store

    config = load_config(config_path)
    if config.sessions.backend == "memory":
        raise ConfigError("sessions.backend is 'memory': its sessions live inside the "
                          "serving process, so this command cannot reach them; use the "
                          "server's admin endpoint (docs/api.md) or a Redis store")

    async def run() -> T:
        store = open_store(config.sessions)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _subject(subject: str) -> str:
    from ..subjects import validate_subject

    try:
        return validate_subject(subject)
    except ValueError as exc:
        raise InputError(str(exc)) from None


@sessions_group.command("list")
@config_option
@click.argument("subject")
def list_command(config_path: Path | None, subject: str) -> None:
    """Print the ids of SUBJECT's live sessions, one a line."""
    from ..subjects import subject_sessions

    for session_id in _with_store(config_path,
                                  lambda store: subject_sessions(store, _subject(subject))):
        click.echo(session_id)


@sessions_group.command("export")
@config_option
@click.argument("subject", required=False)
@click.option("--session", "session_id", default=None, help="Export this session instead.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write here (default: standard output).")
def export_command(config_path: Path | None, subject: str | None, session_id: str | None,
                   output: Path | None) -> None:
    """Write the transcripts of SUBJECT's sessions (or of --session ID) as JSON Lines."""
    from ..sessions import validate_session_id
    from ..subjects import export_lines, export_records

    if (subject is None) == (session_id is None):
        raise click.UsageError("give a SUBJECT or --session ID (one of them)")
    if session_id is not None:
        try:
            validate_session_id(session_id)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    chosen = None if subject is None else _subject(subject)
    records = _with_store(config_path, lambda store: export_records(
        store, session_id, subject=chosen))
    text = export_lines(records)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"{len(records)} messages written to {output}", err=True)


@sessions_group.command("erase")
@config_option
@click.argument("subject")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def erase_command(config_path: Path | None, subject: str, yes: bool) -> None:
    """Erase every trace of SUBJECT's sessions; print what was erased (JSON)."""
    from ..subjects import erase_subject

    chosen = _subject(subject)
    if not yes:
        click.confirm(f"Erase every session of {chosen!r}? This cannot be undone",
                      abort=True)
    erased = _with_store(config_path, lambda store: erase_subject(store, chosen))
    click.echo(json.dumps({"subject": chosen, "erased": erased.as_dict()},
                          ensure_ascii=False))


@sessions_group.command("admin-token")
@config_option
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Seconds the token stays valid.")
def admin_token_command(config_path: Path | None, ttl: int) -> None:
    """Print a token for the server's admin endpoint, signed with the secret that
    server.auth_secret_env names."""
    from ..admin import make_admin_token
    from ..server.auth import Auth

    auth = Auth.from_config(load_config(config_path).server)
    if auth.secret is None:
        raise ConfigError("server.auth_secret_env is empty: this server has no admin "
                          "endpoint")
    click.echo(make_admin_token(auth.secret, int(time.time()) + ttl))
