"""``mmchat serve``: the WebSocket service; ``mmchat token``: mint an access token."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import click

from ..errors import ConfigError
from .options import config_option, load_config


def register(cli: click.Group) -> None:
    cli.add_command(serve_command)
    cli.add_command(token_command)


@click.command("serve")
@config_option
@click.option("--host", default=None, help="Interface to bind (overrides server.host).")
@click.option("--port", type=int, default=None,
              help="TCP port (overrides server.port; 0 picks a free one).")
@click.option("--http-port", type=int, default=None,
              help="HTTP port of the OpenAI-compatible endpoint and the page (overrides "
                   "server.http_port; 0 picks a free one, -1 turns it off).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (overrides model.checkpoint).")
@click.option("--untrained", is_flag=True, help="Serve an untrained model (gibberish).")
@click.option("--workers", default=None, metavar="N|auto",
              help="Processes serving the port, each with its own model (overrides "
                   "server.workers; more than 1 needs the Redis session store).")
def serve_command(config_path, host: str | None, port: int | None, http_port: int | None,
                  checkpoint, untrained: bool, workers: str | None) -> None:
    """Serve chat over WebSocket, with /healthz, /readyz and /metrics on the same port,
    and the OpenAI-compatible endpoint on server.http_port when it is set.

    SIGTERM (or Ctrl-C) drains: no new connections, replies in flight finish (up to
    server.drain_seconds), then connections close with 1001. With several workers,
    SIGHUP restarts them one at a time, each draining (docs/deploy.md, "Workers").
    """
    from ..server import loop as event_loop
    from ..server.worker import configure_logging, serve_until_stopped
    from ..server.workers import Supervisor, worker_count

    config = load_config(config_path)
    if untrained:
        config = config.replace(model={"checkpoint": "untrained"})
    elif checkpoint is not None:
        config = config.replace(model={"checkpoint": str(checkpoint.resolve())})
    if http_port is not None:
        config = config.replace(server={"http_port": http_port})
    if workers is not None:
        config = config.replace(server={"workers": int(workers) if workers.isdigit()
                                        else workers})
    count = worker_count(config)
    configure_logging(min(logging.getLogger().getEffectiveLevel(), logging.INFO))
    if count == 1:
        event_loop.run(serve_until_stopped(config, host, port), config.server.event_loop)
        return
    status = asyncio.run(Supervisor(config, host, port, count).run())
    if status:
        sys.exit(status)


@click.command("token")
@config_option
@click.argument("subject")
@click.option("--ttl", type=click.IntRange(min=1), default=86_400, show_default=True,
              help="Seconds until the token expires.")
def token_command(config_path, subject: str, ttl: int) -> None:
    """Print an access token for SUBJECT, signed with the secret in the environment
    variable that server.auth_secret_env names."""
    from ..protocol import make_token
    from ..server.auth import Auth

    config = load_config(config_path)
    auth = Auth.from_config(config.server)
    if not auth.required:
        raise ConfigError("server.auth_secret_env is empty: this server does not use tokens")
    try:
        click.echo(make_token(auth.secret, subject, int(time.time()) + ttl))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
