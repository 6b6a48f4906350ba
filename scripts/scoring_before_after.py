"""NestedKV's score on the CPU before and after a change, in one process and on the same keys.

Today's :func:`nestedkv.scoring.nestedkv_score` against the ``scoring.py`` of an earlier commit (read with
``git show``, run with today's settings), on the keys and values of one prefill of random tokens through
the default model, for the shipped default and the paper's settings. The two take turns (11 rounds after a
warm-up); prints the median seconds for all layers, their ratio, and how many positions the two keep
differently at r = 0.9 (head-adaptive budget, as the press keeps them):

    PYTHONPATH=src .venv/bin/python scripts/scoring_before_after.py --before ba39cd3 --length 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from nestedkv.bench.replay import prefill
from nestedkv.budgets import head_adaptive_keep
from nestedkv.models import load_model
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import PAPER_SETTINGS, NestedKVConfig, compute_n_kept

ROUNDS = 11


def scoring_module_at(commit: str, directory: str):
    """``src/nestedkv/scoring.py`` as it was at ``commit``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/nestedkv/scoring.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(directory) / "scoring_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("scoring_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="ba39cd3", help="the commit to compare with (default: ba39cd3)")
    parser.add_argument("--length", type=int, default=4096, help="context tokens (default: 4096)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        before = scoring_module_at(args.before, directory)
        model, _ = load_model()
        ids = torch.randint(model.get_input_embeddings().num_embeddings, (1, args.length),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cache, _ = prefill(model, ids)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        n_kept = compute_n_kept(args.length, 0.9)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {len(layers)} layers, "
              f"N = {args.length}, before = {args.before}")
        for name, config in (("shipped", NestedKVConfig()), ("paper", NestedKVConfig(**PAPER_SETTINGS))):
            scorers = {"before": before.nestedkv_score, "after": nestedkv_score}
            scores = {label: [score(k, config, v) for k, v in layers] for label, score in scorers.items()}
            differ = sum(
                (head_adaptive_keep(old, n_kept) != head_adaptive_keep(new, n_kept)).sum().item()
                for old, new in zip(scores["before"], scores["after"], strict=True)
            )
            seconds = {label: [] for label in scorers}
            for _ in range(ROUNDS):
                for label, score in scorers.items():
                    start = time.perf_counter()
                    for k, v in layers:
                        score(k, config, v)
                    seconds[label].append(time.perf_counter() - start)
            before_s, after_s = (statistics.median(seconds[label]) for label in scorers)
            print(f"{name}: before {before_s * 1e3:.1f} ms, after {after_s * 1e3:.1f} ms, before / after "
                  f"{before_s / after_s:.2f}x; kept-position flags that differ at r = 0.9: {differ}", flush=True)


if __name__ == "__main__":
    main()
