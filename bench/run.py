"""`make bench`: run every benchmark module of this folder (``bench_*.py``) in one process.

Each module exposes ``main(argv: list[str] | None = None) -> None`` and prints its own table of
figures measured side by side in the same run (ours vs a baseline, vs a floor). Select some with
``python bench/run.py scoring data``; extra options after ``--`` go to every module.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    args = sys.argv[1:]
    extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1 :]
    paths = sorted(HERE.glob("bench_*.py"))
    if args:
        paths = [p for p in paths if p.stem.removeprefix("bench_") in args]
    if not paths:
        raise SystemExit(
            f"no benchmark matches {args} (have: {[p.stem for p in HERE.glob('bench_*.py')]})"
        )
    for path in paths:
        t0 = time.perf_counter()
        print(f"\n=== {path.stem} ===", flush=True)
        _load(path).main(extra or None)
        print(f"({path.stem}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
