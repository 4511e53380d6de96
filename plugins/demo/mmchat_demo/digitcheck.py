"""A larger check of the held-out scikit-learn digits (``mmchat data build demo-digits``).

The demo corpus's test split asks about 150 digit pictures, so one picture moves its
digit figure by 0.7 points and one standard error is about 1.5. This builds every image
of the held-out index ranges (``digits.INDEX_RANGES``: 178 for valid, 179 for test) in
several seeded renderings each, with the corpus's styles, questions and answers, as
``valid.jsonl`` and ``test.jsonl`` with one ``digit`` category: ``mmchat eval`` reads
it like any corpus. The first rendering of an image is the same for every count.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, digits
from .build import _assistant, _attachment, _user

#: Renderings of each held-out image (``--small``: 1).
RENDERINGS = 5
SPLITS = ("valid", "test")
_SPLIT_CODE = {"valid": 1, "test": 2}


def build(outdir: str | Path, *, seed: int = 0, small: bool = False,
          progress: bool = False) -> dict[str, Path]:
    """Write ``valid.jsonl`` and ``test.jsonl`` (and ``digits.json``) into ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    renderings = 1 if small else RENDERINGS
    paths = {}
    for split in SPLITS:
        paths[split] = outdir / f"{split}.jsonl"
        with paths[split].open("w", encoding="utf-8", newline="\n") as fh:
            for record in _records(split, seed, renderings):
                fh.write(json.dumps(record) + "\n")
    info = {"generator": f"mmchat-demo {__version__} (demo-digits)", "seed": seed,
            "renderings": renderings,
            "index_ranges": {s: list(digits.INDEX_RANGES[s]) for s in SPLITS}}
    (outdir / "digits.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return paths


def _records(split: str, seed: int, renderings: int) -> list[dict[str, Any]]:
    lo, hi = digits.INDEX_RANGES[split]
    out = []
    for index in range(lo, hi):
        for r in range(renderings):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, r])
            style = digits.sample_style(rng, index)
            buffer = io.BytesIO()
            digits.render(style).save(buffer, "PNG")
            image = _attachment("image", "image/png",
                                data=base64.b64encode(buffer.getvalue()).decode("ascii"))
            turns = [_user(str(rng.choice(digits.QUESTIONS)), [image]),
                     _assistant(digits.answer_sentence(style.label), digits.WORDS[style.label],
                                "digit")]
            out.append({"id": f"{split}-digitcheck-{index:04d}-{r}", "split": split,
                        "category": "digit", "turns": turns,
                        "meta": {"source": "digits", "digit": style.label,
                                 "style": style.to_meta()}})
    return out
