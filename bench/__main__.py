"""``python -m bench [--quick] [names...]``: run every ``bench/bench_*.py`` (or the named ones)."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = [str(Path(__file__).parent)]
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(here)
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions: a smoke test, not numbers to publish")
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"benches to run (default: all): {', '.join(names)}")
    args = parser.parse_args(argv)
    chosen = [n.removeprefix("bench_") for n in args.names] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(names)}")
    logging.basicConfig(level=logging.WARNING)
    for name in chosen:
        module = importlib.import_module(f"bench.bench_{name}")
        module.main(quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
