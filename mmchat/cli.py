"""The ``mmchat`` command line: a click group whose subcommands live in ``commands/``."""

from __future__ import annotations

import logging
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
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_cli() -> click.Group:
    """The root group with built-in and plugin commands attached."""
    from .commands import chat, data, eval, plugins, serve, train

    for module in (chat, data, eval, plugins, serve, train):
        module.register(cli)
    _add_plugin_commands(cli)
    return cli


def _add_plugin_commands(group: click.Group) -> None:
    from .plugins import PluginHost

    host = PluginHost(builtins=())
    host.call_each("register_commands", cli=group)


def main(argv: list[str] | None = None) -> None:
    build_cli().main(args=argv, prog_name="mmchat")
