"""Hook specifications: the whole plugin API, as documented stubs."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("mmchat")
hookimpl = HookimplMarker("mmchat")


@hookspec
def register_modalities(register, settings):
    """Register the modalities this plugin provides.

    :param register: call ``register(modality)`` once for each
        :class:`mmchat.Modality` instance.
    :param settings: a mapping from modality name to its ``[plugins.<name>]``
        table in the configuration (an empty dict when absent). Pass the table
        for your modality to its constructor.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``mmchat`` command line.

    :param cli: the root :class:`click.Group`. Call ``cli.add_command(...)``
        or decorate new functions with ``@cli.command()``.
    """


@hookspec
def register_datasets(register):
    """Register dataset builders used by ``mmchat data build NAME OUTDIR``.

    :param register: call ``register(name, build)`` where ``build(outdir, *,
        seed, small, progress)`` writes a dataset (see ``docs/data.md``) into
        ``outdir`` and returns a mapping of split name to JSONL path. ``seed`` is an
        int, ``small`` asks for a corpus tests can build in seconds, and
        ``progress`` (bool) asks for a progress bar on stderr. ``mmchat data build``
        refuses a non-empty ``outdir`` unless ``--force`` is given.
    """


@hookspec
def startup(engine):
    """Called once when an :class:`mmchat.Engine` starts, after the model loads.

    :param engine: the engine. Return value is ignored.
    """


@hookspec
def shutdown(engine):
    """Called once when an :class:`mmchat.Engine` closes. Release resources here.

    :param engine: the engine. Return value is ignored.
    """


@hookspec
def prepare_turn(session_id, text, attachments):
    """Called before every turn, whatever its entry (``Engine.reply``, ``Engine.stream``,
    WebSocket), before the message is checked: see, change or refuse it (moderation).

    :param session_id: the session's id.
    :param text: the message's text.
    :param attachments: its :class:`mmchat.Attachment` s (a list of its own).
    :return: ``None`` to leave the message as it is, or ``(text, attachments)`` to
        change it; the next plugin sees the change. Raise
        :class:`mmchat.errors.Refused` to refuse it: the caller gets that error (code
        ``refused``) and nothing is stored. May return an awaitable (an ``async def``
        hook); it runs on the event loop, so it must not block.
    """


@hookspec
def redact_text(session_id, text, final):
    """Called on the text of each streamed delta (``final=False``), and on the finished
    reply's text before it is stored and returned (``final=True``): redaction.

    :param session_id: the session's id.
    :param text: a delta's text, or the whole reply's.
    :param final: whether ``text`` is the whole reply.
    :return: the text to use instead, or ``None`` to keep it. Runs on the event loop
        for every delta: plain ``def``, quick, never blocking.
    """


@hookspec
def record_turn(session_id, text, attachments, reply):
    """Called after every turn that produced a reply (logging, metrics, storage).

    :param session_id: the session's id.
    :param text: the message's text (after ``prepare_turn``).
    :param attachments: its :class:`mmchat.Attachment` s.
    :param reply: the :class:`mmchat.Reply`: ``text``, ``finish_reason``,
        ``attention``, ``prompt_tokens``, ``completion_tokens`` and ``timings``.
    :return: ignored. May return an awaitable. A failure is logged; the reply, already
        delivered, is unaffected.
    """
