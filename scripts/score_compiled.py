"""The whole NestedKV score under ``torch.compile`` against the eager tensor path, on the CPU.

Counts what compiling costs (the first call, and the first call at another context length) and whether the
compiled score is faster or keeps other positions. Both run with the C kernel off, on the tensor functions
of ``nestedkv.scoring`` (a compiled call traces them; the kernel reads raw pointers, which a trace has
not); the shipped CPU path, with the kernel, is timed first for comparison. docs/scoring_speed.md quotes
its output.

    PYTHONPATH=src .venv/bin/python scripts/score_compiled.py [--length 4096] [--other-length 5000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nestedkv import scoring_cpu
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import NestedKVConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--other-length", type=int, default=5000, help="a second length, to time a recompile")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kept", type=int, default=400, help="top positions per head compared")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    config = NestedKVConfig()

    def layer(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # one layer of Llama-3.2-1B's shape
        return tuple(torch.randn(1, 8, n, 64, generator=generator) for _ in range(2))

    def eager(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return nestedkv_score(keys, config, values)

    def timed(name: str, score) -> None:
        score(keys, values)
        start = time.perf_counter()
        for _ in range(args.repeats):
            score(keys, values)
        print(f"{name}: {(time.perf_counter() - start) / args.repeats * 1e3:.1f} ms per call, N = {args.length}")

    keys, values = layer(args.length)
    if scoring_cpu.kernel() is not None:
        timed("shipped (C kernel)", eager)
    os.environ["NESTEDKV_CPU_KERNEL"] = "0"  # from here on the tensor path
    scoring_cpu.kernel.cache_clear()
    compiled = torch.compile(eager, dynamic=True)
    start = time.perf_counter()
    scores = compiled(keys, values)
    print(f"first compiled call (compiles), N = {args.length}: {time.perf_counter() - start:.1f} s")
    kept = [score.topk(args.kept).indices.sort().values for score in (scores, eager(keys, values))]
    print(f"same top {args.kept} positions in every head as eager: {torch.equal(*kept)}")
    start = time.perf_counter()
    compiled(*layer(args.other_length))
    print(f"first compiled call at N = {args.other_length}: {time.perf_counter() - start:.1f} s")
    timed("eager tensor path", eager)
    timed("compiled tensor path", compiled)


if __name__ == "__main__":
    main()
