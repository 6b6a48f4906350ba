"""CPU time of ``nestedkv_score`` against an earlier version of it and against KeyDiff's score.

The earlier ``src/nestedkv/scoring.py`` is read from git (``--old``, default: the commit before the
speed-up), both versions score the same random bf16 keys, interleaved with ``KeyDiffPress.score``;
prints the median milliseconds of each and the median of the per-round ratios (each round times
all three back to back, so a ratio is paired against load that changes between rounds) as a
Markdown table. Single-threaded unless told otherwise:

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python scripts/scoring_speed.py [--old c797a0c] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from kvpress import KeyDiffPress

from nestedkv import scoring
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import PAPER_SETTINGS, NestedKVConfig

PAPER = NestedKVConfig(**PAPER_SETTINGS)  # the earlier version's defaults: the same score, for a like timing
SHAPES = [(1, 3, 2048, 64), (1, 3, 4096, 64), (1, 3, 32768, 64), (1, 8, 32768, 64)]


def old_scoring(rev: str) -> types.ModuleType:
    """``nestedkv.scoring`` as it was at git revision ``rev``, loaded as a separate module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{rev}:src/nestedkv/scoring.py"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"nestedkv_scoring_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    exec(compile(source, f"{rev}:scoring.py", "exec"), module.__dict__)
    return module


def timings(scorers: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each scorer in each of ``repeats`` rounds, the scorers interleaved within a round."""
    for scorer in scorers.values():
        scorer()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, scorer in scorers.items():
            start = time.perf_counter()
            scorer()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="c797a0c", help="git revision of the earlier scoring.py")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    old = old_scoring(args.old)
    keydiff = KeyDiffPress()
    print(f"old: {args.old}:src/nestedkv/scoring.py, new: {scoring.__file__}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}, bf16 keys\n")
    print("| keys (B, H, N, d) | old ms | new ms | speed-up | KeyDiff ms | old / KeyDiff | new / KeyDiff |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        keys = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        times = timings(
            {
                "old": lambda keys=keys: old.nestedkv_score(keys),
                "new": lambda keys=keys: nestedkv_score(keys, PAPER),
                "keydiff": lambda keys=keys: keydiff.score(None, None, keys, None, None, {}),
            },
            args.repeats,
        )
        ms = {name: statistics.median(seconds) * 1e3 for name, seconds in times.items()}
        print(
            f"| {tuple(shape)} | {ms['old']:.1f} | {ms['new']:.1f} | {median_ratio(times['old'], times['new']):.2f}x "
            f"| {ms['keydiff']:.1f} | {median_ratio(times['old'], times['keydiff']):.1f} "
            f"| {median_ratio(times['new'], times['keydiff']):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
