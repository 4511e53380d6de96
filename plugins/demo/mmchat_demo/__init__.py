"""mmchat-demo: the demo corpus (``mmchat data demo OUTDIR``), built offline from a seed,
and a larger check of its held-out digits (``mmchat data build demo-digits OUTDIR``).

The world is fixed and documented in ``docs/data.md``: drawn shapes, handwritten digits,
espeak-ng voice and chatterbot-corpus chit-chat.
"""

from __future__ import annotations

from pathlib import Path

from mmchat import hookimpl

__version__ = "0.1.0"


def build_demo(outdir: str | Path, *, seed: int = 0, small: bool = False,
               progress: bool = False, workers: int | None = None) -> dict[str, Path]:
    """Build the demo corpus; see :func:`mmchat_demo.build.build`."""
    from .build import build  # Pillow, scikit-learn and friends load on first use

    return build(outdir, seed=seed, small=small, progress=progress, workers=workers)


def build_digit_check(outdir: str | Path, *, seed: int = 0, small: bool = False,
                      progress: bool = False) -> dict[str, Path]:
    """Every held-out scikit-learn digit in several renderings; see
    :mod:`mmchat_demo.digitcheck`."""
    from .digitcheck import build

    return build(outdir, seed=seed, small=small, progress=progress)


@hookimpl
def register_datasets(register):
    register("demo", build_demo)
    register("demo-digits", build_digit_check)
