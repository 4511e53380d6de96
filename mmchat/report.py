"""Evaluation reports: a Markdown file and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

from . import calibration
from .evaluation import EvalResult


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def category_table(results: Mapping[str, EvalResult]) -> str:
    """One row per category, one column per named result (e.g. full, no image, no voice)."""
    names = list(results)
    categories: list[str] = []
    for r in results.values():
        categories += [c for c in r.by_category() if c not in categories]
    head = "| category | turns | " + " | ".join(names) + " |"
    rule = "|---|---:|" + "---:|" * len(names)
    first = next(iter(results.values()))
    rows = [head, rule]
    for c in categories:
        n = len(first.by_category().get(c, []))
        rows.append(f"| {c} | {n} | " + " | ".join(fmt(r.accuracy(c)) for r in
                                                     results.values()) + " |")
    rows.append(f"| **all** | {len(first.turns)} | " +
                " | ".join(fmt(r.accuracy()) for r in results.values()) + " |")
    return "\n".join(rows)


def summary_table(results: Mapping[str, EvalResult]) -> str:
    rows = ["| run | perplexity | BLEU-4 | token F1 | exact |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        s = r.summary()
        rows.append(f"| {name} | {fmt(s['perplexity'], 2)} | {fmt(s['bleu4'], 1)} | "
                    f"{fmt(s['token_f1'])} | {fmt(s['exact'])} |")
    return "\n".join(rows)


def attention_table(result: EvalResult) -> str:
    att = result.attention_by_category()
    modalities = sorted({m for v in att.values() for m in v})
    rows = ["| category | " + " | ".join(modalities) + " |",
            "|---|" + "---:|" * len(modalities)]
    for cat, masses in att.items():
        rows.append(f"| {cat} | " + " | ".join(fmt(masses.get(m, 0.0)) for m in modalities)
                    + " |")
    return "\n".join(rows)


def calibration_table(result: EvalResult) -> str:
    """Reliability bins (accuracy against confidence) and the expected calibration error."""
    bins, ece = result.calibration()
    rows = [f"Expected calibration error: {fmt(ece)} (10 equal-width bins, exact answers).", "",
            "| confidence | turns | mean confidence | exact |", "|---|---:|---:|---:|"]
    rows += [f"| {b.low:.1f}–{b.high:.1f} | {b.turns} | {fmt(b.confidence)} | "
             f"{fmt(b.accuracy)} |" for b in bins if b.turns]
    return "\n".join(rows)


#: Thresholds the report shows the effect of (the engine's own is added).
SWEEP = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fallback_table(result: EvalResult) -> str:
    """How often the fallback fires per category at the engine's threshold, and what other
    thresholds would do to all turns."""
    rows = [f"At fallback threshold {result.fallback_threshold:g} (loops always fall back). "
            "*Sees the fallback text*: the engine sends it, or the model says it itself.", "",
            "| category | turns | fallback rate | exact when kept | sees the fallback text |",
            "|---|---:|---:|---:|---:|"]
    groups = {**result.by_category(), "**all**": result.turns}
    for cat, turns in groups.items():
        kept = [t.exact for t in turns if not result.fell_back(t)]
        rate = sum(map(result.fell_back, turns)) / len(turns)
        seen = sum(map(result.sees_fallback, turns)) / len(turns)
        rows.append(f"| {cat} | {len(turns)} | {fmt(rate)} | "
                    f"{fmt(sum(kept) / len(kept) if kept else float('nan'))} | {fmt(seen)} |")
    thresholds = sorted({*SWEEP, result.fallback_threshold})
    sweep = calibration.sweep([t.confidence for t in result.turns],
                              [t.exact for t in result.turns],
                              [t.finish_reason for t in result.turns], thresholds)
    rows += ["", "| threshold | fallback rate | exact when kept |", "|---:|---:|---:|"]
    rows += [f"| {c.threshold:g} | {fmt(c.fallback_rate)} | {fmt(c.kept_accuracy)} |"
             for c in sweep]
    return "\n".join(rows)


def write_report(out_dir: Path, title: str, results: Mapping[str, EvalResult],
                 meta: Mapping[str, object], metrics_jsonl: Path | None = None) -> Path:
    """Write report.md, results.json, turns.jsonl (every reply of every run) and plots
    into ``out_dir``; returns report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    main = next(iter(results.values()))
    plots = []
    if metrics_jsonl is not None and metrics_jsonl.is_file():
        plots.append(plot_curves(metrics_jsonl, out_dir / "training_curves.png"))
    plots.append(plot_attention(main, out_dir / "attention.png"))
    plots.append(plot_calibration(main, out_dir / "calibration.png"))
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Summary", "", summary_table(results), "",
              "## Exact-answer accuracy by category", "", category_table(results), "",
              "## Attention mass per modality", "", attention_table(main), "",
              "## Calibration", "", calibration_table(main), "",
              "## Fallback", "", fallback_table(main), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    lines += ["", "## Examples", ""]
    for t in main.turns[:: max(1, len(main.turns) // 12)][:12]:
        mark = "✓" if t.exact else "✗"
        lines.append(f"- {mark} `{t.category}`: expected “{t.reference}”, got “{t.hypothesis}”")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps({
        name: {"summary": r.summary(),
               "categories": {c: r.accuracy(c) for c in r.by_category()},
               "calibration": {"ece": r.calibration()[1],
                               "bins": [dataclasses.asdict(b) for b in r.calibration()[0]]},
               "fallback_threshold": r.fallback_threshold,
               "fallback_rate": {c: r.fallback_rate(c) for c in r.by_category()}}
        for name, r in results.items()}, indent=2))
    with (out_dir / "turns.jsonl").open("w") as f:  # every reply, to read the misses
        for name, r in results.items():
            for t in r.turns:
                f.write(json.dumps({"run": name, **dataclasses.asdict(t), "exact": t.exact,
                                    "key_answer": t.key_answer}) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_jsonl: Path, out: Path) -> Path:
    plt = _pyplot()
    steps, loss, vsteps, vloss = [], [], [], []
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        steps.append(rec["step"])
        loss.append(rec["loss"])
        if "val_loss" in rec:
            vsteps.append(rec["step"])
            vloss.append(rec["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, label="train loss", linewidth=0.8)
    ax.plot(vsteps, vloss, label="validation loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_attention(result: EvalResult, out: Path) -> Path:
    plt = _pyplot()
    att = result.attention_by_category()
    cats = list(att)
    modalities = sorted({m for v in att.values() for m in v})
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(cats)
    for m in modalities:
        values = [att[c].get(m, 0.0) for c in cats]
        ax.bar(cats, values, bottom=bottom, label=m)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("mean attention mass per token")
    ax.set_ylim(0, 1)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_calibration(result: EvalResult, out: Path) -> Path:
    """Reliability diagram: exact-answer accuracy per confidence bin against the diagonal,
    with the number of turns in each bin below."""
    plt = _pyplot()
    bins, ece = result.calibration()
    used = [b for b in bins if b.turns]
    fig, (ax, count) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="calibrated")
    ax.bar([b.low for b in used], [b.accuracy for b in used], width=0.1, align="edge",
           edgecolor="black", alpha=0.7, label="exact answers")
    ax.plot([b.confidence for b in used], [b.accuracy for b in used], marker="o",
            color="black", linewidth=0.8, label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"confidence against accuracy (ECE {fmt(ece)})")
    ax.legend(loc="upper left")
    count.bar([b.low for b in bins], [b.turns for b in bins], width=0.1, align="edge",
              edgecolor="black")
    count.set_xlabel("confidence (lowest token probability of the reply)")
    count.set_ylabel("turns")
    count.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
