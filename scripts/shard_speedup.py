"""Is `nestedkv eval --shard` worth it on this CPU? Greedy decoding speed of the default model from a
long prefill: one process with every core, against one single-threaded process per core running
at the same time (what N shards do). Prints ms/token of each and the throughput ratio.

    .venv/bin/python scripts/shard_speedup.py [--length 4000] [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def decode_ms_per_token(threads: int, length: int, steps: int) -> float:
    import torch

    from nestedkv import load_model
    from nestedkv.bench.replay import prefill

    torch.set_num_threads(threads)
    model, _ = load_model()
    input_ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
    cache, hidden = prefill(model, input_ids)
    with torch.no_grad():
        token = model.lm_head(hidden).argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache).logits.argmax(-1)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_threads is not None:
        print(decode_ms_per_token(args.child_threads, args.length, args.steps))
        return
    cores = os.cpu_count() or 1

    def start(threads: int) -> subprocess.Popen:
        command = [sys.executable, __file__, f"--length={args.length}", f"--steps={args.steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        return subprocess.Popen([*command, f"--child-threads={threads}"], stdout=subprocess.PIPE, text=True, env=env)

    def finish(process: subprocess.Popen) -> float:
        return float(process.communicate()[0].split()[-1])

    one = finish(start(cores))
    shards = [finish(process) for process in [start(1) for _ in range(cores)]]
    print(f"context {args.length} tokens, {args.steps} greedy steps, {cores} cores")
    print(f"one process, {cores} threads: {one:.1f} ms/token")
    print(f"{cores} single-threaded processes at once: " + ", ".join(f"{ms:.1f}" for ms in shards) + " ms/token")
    print(f"throughput of the shards / one process: {sum(one / ms for ms in shards):.2f}x")


if __name__ == "__main__":
    main()
