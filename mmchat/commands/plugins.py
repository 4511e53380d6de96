"""``mmchat plugins``: list every plugin with its version, source, hooks and modalities."""

from __future__ import annotations

import json

import click

from .options import config_option, load_config


def register(cli: click.Group) -> None:
    cli.add_command(plugins_command)


@click.command("plugins")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(config_path, as_json: bool) -> None:
    """List installed plugins; exits with 1 if any failed to load or to register."""
    from ..plugins import PluginHost

    c = load_config(config_path)
    host = PluginHost.from_config(c)
    infos = host.describe()
    rows = [{"name": i.name, "version": i.version, "source": i.source, "hooks": i.hooks,
             "modalities": i.modalities} for i in infos]
    failures = [{"plugin": f.plugin, "stage": f.stage, "error": f.error} for f in host.failures]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        raise SystemExit(1 if failures else 0)
    for row in rows:
        click.echo(f"{row['name']} {row['version'] or '-'}  [{row['source']}]")
        click.echo(f"  hooks: {', '.join(row['hooks']) or '-'}")
        if row["modalities"]:
            click.echo(f"  modalities: {', '.join(row['modalities'])}")
    for f in failures:
        click.echo(f"FAILED {f['plugin']} ({f['stage']}): {f['error']}", err=True)
    if failures:
        raise SystemExit(1)
