"""How many tensor operations one layer's NestedKV score dispatches on the GPU's path, counted on the CPU.

On CUDA the score runs as the tensor functions of ``nestedkv.scoring``, all heads at once, and a short
context's score is bound by launching their kernels (docs/benchmarks_cuda.md: about 2.3 ms per layer
at 4k to 32k on an H200). This counts what that path dispatches, per function of the score, on the CPU
(the C kernel switched off, every head in one chunk): each operation that is not a view or an
allocation launches at least one kernel there, and each tensor made from Python data is a copy from
the host. On CUDA the prefix sum adds two transposing copies that the CPU does not make.

    PYTHONPATH=src .venv/bin/python scripts/score_launches.py [--old REV] [--length 4096]

``--old`` counts ``src/nestedkv/scoring.py`` at that git revision as well, side by side.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nestedkv import scoring
from nestedkv.settings import NestedKVConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring_speed import old_scoring  # noqa: E402

NOT_LAUNCHED = {  # views and bare allocations: no kernel
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze",
    "aten::squeeze", "aten::transpose", "aten::permute", "aten::expand", "aten::t", "aten::alias", "aten::detach",
    "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::_reshape_alias", "aten::empty",
    "aten::empty_like", "aten::new_empty", "aten::empty_strided", "aten::unflatten", "aten::lift_fresh",
}


class CountLaunches(TorchDispatchMode):
    """Counts dispatched operations by the innermost function of the score module that called them."""

    def __init__(self, module_file: str) -> None:
        super().__init__()
        self.module_file = module_file
        self.launches: collections.Counter[str] = collections.Counter()
        self.from_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name == "aten::lift_fresh":
            self.from_host += 1
        elif name not in NOT_LAUNCHED:
            frames = [frame for frame in traceback.extract_stack() if frame.filename == self.module_file]
            self.launches[frames[-1].name if frames else "(outside)"] += 1
        return func(*args, **(kwargs or {}))


def count(module: types.ModuleType, keys, values, rotary) -> CountLaunches:
    """The operations of one score of ``keys`` by ``module``'s ``nestedkv_score`` on the tensor path."""
    module.CPU_CHUNK_ELEMENTS = keys.numel()  # every head at once, as on CUDA
    counter = CountLaunches(module.__file__)  # the old revision's module is given the name its code was compiled under
    with counter:
        module.nestedkv_score(keys, NestedKVConfig(), values, rotary)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="git revision of an earlier scoring.py to count beside today's")
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    os.environ["NESTEDKV_CPU_KERNEL"] = "0"  # the tensor path, as on CUDA (read when the kernel is first built)
    generator = torch.Generator().manual_seed(0)
    shape = (1, 8, args.length, 64)  # one layer of Llama-3.2-1B's shape
    keys, values = (torch.randn(*shape, generator=generator).to(torch.bfloat16) for _ in range(2))
    angles = torch.rand(1, args.length, 64, generator=generator)
    half = torch.arange(64).roll(32)
    rotary = scoring.Rotary(angles.cos(), angles.sin(), half, torch.cat([-torch.ones(32), torch.ones(32)]))
    counts = {"today": count(scoring, keys, values, rotary)}
    if args.old:
        old = old_scoring(args.old)
        old.__file__ = f"{args.old}:scoring.py"
        counts[args.old] = count(old, keys, values, old.Rotary(*vars(rotary).values()))
    names = sorted({name for counter in counts.values() for name in counter.launches})
    print(f"keys {shape}, the shipped settings; operations that launch kernels, by function of the score:\n")
    print("| function | " + " | ".join(counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for name in names:
        print(f"| {name} | " + " | ".join(str(counter.launches[name]) for counter in counts.values()) + " |")
    print("| **all** | " + " | ".join(f"**{sum(c.launches.values())}**" for c in counts.values()) + " |")
    print("| tensors made from Python data | " + " | ".join(str(c.from_host) for c in counts.values()) + " |")


if __name__ == "__main__":
    main()
