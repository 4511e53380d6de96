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
