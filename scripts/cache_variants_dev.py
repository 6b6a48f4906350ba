"""Dev experiments (issue 12): caches built differently from the shipped scores, against the shipped press.

Each variant takes every layer's shipped NestedKV scores (or scores the keys its own way) and the
uncompressed keys and values of one prefill, and builds the compressed cache; it is measured on the dev
split's continuation samples (teacher-forced ΔNLL of the next 256 tokens against the uncompressed cache)
before any press is built. Families:

- ``layer-shares`` (sixteenth session): the heads of *all* layers compete for the whole cache's budget
  (the scores stacked as ``(1, layers * heads, N)``, AdaKV's rule with safeguard ``alpha``) instead of
  each layer keeping the same share ``1 - r``. A one-shot press would have to hold the whole
  uncompressed cache until the last layer.
- ``merge`` (seventeenth session): a training-free memory of what was evicted, in the spirit of CaM and
  D2O. *Merge into the nearest kept*: each evicted position's value (and key) is averaged into the kept
  position, among the few kept on either side of it in its head, whose key is most similar (cosine at
  least ``threshold``). *Summary slots*: every block of ``block`` positions gives one slot holding the
  mean key (rescaled to the evicted keys' mean norm) and mean value of its evicted positions; the slots
  count against the budget, so the head keeps ``blocks`` fewer real positions. Both are linear in N.
- ``value-signal`` (seventeenth session): the value term of the shipped score reads each value's distance
  from the head's mean value instead of its norm.
- ``ramp-shape`` (seventeenth session): the recency ramp as a power of the position, ``(i / (N - 1)) ** p``.
- ``separators`` (eighteenth session): a prior from the tokens themselves, in the spirit of SepLLM
  (separator tokens gather what the segment before them says): the shipped score leans, as the
  ramp does, towards positions whose token is punctuation or a line break (or a line break only).
  The press sees no token ids, so shipping this would need the model's input ids in the press.
- ``pre-rope`` (nineteenth session): the keys scored as they were before RoPE turned each by its
  position's angles (the cache holds rotated keys; the inverse rotation is one elementwise pass), so
  that a key's anomaly against its block and window means reads its content, not where it sits.

"Shipped" here is the press these families were measured against: the default of the nineteenth session,
which scores the keys as cached (``scored_keys='cached'``); the ``pre-rope`` family's first variant is
today's default, which shipped in the twentieth (``docs/tuning.md``). Keeping that base keeps every
figure of ``docs/tuning.md`` that this script printed reproducible.

    PYTHONPATH=src .venv/bin/python scripts/cache_variants_dev.py --family merge --samples 16 --length 2048

Prints each variant's mean ΔNLL per ratio and its paired difference from the shipped press (± 95 %,
Student's t over documents, as the reports; negative = lower loss than shipped). The seventeenth
session's figures in docs/tuning.md used the normal 1.96 (16 documents: 8 % narrower).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Callable
from functools import partial

import torch

from nestedkv.bench.documents import CONTINUATION, build_document_samples, greedy_agreement_and_nll
from nestedkv.bench.replay import compress_replay, prefill_once
from nestedkv.bench.report import Cell
from nestedkv.bench.runner import teacher_forced_logits
from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.models import attention_modules, load_model
from nestedkv.press import NestedKVPress, keys_before_rope
from nestedkv.scoring import (
    lean_towards,
    nestedkv_score,
    normalise_keys,
    pin_protected,
    raw_anomalies,
    score_anomalies,
)
from nestedkv.settings import NestedKVConfig, NestedKVSettings, compute_n_kept

RATIOS = (0.75, 0.875, 0.9, 0.95)
SAFEGUARD = NestedKVSettings().alpha_safeguard
N_SINK = NestedKVConfig().n_sink

# A variant: (keys, values, scores) of every layer, each (1, H, N, d) / (1, H, N), and n_kept per head
# -> one packed layer per model layer.
Variant = Callable[[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int], list[RaggedLayer]]


def per_layer(keys, values, scores, n_kept) -> list[RaggedLayer]:
    """The shipped press: every layer keeps ``n_kept`` per head on average, its heads competing."""
    return [RaggedLayer.from_keep(k, v, head_adaptive_keep(s, n_kept, SAFEGUARD))
            for k, v, s in zip(keys, values, scores, strict=True)]


def across_layers(keys, values, scores, n_kept, alpha: float) -> list[RaggedLayer]:
    """All layers' heads compete for the whole budget, each head first keeping ``alpha`` of its share."""
    heads = scores[0].shape[1]
    keep = head_adaptive_keep(torch.cat(scores, dim=1), n_kept, alpha).split(heads, dim=1)
    return [RaggedLayer.from_keep(k, v, m) for k, v, m in zip(keys, values, keep, strict=True)]


