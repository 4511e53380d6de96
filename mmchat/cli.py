"""The ``mmchat`` command line: a click group whose subcommands live in ``commands/``."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .errors import MMChatError


class _Group(click.Group):
    """Adds plugin commands lazily and turns MMChatError into a clean exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MMChatError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mmchat")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """mmchat: a multimodal chatbot backend that sees images and hears voice."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(logging.WARNING - 10 * min(verbose, 2))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_cli(argv: list[str] | None = None) -> click.Group:
    """The root group with built-in and plugin commands attached.

    Plugin commands come from the plugins the configuration loads (``--config`` in
    ``argv``, else ``./config.toml``, with ``MMCHAT_LOAD_PLUGINS``): a disabled plugin is
    not even imported.
    """
    from .commands import chat, data, eval, plugin, plugins, serve, sessions, train
    from .plugins import TRACE_ENV

    if os.environ.get(TRACE_ENV):  # hook calls are traced at INFO, from here on
        logging.basicConfig(format=LOG_FORMAT)
        logging.getLogger("mmchat.plugins").setLevel(logging.INFO)
    for module in (chat, data, eval, plugin, plugins, serve, sessions, train):
        module.register(cli)
    _add_plugin_commands(cli, _config_path(sys.argv[1:] if argv is None else argv))
    return cli


def _config_path(argv: list[str]) -> str | None:
    """The ``--config`` given on the command line, if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def _add_plugin_commands(group: click.Group, config_path: str | None) -> None:
    from pathlib import Path

    from .commands.options import load_config
    from .plugins import PluginHost

    try:
        config = load_config(None if config_path is None else Path(config_path))
    except (MMChatError, OSError):
        return  # the command itself reports the bad configuration
    PluginHost.from_config(config).call_each("register_commands", cli=group)


def main(argv: list[str] | None = None) -> None:
    build_cli(argv).main(args=argv, prog_name="mmchat")
