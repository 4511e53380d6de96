"""``mmchat eval``: measure a checkpoint, or compare the three fusion methods."""

from __future__ import annotations

from pathlib import Path

import click

from .options import config_option, load_config


def register(cli: click.Group) -> None:
    cli.add_command(eval_command)


@click.command("eval")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@config_option
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Checkpoint to evaluate (default: model.checkpoint).")
@click.option("--split", default="test", show_default=True, help="DATA/<split>.jsonl.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/eval"),
              show_default=True, help="Folder for report.md, results.json, turns.jsonl and plots.")
@click.option("--ablations/--no-ablations", default=True, show_default=True,
              help="Also evaluate with images removed and with audio removed.")
@click.option("--limit", type=int, help="Evaluate only the first N dialogues.")
@click.option("--compare-fusion", is_flag=True,
              help="Train concat, weighted and attention on DATA and compare them.")
@click.option("--steps", type=int, help="Training steps per fusion method (--compare-fusion).")
def eval_command(data, config_path, checkpoint, split, out_dir, ablations, limit,
                 compare_fusion, steps) -> None:
    """Report perplexity, BLEU-4, token F1 and exact-answer accuracy per category."""
    from ..training.data import split_path

    config = load_config(config_path)
    split_file = split_path(data, split)
    if compare_fusion:
        from ..compare import compare_fusion as run_compare

        table = run_compare(config, data, split_file, out_dir, steps=steps, limit=limit)
        click.echo(table)
        return
    from .. import checkpoint as ckpt
    from ..errors import CheckpointError
    from ..evaluation import evaluate
    from ..loading import checkpoint_path, fallback_threshold, for_inference
    from ..plugins import PluginHost
    from ..report import (
        calibration_table,
        category_table,
        fallback_table,
        summary_table,
        write_report,
    )
    from ..training.data import decode_media, load_dialogues
    from ..training.examples import FeatureCache

    path = checkpoint or checkpoint_path(config)
    if path is None:
        raise CheckpointError('model.checkpoint = "untrained" names no checkpoint to evaluate; '
                              "pass --checkpoint")
    host = PluginHost.from_config(config)
    model, tokenizer, meta = ckpt.load(path, host.modalities)
    for_inference(model, host.modalities)  # the encoders as the engine serves them
    dialogues = load_dialogues(split_file)[:limit]
    modalities = {m: host.modalities[m] for m in model.config.modalities}
    cache = FeatureCache()
    decode_media(cache, dialogues, modalities)
    threshold = fallback_threshold(config, meta)
    fallback = {"fallback_threshold": threshold,
                "fallback_text": config.generation.fallback_text}
    results = {"full": evaluate(model, tokenizer, dialogues, cache, modalities, **fallback)}
    if ablations:
        for name in model.config.modalities:
            results[f"no {name}"] = evaluate(model, tokenizer, dialogues, cache, modalities,
                                             drop=frozenset({name}), **fallback)
    run_dir = Path(path).parent
    report = write_report(out_dir, f"Evaluation of {path}", results, {
        "checkpoint": str(path), "data": str(split_file), "dialogues": len(dialogues),
        "model": f"{model.config.rnn} {model.config.n_layer}x{model.config.n_hidden}, "
                 f"fusion={model.config.fusion}"},
        metrics_jsonl=run_dir / "metrics.jsonl")
    click.echo(summary_table(results))
    click.echo()
    click.echo(category_table(results))
    click.echo()
    click.echo(calibration_table(results["full"]))
    click.echo()
    click.echo(fallback_table(results["full"]))
    click.echo(f"\nreport: {report}")
