"""Dev experiment (issue 12): layer shares chosen from the keys, against the shipped per-layer budgets.

The shipped NestedKVPress gives every layer the same share ``1 - r`` and lets the heads of a layer compete
for it (AdaKV's rule). Here the heads of *all* layers compete for the whole cache's budget: the shipped
scores of every layer are stacked as ``(1, layers * heads, N)`` and :func:`nestedkv.budgets.head_adaptive_keep`
keeps the best ``layers * heads * n_kept`` (head, position) pairs, each head first keeping ``alpha`` of its
even share. A one-shot press would have to hold the whole uncompressed cache until the last layer to do
this, so it is measured here first, on the dev split's continuation samples (teacher-forced ΔNLL of the
next 256 tokens against the uncompressed cache), before any press is built:

    PYTHONPATH=src .venv/bin/python scripts/layer_shares_dev.py --samples 16 --length 2048

Prints each variant's mean ΔNLL per ratio and its paired difference from the per-layer budgets (± 95 %,
normal approximation over documents; negative = lower loss than shipped).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from nestedkv.bench.documents import CONTINUATION, build_document_samples, greedy_agreement_and_nll
from nestedkv.bench.replay import compress_replay, prefill_once
from nestedkv.bench.runner import teacher_forced_logits
from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.models import load_model
from nestedkv.press import NestedKVPress
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import NestedKVConfig, compute_n_kept

RATIOS = (0.75, 0.875, 0.9, 0.95)
VARIANTS = {"per layer (shipped)": None, "across layers, alpha 0.2": 0.2, "across layers, alpha 0.5": 0.5}


def keep_masks(scores: list[torch.Tensor], n_kept: int, across: float | None) -> list[torch.Tensor]:
    """Keep masks ``(1, H, N)`` per layer: each layer on its own (``across`` None), or all layers' heads
    competing with safeguard ``across``."""
    if across is None:
        return [head_adaptive_keep(layer, n_kept, 0.2) for layer in scores]
    heads = scores[0].shape[1]
    keep = head_adaptive_keep(torch.cat(scores, dim=1), n_kept, across)
    return list(keep.split(heads, dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_model()
    samples = build_document_samples(CONTINUATION, args.samples, tokenizer, args.length, "dev")
    config = NestedKVConfig()
    delta = {(name, r): [] for name in VARIANTS for r in RATIOS}
    for number, sample in enumerate(samples):
        with torch.no_grad():
            prefill = prefill_once(model, sample.context_ids)
            full = compress_replay(model, prefill, None)
            targets = sample.target_ids
            reference = teacher_forced_logits(model, full, targets, prefill)
            scores = [nestedkv_score(k, config, v) for k, v in zip(prefill.keys, prefill.values, strict=True)]
            for ratio in RATIOS:
                n_kept = compute_n_kept(prefill.context_length, ratio)
                for name, across in VARIANTS.items():
                    masks = keep_masks(scores, n_kept, across)
                    cache = compress_replay(model, prefill, None)
                    for index, keep in enumerate(masks):
                        cache.layers[index] = RaggedLayer.from_keep(prefill.keys[index], prefill.values[index], keep)
                    if across is None and number == 0:  # the manual per-layer masks are the press's own
                        press_cache = compress_replay(model, prefill, NestedKVPress(ratio))
                        assert all(torch.equal(a.offsets, b.offsets) for a, b in
                                   zip(cache.layers, press_cache.layers, strict=True))
                    logits = teacher_forced_logits(model, cache, targets, prefill)
                    result = greedy_agreement_and_nll(logits, reference, targets[0, 1:])
                    delta[name, ratio].append(result["delta_nll"])
        print(f"document {number + 1}/{len(samples)} done", flush=True)
    print(f"{len(samples)} dev documents, {args.length} tokens; mean ΔNLL (nats/token) and paired difference "
          f"from the per-layer budgets")
    shipped = next(iter(VARIANTS))
    for name in VARIANTS:
        cells = []
        for ratio in RATIOS:
            values = delta[name, ratio]
            differences = [a - b for a, b in zip(values, delta[shipped, ratio], strict=True)]
            half = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else 0
            cells.append(f"r={ratio}: {statistics.mean(values):.3f} ({statistics.mean(differences):+.3f} ± {half:.3f})")
        print(f"{name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
