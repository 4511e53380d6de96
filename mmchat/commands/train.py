"""``mmchat train``: train a model on dataset folders (single process or torchrun), from
scratch or from a trained model."""

from __future__ import annotations

from pathlib import Path

import click

from .options import config_option, load_config


def register(cli: click.Group) -> None:
    cli.add_command(train_command)


@click.command("train")
@click.argument("data", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/model"),
              show_default=True, help="Output folder (OUT/model is the checkpoint to serve).")
@config_option
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, path_type=Path),
              help="A sentencepiece model to use instead of training one.")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/last.")
@click.option("--init-from", "init_from", type=click.Path(exists=True, file_okay=False,
                                                          path_type=Path),
              help="Start from this trained checkpoint (its shape and tokenizer), adding "
                   "the modalities the data has that it lacks.")
@click.option("--freeze", is_flag=True,
              help="With --init-from: train only the new encoders and what grew with them.")
@click.option("--steps", type=int, help="Override train.steps.")
@click.option("--batch-size", type=int, help="Override train.batch_size.")
@click.option("--lr", type=float, help="Override train.lr.")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--fusion", type=click.Choice(["attention", "concat", "weighted"]),
              help="Override fusion.method.")
@click.option("--rnn", type=click.Choice(["lstm", "gru"]), help="Override model.rnn.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(data, out_dir, config_path, tokenizer_path, resume, init_from, freeze,
                  steps, batch_size, lr, seed, fusion, rnn, no_progress) -> None:
    """Train on DATA/train.jsonl, validating on DATA/valid.jsonl (of every DATA folder
    given, together).

    With --init-from CHECKPOINT, training starts from that model: see
    docs/training-a-modality.md.

    Under `torchrun --nproc_per_node N -m mmchat train ...` it runs
    DistributedDataParallel (gloo on CPU, NCCL on GPU).
    """
    from ..errors import MMChatError
    from ..plugins import PluginHost
    from ..tokenizer import Tokenizer
    from ..training.data import load_train_data
    from ..training.init import Base
    from ..training.trainer import Trainer

    config = load_config(config_path)
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "lr": lr,
                                   "seed": seed}.items() if v is not None}
    config = config.replace(train=overrides,
                            fusion={"method": fusion} if fusion else {},
                            model={"rnn": rnn} if rnn else {})
    host = PluginHost.from_config(config)
    if freeze and init_from is None:
        raise MMChatError("--freeze needs --init-from CHECKPOINT")
    base = None if init_from is None else Base.load(init_from, host.modalities)
    tokenizer = None
    if base is not None:
        if tokenizer_path is not None:
            raise MMChatError("--init-from trains with the checkpoint's tokenizer; drop "
                              "--tokenizer")
        tokenizer = base.tokenizer
    elif tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
    elif resume and (out_dir / "last" / "tokenizer.model").is_file():
        tokenizer = Tokenizer.load(out_dir / "last" / "tokenizer.model")
    import torch

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    data_ = load_train_data(
        list(data), host.modalities, vocab_size=config.model.vocab_size,
        max_tokens=config.train.max_tokens, tokenizer=tokenizer,
        modality_names=None if base is None else base.config.modalities,
        answers=None if base is None else base.config.answers, more_answers=True)
    trainer = Trainer(config, data_, out_dir, resume=resume, progress=not no_progress,
                      init_from=base, freeze=freeze)
    if trainer.dist.main:
        click.echo(f"training {trainer.model.num_params() / 1e6:.2f}M parameters on "
                   f"{len(data_.train)} dialogues ({len(data_.valid)} for validation), "
                   f"{trainer.dist.world} process(es)", err=True)
    result = trainer.run()
    trainer.dist.teardown()
    if trainer.dist.main:
        best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
        click.echo(f"done at step {result.step}; best validation loss {best}; "
                   f"serve it with: mmchat chat --checkpoint {out_dir / 'model'}")
