"""``mmchat serve``: the WebSocket service; ``mmchat token``: mint an access token."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
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
def serve_command(config_path, host: str | None, port: int | None, http_port: int | None,
                  checkpoint, untrained: bool) -> None:
    """Serve chat over WebSocket, with /healthz, /readyz and /metrics on the same port,
    and the OpenAI-compatible endpoint on server.http_port when it is set.

    SIGTERM (or Ctrl-C) drains: no new connections, replies in flight finish (up to
    server.drain_seconds), then connections close with 1001.
    """
    config = load_config(config_path)
    if untrained:
        config = config.replace(model={"checkpoint": "untrained"})
    elif checkpoint is not None:
        config = config.replace(model={"checkpoint": str(checkpoint.resolve())})
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mmchat_logger = logging.getLogger("mmchat")
    if mmchat_logger.getEffectiveLevel() > logging.INFO:
        mmchat_logger.setLevel(logging.INFO)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # per-connection "connection open/closed" lines only with -vv
        logging.getLogger("mmchat.server.websockets").setLevel(logging.WARNING)
    asyncio.run(_serve(config, host, port, http_port))


async def _serve(config, host: str | None, port: int | None, http_port: int | None) -> None:
    from ..server import ChatServer

    server = ChatServer(config)
    await server.start(host, port, http_port=http_port)
    # Garbage-collector pauses were most of the slowest first-token times under load
    # (docs/benchmarks.md). The model, plugins and libraries loaded so far live as long
    # as the process, so full passes skip them; and the older generations are collected
    # 2x and 10x less often than Python's default (700, 10, 10).
    gc.freeze()
    gc.set_threshold(700, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.shutdown()


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
