"""``mmchat chat``: a terminal REPL over the engine, or over a server with ``--url``."""

from __future__ import annotations

import asyncio
import shlex
import uuid
from collections.abc import Generator, Sequence
from pathlib import Path

import click

from ..errors import MMChatError
from .options import config_option, load_config

HELP = """Commands:
  /image PATH [text]   attach a picture (sent now with text, else with your next message)
  /voice PATH [text]   attach a voice clip (likewise)
  /attach PATH [MODALITY]
                       attach a file for any modality (see /modalities), sent with
                       your next message; without MODALITY its type decides
  /modalities          the modalities the model takes, with their MIME types
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
@click.option("--url", default=None,
              help="Chat with a server (ws://host:port/) instead of a local model.")
@click.option("--token", envvar="MMCHAT_TOKEN", default=None,
              help="Access token for --url (default: $MMCHAT_TOKEN).")
def chat_command(config_path, checkpoint, untrained: bool, session: str | None,
                 url: str | None, token: str | None) -> None:
    """Chat with the model in the terminal. Type /help for commands."""
    if url is not None:
        backend: LocalBackend | RemoteBackend = RemoteBackend(url, token, session)
    else:
        from ..engine import Engine

        config = load_config(config_path)
        if untrained:
            config = config.replace(model={"checkpoint": "untrained"})
        elif checkpoint is not None:
            config = config.replace(model={"checkpoint": str(checkpoint.resolve())})
        backend = LocalBackend(Engine(config), session or uuid.uuid4().hex)
    try:
        Repl(backend).run()
    finally:
        backend.close()


class LocalBackend:
    """The REPL's conversation on an in-process :class:`~mmchat.engine.Engine`."""

    def __init__(self, engine, session_id: str) -> None:
        self.engine = engine
        self.session_id = session_id

    def start(self) -> str:
        self.engine.sync().start()
        return f"mmchat — {self.engine.model_description}. Session {self.session_id}."

    def stream(self, text: str, attachments: Sequence) -> Generator[str, None, str | None]:
        """The reply's text pieces; returns the fallback text when it replaced them."""
        stream = self.engine.sync().stream(self.session_id, text, attachments)
        for delta in stream:
            yield delta.text
        reply = stream.reply
        return reply.text if reply is not None and reply.fallback else None

    def modalities(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(m.mime_types)
                for name, m in sorted(self.engine.served_modalities.items())}

    def reset(self) -> None:
        self.engine.sync().reset(self.session_id)

    def close(self) -> None:
        self.engine.close_sync()


class RemoteBackend:
    """The REPL's conversation with ``mmchat serve`` through :class:`mmchat.client.Client`.

    A dropped connection is resumed once per reply, without losing or repeating text;
    ``/reset`` starts a new session."""

    def __init__(self, url: str, token: str | None, session_id: str | None) -> None:
        self.url = url
        self.token = token
        self.session_id = session_id
        self.client = None
        self._runner = asyncio.Runner()

    def start(self) -> str:
        from ..client import Client

        client = self.client = self._runner.run(
            Client.connect(self.url, token=self.token, session_id=self.session_id))
        for notice in client.notices:
            click.echo(f"note [{notice.code}]: {notice}")
        return f"mmchat — {self.url}. Session {client.session_id}."

    def stream(self, text: str, attachments: Sequence) -> Generator[str, None, str | None]:
        """The reply's text pieces; returns the fallback text when it replaced them."""
        from ..client import ConnectionLost

        run = self._runner.run
        reply = run(self.client.send(text, attachments))
        resumed = False
        while True:
            try:
                delta = run(reply.__anext__())
            except StopAsyncIteration:
                return reply.done.text if reply.done is not None and reply.done.fallback else None
            except ConnectionLost:
                if resumed:
                    raise
                resumed = True
                run(self.client.resume())
                continue
            yield delta.text

    def modalities(self) -> dict[str, tuple[str, ...]]:
        return {m.name: tuple(m.mime_types) for m in self.client.modalities}

    def reset(self) -> None:
        from ..client import Client

        self._runner.run(self.client.close())
        self.client = self._runner.run(Client.connect(self.url, token=self.token))

    def close(self) -> None:
        if self.client is not None:
            self._runner.run(self.client.close())
        self._runner.close()


class Repl:
    """Reads lines, turns slash commands into attachments, streams replies."""

    def __init__(self, backend: LocalBackend | RemoteBackend) -> None:
        self.backend = backend
        self.pending: list = []

    def run(self) -> None:
        from ..modality import Attachment

        click.echo(self.backend.start())
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
                    try:
                        self.backend.reset()
                    except MMChatError as exc:
                        click.echo(f"error [{exc.code}]: {exc}")
                        continue
                    self.pending.clear()
                    click.echo("(conversation reset)")
                    continue
                if command == "/modalities":
                    for name, types in self.backend.modalities().items():
                        click.echo(f"  {name}: {', '.join(types)}")
                    continue
                if command == "/attach" and 1 <= len(args) <= 2:
                    self.attach(args[0], args[1] if len(args) == 2 else None)
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

    def attach(self, path: str, modality: str | None) -> None:
        """Keep ``path`` for the next message, for ``modality`` if named (a file whose type
        its suffix does not tell is sent as the modality's first MIME type)."""
        from ..modality import Attachment

        try:
            att = Attachment.from_path(path)
        except OSError as exc:
            click.echo(f"error: cannot read {path}: {exc.strerror}")
            return
        mime_type = att.mime_type
        if modality is not None:
            types = self.backend.modalities().get(modality)
            if types is None:
                click.echo(f"error: no modality {modality!r}; the model takes "
                           f"{', '.join(self.backend.modalities()) or 'none'}")
                return
            if mime_type == "application/octet-stream" and types:
                mime_type = types[0]
        self.pending.append(Attachment(att.data, mime_type, modality=modality))
        click.echo(f"(attached {path} as {mime_type}; it goes with your next message)")

    def send(self, text: str) -> None:
        attachments, self.pending = self.pending, []
        click.echo("bot> ", nl=False)
        pieces = self.backend.stream(text, attachments)
        try:
            while True:
                click.echo(next(pieces), nl=False)
        except StopIteration as end:
            if end.value is not None:  # the model was unsure or looped: what it sends instead
                click.echo(f" (withdrawn)\nbot> {end.value}", nl=False)
        except MMChatError as exc:
            click.echo(f"\nerror [{exc.code}]: {exc}")
            return
        click.echo()