def merge_into_nearest_kept(
    keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, threshold: float, *, merge_keys: bool,
    neighbours: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each evicted position into its most similar kept neighbour. ``(1, H, N, d), bool (1, H, N)``.

    Candidates are the ``neighbours`` kept positions before and after the evicted one (sinks excluded:
    their values carry the attention that has nowhere else to go); the one with the highest key cosine
    takes it if that cosine is at least ``threshold``. A kept position that takes ``m`` evicted ones holds
    the plain mean of the ``m + 1`` values (and keys, with ``merge_keys``). Returns new keys and values.
    """
    keys, values = keys.clone(), values.clone()
    k_hat = normalise_keys(keys[0])
    for head in range(keep.shape[1]):
        kept = keep[0, head].nonzero().squeeze(1)
        targets = kept[kept >= N_SINK]
        evicted = (~keep[0, head]).nonzero().squeeze(1)
        if targets.numel() == 0 or evicted.numel() == 0:
            continue
        place = torch.searchsorted(targets, evicted)
        candidates = (place[:, None] + torch.arange(-neighbours, neighbours)).clamp(0, targets.numel() - 1)
        cosine = (k_hat[head, evicted, None, :] * k_hat[head, targets[candidates]]).sum(-1)
        best_cosine, best = cosine.max(dim=-1)
        taken = best_cosine >= threshold
        into = targets[candidates.gather(1, best[:, None]).squeeze(1)][taken]
        count = torch.ones(keep.shape[-1]).index_add_(0, into, torch.ones(into.numel()))[:, None]
        tensors = (keys, values) if merge_keys else (values,)
        for tensor in tensors:
            row = tensor[0, head].float()
            merged = row.index_add(0, into, row[evicted[taken]]) / count
            tensor[0, head] = merged.to(tensor.dtype)
    return keys, values


def merged(keys, values, scores, n_kept, threshold: float, merge_keys: bool) -> list[RaggedLayer]:
    """The shipped keep masks, evicted positions merged into their nearest similar kept ones."""
    layers = []
    for k, v, s in zip(keys, values, scores, strict=True):
        keep = head_adaptive_keep(s, n_kept, SAFEGUARD)
        layers.append(RaggedLayer.from_keep(*merge_into_nearest_kept(k, v, keep, threshold, merge_keys=merge_keys),
                                            keep))
    return layers


def summary_slots(
    keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One slot per block of ``block`` positions for what it evicted. ``(1, H, N, d), bool (1, H, N)``.

    The slot takes the place of the block's last evicted position: the mean of the block's evicted keys,
    rescaled to their mean norm (a plain mean of scattered directions is short), and the mean of their
    values. Returns keys, values and the keep mask with the slots kept.
    """
    _, heads, n, dim = keys.shape
    evicted = ~keep[0]
    block_of = torch.arange(n) // block
    blocks = int(block_of[-1]) + 1
    weight = evicted.float()  # (H, N)
    count = torch.zeros(heads, blocks).index_add_(1, block_of, weight)
    key_sum = torch.zeros(heads, blocks, dim).index_add_(1, block_of, keys[0].float() * weight[..., None])
    value_sum = torch.zeros(heads, blocks, dim).index_add_(1, block_of, values[0].float() * weight[..., None])
    norm_sum = torch.zeros(heads, blocks).index_add_(1, block_of, keys[0].float().norm(dim=-1) * weight)
    last = torch.where(evicted, torch.arange(n), -1)
    carrier = torch.full((heads, blocks), -1).scatter_reduce_(1, block_of.expand(heads, n), last, "amax")
    has = carrier >= 0
    safe = count.clamp_min(1)[..., None]
    mean_key = key_sum / safe
    mean_key = mean_key / mean_key.norm(dim=-1, keepdim=True).clamp_min(1e-6) * (norm_sum[..., None] / safe)
    keys, values, keep = keys.clone(), values.clone(), keep.clone()
    head_index = torch.arange(heads)[:, None].expand(heads, blocks)[has]
    position = carrier[has]
    keys[0, head_index, position] = mean_key[has].to(keys.dtype)
    values[0, head_index, position] = (value_sum / safe)[has].to(values.dtype)
    keep[0, head_index, position] = True
    return keys, values, keep


def with_slots(keys, values, scores, n_kept, block: int) -> list[RaggedLayer]:
    """``n_kept - ceil(N / block)`` real positions per head on average, plus one summary slot per block."""
    n = scores[0].shape[-1]
    real = n_kept - math.ceil(n / block)
    if real <= N_SINK:
        raise ValueError(f"{n_kept} kept per head leaves no room beside {math.ceil(n / block)} slots")
    return [RaggedLayer.from_keep(*summary_slots(k, v, head_adaptive_keep(s, real, SAFEGUARD), block))
            for k, v, s in zip(keys, values, scores, strict=True)]


def rescored(keys, values, n_kept, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[RaggedLayer]:
    """Each layer keeps its best positions under its own ``score(k, v) -> (1, H, N)``, heads competing as in
    the press."""
    return [RaggedLayer.from_keep(k, v, head_adaptive_keep(score(k, v), n_kept, SAFEGUARD))
            for k, v in zip(keys, values, strict=True)]


def centred_values(keys, values, scores, n_kept, weight: float) -> list[RaggedLayer]:
    """Scores whose value term reads ``||v - mean(v)||`` (the head's mean over positions) instead of ``||v||``:
    evicting a position whose value is the head's average output changes the output only by renormalising."""
    config = dataclasses.replace(NestedKVConfig(), value_weight=weight)
    return rescored(keys, values, n_kept, lambda k, v: nestedkv_score(k, config, v - v.mean(dim=-2, keepdim=True)))


def ramp_shape(keys, values, scores, n_kept, power: float, recency: float) -> list[RaggedLayer]:
    """The shipped score with the recency ramp ``(i / (N - 1)) ** power`` (weight ``recency``) instead of the
    linear one: a power above 1 leans on the newest positions and leaves the early ones nearly level."""
    config = dataclasses.replace(NestedKVConfig(), recency=recency)

    def score(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = k.shape[-2]
        # score_anomalies reads a ramp place as position / (seen - 1): hand it the shaped places
        places = torch.linspace(0.0, 1.0, n) ** power * (n - 1)
        return score_anomalies(raw_anomalies(k[0], config), config, places, n,
                               value_norms=v[0].float().norm(dim=-1))[None]

    return rescored(keys, values, n_kept, score)


def separator_mask(context_ids: torch.Tensor, tokenizer, newline_only: bool) -> torch.Tensor:
    """Float ``(N,)``: 1 where the context's token holds a line break (or, unless ``newline_only``, is
    punctuation that ends a clause: ``.,;:!?``), 0 elsewhere."""
    texts = {i: tokenizer.decode([i]) for i in set(context_ids[0].tolist())}
    ends = set(".,;:!?")

    def is_separator(text: str) -> bool:
        return "\n" in text or (not newline_only and text.strip() != "" and set(text.strip()) <= ends)

    return torch.tensor([float(is_separator(texts[i])) for i in context_ids[0].tolist()])


def lean_to_separators(keys, values, scores, n_kept, separators: torch.Tensor, weight: float) -> list[RaggedLayer]:
    """The shipped scores leaning towards separator positions as ``(s + weight * separator) / (1 + weight)``.
    The lean moves the pinned recent window too, so it is pinned again as the press pins it (the sinks stay
    at infinity): the real scores are leaned, the pins are the press's."""
    config = NestedKVConfig()
    leaned = [pin_protected(lean_towards(s, separators, weight), config.n_sink, config.n_recent) for s in scores]
    return per_layer(keys, values, leaned, n_kept)


def separator_variants(context_ids: torch.Tensor, tokenizer) -> dict[str, Variant]:
    """The ``separators`` family for one sample (its masks depend on the tokens)."""
    punctuation, newlines = (separator_mask(context_ids, tokenizer, only) for only in (False, True))
    return {
        "shipped": per_layer,
        "separators, weight 0.25": partial(lean_to_separators, separators=punctuation, weight=0.25),
        "separators, weight 0.5": partial(lean_to_separators, separators=punctuation, weight=0.5),
        "line breaks, weight 0.5": partial(lean_to_separators, separators=newlines, weight=0.5),
    }


def pre_rope_scores(keys, values, scores, n_kept, modules, angles, mix: float) -> list[RaggedLayer]:
    """Each layer's keys scored before RoPE (the press's :func:`~nestedkv.press.keys_before_rope` with the
    sample's ``angles``), ``mix`` of that score and ``1 - mix`` of the shipped one."""
    config = NestedKVConfig()
    hook_inputs = {"position_embeddings": angles}
    mixed = [mix * nestedkv_score(keys_before_rope(module, k, hook_inputs), config, v) + (1 - mix) * s
             for module, k, v, s in zip(modules, keys, values, scores, strict=True)]
    return per_layer(keys, values, mixed, n_kept)


def pre_rope_variants(context_ids: torch.Tensor, tokenizer, model) -> dict[str, Variant]:
    """The ``pre-rope`` family for one sample: the model's RoPE angles at its positions."""
    n = context_ids.shape[1]
    probe = torch.zeros(1, n, model.config.hidden_size)
    turned_back = partial(pre_rope_scores, modules=attention_modules(model),
                          angles=model.model.rotary_emb(probe, torch.arange(n)[None]))
    return {
        "shipped": per_layer,
        "pre-RoPE keys": partial(turned_back, mix=1.0),
        "half pre-RoPE, half shipped": partial(turned_back, mix=0.5),
    }


# Families whose variants depend on the sample (its tokens, its positions): built for each sample.
PER_SAMPLE_FAMILIES: dict[str, Callable[[torch.Tensor, object, object], dict[str, Variant]]] = {
    "separators": lambda context_ids, tokenizer, model: separator_variants(context_ids, tokenizer),
    "pre-rope": pre_rope_variants,
}

FAMILIES: dict[str, dict[str, Variant]] = {
    "layer-shares": {
        "per layer (shipped)": per_layer,
        "across layers, alpha 0.2": partial(across_layers, alpha=0.2),
        "across layers, alpha 0.5": partial(across_layers, alpha=0.5),
    },
    "merge": {
        "shipped": per_layer,
        "merge values, cosine >= 0.8": partial(merged, threshold=0.8, merge_keys=False),
        "merge values, cosine >= 0.6": partial(merged, threshold=0.6, merge_keys=False),
        "merge keys and values, cosine >= 0.8": partial(merged, threshold=0.8, merge_keys=True),
        "summary slot per 128": partial(with_slots, block=128),
        "summary slot per 256": partial(with_slots, block=256),
    },
    "value-signal": {
        "shipped": per_layer,
        "centred values, weight 0.25": partial(centred_values, weight=0.25),
        "centred values, weight 0.5": partial(centred_values, weight=0.5),
    },
    "ramp-shape": {
        "shipped": per_layer,
        "linear ramp through the tensor functions (control)": partial(ramp_shape, power=1.0, recency=0.5),
        "ramp ** 2, weight 0.5": partial(ramp_shape, power=2.0, recency=0.5),
        "ramp ** 0.5, weight 0.5": partial(ramp_shape, power=0.5, recency=0.5),
        "ramp ** 2, weight 1": partial(ramp_shape, power=2.0, recency=1.0),
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, *PER_SAMPLE_FAMILIES], default="merge")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_model()
    samples = build_document_samples(CONTINUATION, args.samples, tokenizer, args.length, "dev")
    config = NestedKVConfig(scored_keys="cached")  # the nineteenth session's default: see the module's docstring
    delta = {}
    for number, sample in enumerate(samples):
        family = PER_SAMPLE_FAMILIES.get(args.family)
        variants = family(sample.context_ids, tokenizer, model) if family else FAMILIES[args.family]
        with torch.no_grad():
            prefill = prefill_once(model, sample.context_ids)
            full = compress_replay(model, prefill, None)
            targets = sample.target_ids
            reference = teacher_forced_logits(model, full, targets, prefill)
            scores = [nestedkv_score(k, config, v) for k, v in zip(prefill.keys, prefill.values, strict=True)]
            for ratio in RATIOS:
                n_kept = compute_n_kept(prefill.context_length, ratio)
                for name, variant in variants.items():
                    cache = compress_replay(model, prefill, None)
                    cache.layers[:] = variant(prefill.keys, prefill.values, scores, n_kept)
                    if variant is per_layer and number == 0:  # the shipped variant's masks are the press's own
                        press_cache = compress_replay(model, prefill, NestedKVPress(ratio, scored_keys="cached"))
                        assert all(torch.equal(a.offsets, b.offsets) for a, b in
                                   zip(cache.layers, press_cache.layers, strict=True))
                    logits = teacher_forced_logits(model, cache, targets, prefill)
                    result = greedy_agreement_and_nll(logits, reference, targets[0, 1:])
                    delta.setdefault((name, ratio), []).append(result["delta_nll"])
        print(f"document {number + 1}/{len(samples)} done", flush=True)
    print(f"{len(samples)} dev documents, {args.length} tokens; mean ΔNLL (nats/token) and paired difference "
          f"from the shipped press")
    shipped = next(iter(variants))
    for name in variants:
        cells = []
        for ratio in RATIOS:
            values = delta[name, ratio]
            paired = Cell({CONTINUATION: values}).minus(Cell({CONTINUATION: delta[shipped, ratio]}))
            cells.append(f"r={ratio}: {statistics.mean(values):.3f} ({paired.mean:+.3f} ± {paired.ci95 or 0:.3f})")
        print(f"{name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
