"""Train and evaluate the three fusion methods on the same data, seed and budget."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .evaluation import EvalResult, evaluate
from .plugins import PluginHost
from .report import category_table, summary_table, write_report
from .training.data import decode_media, load_dialogues, load_train_data
from .training.trainer import Trainer

METHODS = ("concat", "weighted", "attention")


def compare_fusion(config: Config, data_dir: Path, split_file: Path, out_dir: Path, *,
                   steps: int | None = None, limit: int | None = None,
                   progress: bool = True) -> str:
    """Returns a Markdown table; writes each run and a report under ``out_dir``."""
    host = PluginHost.from_config(config)
    if steps is not None:
        config = config.replace(train={"steps": steps})
    data = load_train_data(data_dir, host.modalities, vocab_size=config.model.vocab_size,
                           max_tokens=config.train.max_tokens)
    dialogues = load_dialogues(split_file)[:limit]
    decode_media(data.cache, dialogues, data.modalities)
    results: dict[str, EvalResult] = {}
    for method in METHODS:
        run_config = config.replace(fusion={"method": method})
        trainer = Trainer(run_config, data, out_dir / method, progress=progress)
        trainer.run()
        model = trainer.model.eval()
        results[method] = evaluate(model, data.tokenizer, dialogues, data.cache,
                                   data.modalities)
    write_report(out_dir, "Fusion methods compared", results, {
        "data": str(data_dir), "split": split_file.name, "steps": config.train.steps,
        "seed": config.train.seed, "dialogues": len(dialogues)})
    return summary_table(results) + "\n\n" + category_table(results)
