"""Whether the recency ramp rounded once, ``i / (N - 1)``, keeps other positions than ``torch.linspace``'s ramp did.

The shipped score's ramp was ``torch.linspace(0, 1, N)`` until the score was made compilable for every length
(docs/scoring_speed.md). This prefills the default model with the first N tokens of the packaged Austen text, turns
every layer's keys back from RoPE, scores them with both ramps and counts the head-adaptive keep flags that differ
at each ratio, over all layers and heads.

    PYTHONPATH=src .venv/bin/python scripts/ramp_kept_positions.py [--length 4096]
"""

from __future__ import annotations

import argparse
from importlib import resources

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from nestedkv import scoring
from nestedkv.budgets import head_adaptive_keep
from nestedkv.models import load_model
from nestedkv.settings import NestedKVConfig, compute_n_kept

RATIOS = (0.5, 0.75, 0.875, 0.9, 0.95)


def linspace_ramp(scores: torch.Tensor, recency: float, places: torch.Tensor | None = None) -> torch.Tensor:
    """``favour_recent`` as it was: the ramp from ``torch.linspace``."""
    if places is None and recency:
        places = torch.linspace(0.0, 1.0, scores.shape[-1], dtype=scores.dtype, device=scores.device)
    return rounded_once_ramp(scores, recency, places)


rounded_once_ramp = scoring.favour_recent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    model, tokenizer = load_model()
    text = resources.files("nestedkv").joinpath("data/austen.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: 8 * args.length], return_tensors="pt").input_ids[:, : args.length]
    n = ids.shape[1]
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=cache)
    cos, sin = (angle[:, None] for angle in model.model.rotary_emb(cache.layers[0].keys, torch.arange(n)[None]))
    differing, largest = dict.fromkeys(RATIOS, 0), 0.0
    for layer in cache.layers:
        keys = layer.keys * cos - rotate_half(layer.keys) * sin  # as before RoPE, as the shipped press scores them
        rounded = scoring.nestedkv_score(keys, NestedKVConfig(), layer.values)
        scoring.favour_recent = linspace_ramp
        try:
            old = scoring.nestedkv_score(keys, NestedKVConfig(), layer.values)
        finally:
            scoring.favour_recent = rounded_once_ramp
        finite = rounded.isfinite()
        largest = max(largest, (rounded - old)[finite].abs().max().item())
        for ratio in RATIOS:
            n_kept = compute_n_kept(n, ratio)
            differing[ratio] += int((head_adaptive_keep(rounded, n_kept) != head_adaptive_keep(old, n_kept)).sum())
    flags = rounded.numel() * len(cache.layers)
    print(f"N = {n}: largest score difference {largest:.2e}; keep flags differing of {flags} per ratio:")
    for ratio, count in differing.items():
        print(f"  r = {ratio}: {count}")


if __name__ == "__main__":
    main()
