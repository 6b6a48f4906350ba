"""The NestedKV score compiled (``compiled_nestedkv_score``) against the eager score, on one layer's keys.

What compiling costs (the first call; then the first call at each other context length, which should find the
graph already made), whether the compiled score keeps the positions the eager one keeps, how many kernels one
compiled call runs (counted in inductor's generated code: fused kernels plus operations it leaves to PyTorch)
against the operations the eager tensor path dispatches (``scripts/score_launches.py`` counts those per
function), and the time per call of each path, taking turns (``nestedkv.bench.speed.interleaved_medians``). On
the CPU the shipped path (the C kernel) is timed too.
docs/scoring_speed.md and docs/benchmarks_cuda.md quote its output.

    PYTHONPATH=src .venv/bin/python scripts/score_compiled.py [--device cuda] [--lengths 4096,5000,8192]
"""

from __future__ import annotations

import argparse
import re
from functools import partial

import torch
from torch._inductor.utils import run_and_get_code

from nestedkv import scoring_cpu
from nestedkv.bench.speed import interleaved_medians, timed
from nestedkv.scoring import Rotary, compiled_nestedkv_score, nestedkv_score
from nestedkv.settings import NestedKVConfig

KERNEL_CALL = re.compile(
    r"^\s+(?:\w+ = )?(?:cpp_fused_\w+\(|triton_\w+\.run\(|extern_kernels\.\w+\(|torch\.ops\.aten\.)"
)
"""A line of the generated ``call`` function that runs a kernel: a fused C++ or Triton kernel, or an operation
left to PyTorch."""


def llama_rotary(n: int, head_dim: int, device: str) -> Rotary:
    """Llama's RoPE angles (base 10000, halves rotated) of positions 0..N-1."""
    frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device) / head_dim)
    theta = torch.arange(n, device=device)[None, :, None] * frequencies
    theta = torch.cat([theta, theta], dim=-1)
    half = head_dim // 2
    sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])
    return Rotary(theta.cos(), theta.sin(), torch.arange(head_dim, device=device).roll(half), sign)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="4096,5000,8192", help="context lengths; the first is timed")
    parser.add_argument("--heads", type=int, default=8, help="KV heads of the layer (Llama-3.2-1B: 8 of 64 dims)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    lengths = [int(length) for length in args.lengths.split(",")]
    generator = torch.Generator(args.device).manual_seed(0)
    config = NestedKVConfig()

    def layer(n: int) -> tuple[torch.Tensor, torch.Tensor, Rotary]:
        keys, values = (torch.randn(1, args.heads, n, 64, generator=generator, device=args.device).to(
            getattr(torch, args.dtype)) for _ in range(2))
        return keys, values, llama_rotary(n, 64, args.device)

    def eager(keys, values, rotary) -> torch.Tensor:
        return nestedkv_score(keys, config, values, rotary)

    def compiled(keys, values, rotary) -> torch.Tensor:
        return compiled_nestedkv_score()(keys, config, values, rotary)

    def tensor_path(keys, values, rotary) -> torch.Tensor:
        """The eager score without the C kernel: what a GPU (or a CPU without a C compiler) runs."""
        kernel = scoring_cpu.kernel
        scoring_cpu.kernel = lambda: None
        try:
            return eager(keys, values, rotary)
        finally:
            scoring_cpu.kernel = kernel

    inputs = layer(lengths[0])
    # the first call compiles, and hands over the generated code
    first, (_, code) = timed(partial(run_and_get_code, compiled, *inputs), args.device)
    print(f"compiled, first call at N = {lengths[0]} (compiles): {first:.1f} s")
    call = [line for source in code if "def call(" in source for line in source.split("def call(", 1)[1].splitlines()]
    kernels = sum(bool(KERNEL_CALL.match(line)) for line in call)
    print(f"kernels one compiled call runs (inductor's generated code): {kernels}")
    for n in lengths[1:]:
        other = layer(n)
        first, _ = timed(partial(compiled, *other), args.device)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"compiled, first call at N = {n}: {first:.3f} s ({graphs} graphs compiled so far)")
        kept = [score.topk(n // 10).indices.sort().values for score in (compiled(*other), eager(*other))]
        print(f"  same top {n // 10} positions in every head as the eager score: {torch.equal(*kept)}")
    paths = {"compiled": compiled, "eager tensor path": tensor_path}
    if args.device == "cpu" and scoring_cpu.kernel() is not None:
        paths["shipped (C kernel)"] = eager
    calls = {name: partial(score, *inputs) for name, score in paths.items()}
    for name, seconds in interleaved_medians(calls, args.repeats, 1, args.device).items():
        print(f"{name}: {seconds * 1e3:.2f} ms per call (median of {args.repeats}, taking turns), N = {lengths[0]}")


if __name__ == "__main__":
    main()
