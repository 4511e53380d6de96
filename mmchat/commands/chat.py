"""``mmchat chat``: a terminal REPL over the engine."""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path

import click

from ..errors import MMChatError
from .options import config_option, load_config

HELP = """Commands:
  /image PATH [text]   attach a picture (sent now with text, else with your next message)
  /voice PATH [text]   attach a voice clip (likewise)
  /reset               forget this conversation
  /help                this help
  /quit                leave (Ctrl-D works too)"""


def register(cli: click.Group) -> None:
    cli.add_command(chat_command)


@click.command("chat")
@config_option
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (overrides model.checkpoint).")
@click.option("--untrained", is_flag=True, help="Chat with an untrained model (gibberish).")
@click.option("--session", default=None, help="Session id to continue (default: a new one).")
def chat_command(config_path, checkpoint, untrained: bool, session: str | None) -> None:
    """Chat with the model in the terminal. Type /help for commands."""
    from ..engine import Engine

    config = load_config(config_path)
    if untrained:
        config = config.replace(model={"checkpoint": ""})
    elif checkpoint is not None:
        config = config.replace(model={"checkpoint": str(checkpoint.resolve())})
    engine = Engine(config)
    repl = Repl(engine, session or uuid.uuid4().hex)
    try:
        repl.run()
    finally:
        engine.close_sync()


class Repl:
    """Reads lines, turns slash commands into attachments, streams replies."""

    def __init__(self, engine, session_id: str) -> None:
        self.engine = engine
        self.session_id = session_id
        self.pending: list = []

    def run(self) -> None:
        from ..modality import Attachment

        self.engine._runner().run(self.engine.start())
        click.echo(f"mmchat — {self.engine.model_description}. Session {self.session_id}.")
        click.echo("Type /help for commands.")
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                click.echo()
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    parts = shlex.split(line)
                except ValueError as exc:
                    click.echo(f"error: {exc}")
                    continue
                command, args = parts[0], parts[1:]
                if command in ("/quit", "/exit"):
                    return
                if command == "/help":
                    click.echo(HELP)
                    continue
                if command == "/reset":
                    self.engine._runner().run(self.engine.reset(self.session_id))
                    self.pending.clear()
                    click.echo("(conversation reset)")
                    continue
                if command in ("/image", "/voice") and args:
                    try:
                        att = Attachment.from_path(args[0])
                    except OSError as exc:
                        click.echo(f"error: cannot read {args[0]}: {exc.strerror}")
                        continue
                    self.pending.append(
                        Attachment(att.data, att.mime_type, modality=command[1:]))
                    if len(args) == 1:
                        click.echo(f"(attached {args[0]}; it goes with your next message)")
                        continue
                    line = " ".join(args[1:])
                else:
                    click.echo(f"unknown command {command!r}\n{HELP}")
                    continue
            self.send(line)

    def send(self, text: str) -> None:
        attachments, self.pending = self.pending, []
        click.echo("bot> ", nl=False)
        try:
            for delta in self.engine.stream_sync(self.session_id, text, attachments):
                click.echo(delta.text, nl=False)
        except MMChatError as exc:
            click.echo(f"\nerror [{exc.code}]: {exc}")
            return
        click.echo()
