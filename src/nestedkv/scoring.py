"""The NestedKV score: pure tensor functions, one per step of the spec (``NESTEDKV_SPEC.md``).

NestedKV (Chen et al., "NestedKV: Nested Memory Routing for Long-Context KV Cache Compression",
arXiv 2605.26678) scores every cached position of every KV head from the L2-normalised keys alone:
each key is compared with three anchors at three time scales (global, block, sliding window), the
three anomalies are mixed with head-adaptive weights, and a surprise gate routes positions where
the scales disagree to the strongest single scale. Higher score = more worth keeping. Beyond the
paper (each off in its settings): a recency ramp, the values' norms and pooling over neighbours,
applied in :func:`score_anomalies` before the protected positions are pinned; the shipped default
uses the first two (``docs/tuning.md``).

Shapes: ``keys`` is ``(..., N, d)`` (usually ``(batch, kv_heads, N, head_dim)``); scores are
``(..., N)``. Everything is computed in float32, costs O(N·d) per head, and never builds an N×N
tensor. No model, no kvpress: these functions can be checked by hand.

Choices the paper leaves open (marked [open] in the spec) are made here, each in one place:

* trailing block: a last block shorter than half a block is merged into the block before it,
  so that no block anchor averages a handful of keys (see :func:`block_count`);
* constant vectors: a min-max normalisation of a constant vector gives all zeros;
* sinks and min-max: the ``n_sink`` first positions are left out of every within-head statistic
  (min-max ranges, top/bottom-10 % gaps, surprise range and mean), because sink keys are outliers
  that would squeeze everyone else's range; they are pinned to the top of the score anyway;
* surprise is the population standard deviation across scales (any constant factor is removed
  by the min-max normalisation that follows).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nestedkv import scoring_cpu
from nestedkv.settings import MIXINGS, SCALES, NestedKVConfig, check_context_length
from nestedkv.validation import check_choice

PINNED = float("inf")
"""Score given to the sinks: above every other score."""


# --- before step 1: the keys before RoPE (beyond the paper; the shipped default) ----------------


@dataclass(frozen=True)
class Rotary:
    """How a rotary position embedding rotated cached keys, so that the score can turn them back.

    The first ``r = cos.shape[-1]`` dimensions of the key ``k`` at position ``i`` became
    ``k * cos[i] + (k[perm] * sign) * sin[i]``; the rest passed through. ``cos``, ``sin``: ``(B or 1, N, r)``
    float32; ``perm`` ``(r,)`` int64 and ``sign`` ``(r,)`` float32: the model's ``rotate_half`` (halves or
    interleaved pairs) as a signed permutation, which applied twice negates. All on the keys' device.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    perm: torch.Tensor
    sign: torch.Tensor


def undo_rotary(keys: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """``keys (B, H, N, d)`` as they were before ``rotary``, in float32: the rotation by −θ,
    ``k * cos − (k[perm] * sign) * sin`` (the angles of paired dimensions are equal in RoPE)."""
    keys = keys.float()
    r = rotary.cos.shape[-1]
    rotated = keys[..., :r]
    cos, sin = rotary.cos.unsqueeze(1), rotary.sin.unsqueeze(1)
    unrotated = rotated * cos - rotated[..., rotary.perm] * rotary.sign * sin
    return unrotated if r == keys.shape[-1] else torch.cat([unrotated, keys[..., r:]], dim=-1)


# --- step 1: normalise ------------------------------------------------------------------------


def normalise_keys(keys: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``k / max(||k||, eps)`` in float32. ``(..., N, d) -> (..., N, d)``; a zero key stays zero."""
    # One float32 copy, divided in place; ``copy=True`` so that float32 input keys are never modified.
    k_hat = keys.to(torch.float32, copy=True)
    return k_hat.div_(k_hat.norm(dim=-1, keepdim=True).clamp_min(eps))


# --- step 2: anchors --------------------------------------------------------------------------


def default_block_size(n: int) -> int:
    """The paper's block size ``b = clip(floor(N / 32), 128, 256)``."""
    return min(max(n // 32, 128), 256)


def block_count(n: int, block_size: int) -> int:
    """How many blocks cut N positions: blocks of ``block_size``, except that [open] a trailing block shorter
    than ``block_size // 2`` joins the block before it (so that no block anchor averages a handful of keys).

    ``max(1, (N + b - max(b // 2, 1)) // b)``: arithmetic, no branch on N, so that one compiled score
    serves every context length.
    """
    return max(1, (n + block_size - max(block_size // 2, 1)) // block_size)


def block_bounds(n: int, block_size: int) -> list[int]:
    """Edges ``[0, b, 2b, ..., N]`` of the :func:`block_count` contiguous blocks: block j is
    ``[bounds[j], bounds[j + 1])``; every block but the last has ``block_size`` positions."""
    return [*range(0, (block_count(n, block_size) - 1) * block_size + 1, block_size), n]


def block_size_for(n: int, config: NestedKVConfig) -> int:
    """The block size used on N positions: the configured one, or the paper's default.

    [open] A context shorter than one block (short prompts, the small windows that kvpress's
    ``DecodingPress`` and ``ChunkPress`` compress) is cut into two half blocks instead, so that the
    block anchor still differs from the global one.
    """
    size = config.block_size or default_block_size(n)
    return size if n >= size else max(1, n // 2)


def block_bounds_of(n: int, config: NestedKVConfig) -> list[int]:
    """:func:`block_bounds` of N positions with :func:`block_size_for`'s block size."""
    return block_bounds(n, block_size_for(n, config))


def centred_prefix(k_hat: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Prefix sums of ``k_hat - centre`` along positions. ``(..., N, d), (..., 1, d) -> (..., N + 1, d)``.

    ``prefix[..., i, :]`` sums the first i centred keys (row 0 is zero), so a span ``[s, e)`` sums to
    ``prefix[e] - prefix[s]``. Centring on the global mean makes the prefix a random walk instead of a
    sum that grows with N, so that float32 differences of prefix sums stay accurate on long contexts.
    """
    *lead, n, d = k_hat.shape
    prefix = k_hat.new_empty(*lead, n + 1, d)
    prefix[..., 0, :] = 0
    prefix[..., 1:, :].copy_(k_hat).sub_(centre)  # written in place: no padded copy
    if prefix.device.type == "cpu":
        return prefix.cumsum_(dim=-2)
    # CUDA scans an outer axis with one thread per column walking all N rows: 91 % of the score's time
    # at 32k positions on an H200 (measured, docs/benchmarks_cuda.md). Along the innermost axis it runs
    # a parallel scan, so the positions go last for the sum.
    return prefix.transpose(-1, -2).contiguous().cumsum_(dim=-1).transpose(-1, -2).contiguous()


def block_means(prefix: torch.Tensor, centre: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``k_hat`` over each of the :func:`block_count` blocks of ``block_size``.
    ``(..., N + 1, d), (..., 1, d) -> (..., n_blocks, d)``."""
    n = prefix.shape[-2] - 1
    count = block_count(n, block_size)
    # The edges of block_bounds, made on the device from N: no list of Python ints, so no copy from the host
    # and no compiled graph specialised to one N.
    bounds = torch.arange(0, (count + 1) * block_size, block_size, device=prefix.device)
    bounds[-1] = n  # the last block ends at N
    edges = prefix[..., bounds, :]  # (..., n_blocks + 1, d): a gather of a few rows
    lengths = bounds.diff().to(prefix.dtype).unsqueeze(-1)
    return (edges[..., 1:, :] - edges[..., :-1, :]) / lengths + centre


def window_means(prefix: torch.Tensor, centre: torch.Tensor, window: int) -> torch.Tensor:
    """Causal mean of ``k_hat`` over ``[max(0, i - W + 1), i]`` for every i. ``(..., N + 1, d) -> (..., N, d)``."""
    n = prefix.shape[-2] - 1
    w = min(window, n)
    sums = prefix[..., 1:, :].clone()  # prefix[i + 1]: the window of position i ends after i
    sums[..., w:, :].sub_(prefix[..., 1 : n + 1 - w, :])  # the first w windows start at 0, where the prefix is 0
    lengths = torch.arange(1, n + 1, dtype=prefix.dtype, device=prefix.device).clamp_max(window).unsqueeze(-1)
    return torch.addcdiv(centre, sums, lengths)  # centre + sums / lengths, in one pass


def anchors(k_hat: torch.Tensor, config: NestedKVConfig) -> dict[str, torch.Tensor]:
    """The anchors of the configured scales.

    global: ``(..., 1, d)`` mean over the whole context; block: ``(..., n_blocks, d)`` mean of each
    block of :func:`block_size_for`'s size (one row per block, not per position); window: ``(..., N, d)``
    causal mean over the last W positions. Block and window means share one prefix sum.
    """
    centre = k_hat.mean(dim=-2, keepdim=True)  # the global anchor, and the centre of the prefix sum
    result = {"global": centre} if "global" in config.scales else {}
    if "block" in config.scales or "window" in config.scales:
        prefix = centred_prefix(k_hat, centre)
        if "block" in config.scales:
            result["block"] = block_means(prefix, centre, block_size_for(k_hat.shape[-2], config))
        if "window" in config.scales:
            result["window"] = window_means(prefix, centre, config.window)
    return result


# --- step 3: per-scale anomaly and its normalisation ------------------------------------------


def cosine_anomaly(k_hat: torch.Tensor, anchor: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``-cos(k_hat_i, anchor_i)``. ``(..., N, d), (..., N or 1, d) -> (..., N)``; zero key gives 0."""
    return -(k_hat * anchor).sum(dim=-1) / anchor.norm(dim=-1).clamp_min(eps)


def block_cosine_anomaly(
    k_hat: torch.Tensor, block_anchor: torch.Tensor, block_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """:func:`cosine_anomaly` of each key against its block's anchor (:func:`block_means`' blocks of
    ``block_size``). ``(..., N, d), (..., n_blocks, d) -> (..., N)``.

    The blocks before the last all have ``block_size`` positions: a reshape of ``k_hat`` pairs them
    with their anchors (one norm per block, no per-position copy); the last block is done on its own.
    """
    before = block_anchor.shape[-2] - 1
    last = before * block_size
    full = k_hat[..., :last, :].unflatten(-2, (before, block_size))  # (..., n_blocks - 1, b, d)
    before_last = cosine_anomaly(full, block_anchor[..., :-1, None, :], eps).flatten(-2)
    return torch.cat([before_last, cosine_anomaly(k_hat[..., last:, :], block_anchor[..., -1:, :], eps)], dim=-1)


def scale_anomalies(k_hat: torch.Tensor, anchor: dict[str, torch.Tensor], config: NestedKVConfig) -> torch.Tensor:
    """Cosine anomaly of every key at each configured scale. ``(..., N, d) -> (..., S, N)``."""
    per_scale = [
        block_cosine_anomaly(k_hat, anchor[scale], block_size_for(k_hat.shape[-2], config), config.eps)
        if scale == "block"
        else cosine_anomaly(k_hat, anchor[scale], config.eps)
        for scale in config.scales
    ]
    return torch.stack(per_scale, dim=-2)


def minmax(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Min-max normalise along the last axis to [0, 1]. ``(..., N) -> (..., N)``.

    The range is taken over ``x[..., start:]`` (positions before ``start`` are clamped into
    [0, 1]); [open] a constant vector maps to all zeros.
    """
    low, high = torch.aminmax(x[..., start:], dim=-1, keepdim=True)  # one pass (one kernel on CUDA) for both
    span = high - low
    scaled = ((x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)).clamp_(0.0, 1.0)
    return torch.where(span > 0, scaled, 0.0)


def rank_normalise(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rank of each entry among ``x[..., start:]``, scaled to [0, 1]. ``(..., N) -> (..., N)``.

    Positions before ``start`` get 1 (they are protected sinks). Ties are broken by position.
    """
    stats = x[..., start:]
    n = stats.shape[-1]
    ranks = stats.argsort(dim=-1, stable=True).argsort(dim=-1).to(x.dtype) / max(n - 1, 1)
    head = torch.ones_like(x[..., :start])
    return torch.cat([head, ranks], dim=-1)


# --- step 4: head-adaptive mixing -------------------------------------------------------------


def discriminative_gap(a: torch.Tensor, fraction: float = 0.10, start: int = 0) -> torch.Tensor:
    """``mean(top fraction of a) - mean(bottom fraction of a)`` over ``a[..., start:]``. ``(..., N) -> (...)``.

    At least one entry is averaged on each side.
    """
    # Two partial top-k selections, unsorted, from a contiguous copy: measured faster on CPU than one full
    # sort serving both ends, and than sorted selections from the strided slice (about 2x).
    stats = a[..., start:].contiguous()
    k = max(1, int(fraction * stats.shape[-1]))
    top = stats.topk(k, dim=-1, sorted=False).values.mean(dim=-1)
    bottom = stats.topk(k, dim=-1, largest=False, sorted=False).values.mean(dim=-1)
    return top - bottom


def mixing_weights(gaps: torch.Tensor, prior: torch.Tensor, beta: float, mixing: str = "adaptive") -> torch.Tensor:
    """Weights of the scales. ``gaps (..., S), prior (S,) -> (..., S)`` summing to 1.

    adaptive: ``softmax(log w0 + beta * gap)``; fixed: ``w0`` renormalised; uniform: ``1 / S``.
    """
    prior = prior.to(gaps) / prior.sum()
    if mixing == "adaptive":
        return torch.softmax(prior.log() + beta * gaps, dim=-1)
    if mixing == "fixed":
        return prior.expand_as(gaps)
    check_choice("mixing", mixing, MIXINGS)
    return torch.full_like(gaps, 1.0 / gaps.shape[-1])


# --- step 5: surprise-gated routing -----------------------------------------------------------


def scale_std(a: torch.Tensor) -> torch.Tensor:
    """Population std across the S scales at each position. ``(..., S, N) -> (..., N)``.

    Two passes in float64, rounded to float32: the values of ``a.std(dim=-2, correction=0)`` (whose CPU
    kernel is a float64 Welford reduction; the tests check they agree bit for bit) at a tenth of its
    cost, which is a slow generic reduction over such a short, strided axis.
    """
    a = a.double()
    return (a - a.mean(dim=-2, keepdim=True)).square_().mean(dim=-2).sqrt_().float()


def surprise_gate(a: torch.Tensor, tau: float, kappa: float, start: int = 0) -> torch.Tensor:
    """Gate ``alpha(i) = sigmoid(kappa * (s_hat(i) - tau))``. ``a (..., S, N) -> (..., N)``.

    Surprise ``s(i)`` is the (population) std of the S normalised anomalies at i; ``s_hat`` is its
    within-head min-max normalisation minus its mean (both over positions ``start:``).
    """
    surprise = minmax(scale_std(a), start)
    centred = surprise - surprise[..., start:].mean(dim=-1, keepdim=True)
    return torch.sigmoid(kappa * (centred - tau))


# --- beyond the paper: a recency ramp, value norms, pooling over neighbours --------------------------------


def lean_towards(scores: torch.Tensor, prior: torch.Tensor, weight: float) -> torch.Tensor:
    """``(scores + weight * prior) / (1 + weight)``: scores and prior in [0, 1] give scores in [0, 1].
    ``(..., N)`` and a prior broadcastable to it ``-> (..., N)``; weight 0 returns the scores as they are."""
    return scores if weight == 0 else (scores + weight * prior) / (1 + weight)


def favour_recent(scores: torch.Tensor, recency: float, places: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lean_towards` a ramp from 0 at the first token to 1 at the last, with weight ``recency``.
    ``(..., N) -> (..., N)``.

    ``places`` (broadcastable to the scores, in [0, 1]) says where each scored key stands between the
    first token and the last; default ``i / (N - 1)``, the keys being every token. A stream that has
    evicted some gives ``position / (seen - 1)`` (:func:`nestedkv.streaming.held_scores`).
    """
    if recency == 0:
        return scores
    if places is None:
        # i / (N - 1) rounded once; torch.linspace's values depend on the CPU's vector width, and a compiled
        # linspace is tied to one N
        n = scores.shape[-1]
        places = torch.arange(n, dtype=scores.dtype, device=scores.device) / max(n - 1, 1)
    return lean_towards(scores, places, recency)


def favour_large_values(scores: torch.Tensor, value_norms: torch.Tensor, weight: float, start: int = 0) -> torch.Tensor:
    """:func:`lean_towards` the min-max normalised value norms (over ``value_norms[..., start:]``), with
    ``weight``. ``scores (..., N)``, ``value_norms (..., N) -> (..., N)``.

    What evicting position i costs an attention output is its weight times its value; the key score
    stands for the weight, the value norm for the rest (as value-aware token pruning weighs attention
    by ``||v||``).
    """
    return scores if weight == 0 else lean_towards(scores, minmax(value_norms, start), weight)


def pool_neighbours(
    scores: torch.Tensor, size: int, pool: str = "max", positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Max or mean of the scores in the window of ``size`` positions centred on each position (the
    window is cut at the ends). ``(..., N) -> (..., N)``; ``size`` odd, 1 leaves the scores as they are.

    A fact is a run of tokens, and a key-only score ranks its tokens unevenly; pooling lets the
    neighbours of a salient key share its rank, as SnapKV pools attention over a kernel of 5.

    ``positions`` (``(N,)``, increasing) are the scored keys' positions when they are not ``0..N-1``
    (a stream that has evicted some): the window then holds the scored keys within ``size // 2``
    positions of each, which are within ``size // 2`` places of it in the list; before any eviction
    this is the plain window.
    """
    if size == 1:
        return scores
    if positions is None:
        flat = scores.reshape(-1, 1, scores.shape[-1])
        if pool == "max":
            pooled = torch.nn.functional.max_pool1d(flat, size, stride=1, padding=size // 2)
        else:
            pooled = torch.nn.functional.avg_pool1d(flat, size, stride=1, padding=size // 2, count_include_pad=False)
        return pooled.reshape(scores.shape)
    half = size // 2
    total, count = scores.clone(), torch.ones_like(scores)
    for shift in range(1, min(half, scores.shape[-1] - 1) + 1):
        far = positions[shift:] - positions[:-shift] > half  # the pair (i, i + shift) shares no window
        for into, come_from in ((slice(shift, None), slice(None, -shift)), (slice(None, -shift), slice(shift, None))):
            if pool == "max":
                other = scores[..., come_from].masked_fill(far, -torch.inf)
                total[..., into] = torch.maximum(total[..., into], other)
            else:
                total[..., into] += scores[..., come_from].masked_fill(far, 0.0)
                count[..., into] += ~far
    return total if pool == "max" else total / count


# --- the whole score --------------------------------------------------------------------------


CPU_CHUNK_ELEMENTS = 2**18
"""Key elements (1 MiB in float32) taken at a time by the tensor path on CPU; see :func:`nestedkv_score`."""


def nestedkv_score(
    keys: torch.Tensor, config: NestedKVConfig | None = None, values: torch.Tensor | None = None,
    rotary: Rotary | None = None,
) -> torch.Tensor:
    """NestedKV score of every position. ``keys (..., N, d) -> scores (..., N)`` in float32.

    ``values`` (same shape as the keys) are read only when ``config.value_weight > 0``
    (:func:`favour_large_values`): the shipped default blends them in, the paper's score uses the keys alone.
    ``rotary``: the keys ``(B, H, N, d)`` are scored as they were before it (:func:`undo_rotary`).

    Real scores lie in [0, 1]; the first ``n_sink`` positions score :data:`PINNED`, the last
    ``n_recent`` in (1, 2] (:func:`pin_protected`). Higher is kept first.

    Steps 1 to 3 (the ``(N, d)`` work), the undoing of ``rotary`` included, run on CPU in one fused pass per
    head (:mod:`nestedkv.scoring_cpu`) where its kernel builds, outside ``torch.compile``; otherwise as the
    tensor functions below, a few heads at a time on CPU (about :data:`CPU_CHUNK_ELEMENTS` key elements, so
    that every step's temporaries stay in cache), all at once elsewhere and when compiled. Steps 3 to 6 then run
    on all heads at once.
    """
    config = config or NestedKVConfig()
    *lead, n, d = keys.shape
    check_context_length(n, config)
    heads = keys.reshape(-1, n, d)
    if config.value_weight == 0:
        value_norms = None
    elif values is None or values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"value_weight {config.value_weight} needs values of the keys' shape {tuple(keys.shape[:-1])}")
    else:
        value_norms = values.reshape(-1, n, values.shape[-1]).float().norm(dim=-1)
    # torch.compile traces the tensor functions instead: the kernel reads raw pointers, which a trace has not
    compiling = torch.compiler.is_compiling()
    if keys.device.type == "cpu" and not compiling and scoring_cpu.kernel() is not None:
        anomalies = scoring_cpu.raw_anomalies_cpu(heads, block_bounds_of(n, config), config.window, config.eps, rotary)
        if config.scales != scoring_cpu.KERNEL_SCALES:
            anomalies = anomalies[:, [scoring_cpu.KERNEL_SCALES.index(scale) for scale in config.scales]]
    else:
        if rotary is not None:
            heads = undo_rotary(keys, rotary).reshape(-1, n, d)
        # a compiled score takes all heads at once: chunks of a size computed from N would tie the graph to N
        chunked = keys.device.type == "cpu" and not compiling
        step = max(1, CPU_CHUNK_ELEMENTS // (n * d) if chunked else len(heads))
        anomalies = torch.cat([raw_anomalies(chunk, config) for chunk in heads.split(step)])
    return score_anomalies(anomalies, config, value_norms=value_norms).reshape(*lead, n)


@functools.cache
def compiled_nestedkv_score(backend: str | Callable = "inductor") -> Callable[..., torch.Tensor]:
    """:func:`nestedkv_score` under ``torch.compile``, built on first use: the tensor path fused into a few
    kernels, for a GPU, where the eager score is bound by launching its ~130 small operations per layer
    (``docs/benchmarks_cuda.md``). One graph with no break serves every shape (``dynamic=True``): the block
    edges and the recency ramp are computed from N on the device, not made from lists of Python ints, and all
    heads go at once, so a new context length does not recompile. What does: a context shorter than a block,
    settings that change which steps run, and on the CPU inductor's choice of a more precise accumulation for
    reductions past 4096 elements (a graph past about 4k positions, another past about 41k). Same arguments and
    result as :func:`nestedkv_score`, up to the rounding of reordered sums. On the CPU the C kernel path is
    faster (``docs/scoring_speed.md``). ``backend``: torch.compile's (the tests count graphs with a counting one)."""
    return torch.compile(nestedkv_score, backend=backend, dynamic=True, fullgraph=True)


def raw_anomalies(keys: torch.Tensor, config: NestedKVConfig) -> torch.Tensor:
    """Steps 1 to 3 of the score, before the normalisation: the cosine anomaly of every key at each configured
    scale. ``keys (H, N, d) -> (H, S, N)``."""
    k_hat = normalise_keys(keys, config.eps)  # step 1
    return scale_anomalies(k_hat, anchors(k_hat, config), config)  # steps 2 and 3


def score_anomalies(
    anomalies: torch.Tensor, config: NestedKVConfig, positions: torch.Tensor | None = None, seen: int | None = None,
    value_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 3 (normalisation) to 6 from the raw cosine anomalies. ``(H, S, N) -> scores (H, N)``.

    Shared by the one-shot score and the streaming one (:mod:`nestedkv.streaming`), which keeps its
    anchors across compressions and hands over the anomalies of the positions it still holds, with
    those ``positions`` (``(N,)``) among the ``seen`` tokens (give both): the recency ramp and the pooling
    follow them. ``value_norms (H, N)``: the values' norms, read when ``config.value_weight > 0``.
    """
    start = config.n_sink
    normalise = minmax if config.normalisation == "minmax" else rank_normalise
    a = normalise(anomalies, start)  # step 3: (H, S, N), all scales at once
    gaps = discriminative_gap(a, config.gap_fraction, start)  # step 4: (H, S)
    prior = torch.tensor([config.prior[SCALES.index(s)] for s in config.scales])
    weights = mixing_weights(gaps, prior, config.beta, config.mixing)
    blend = (weights.unsqueeze(-1) * a).sum(dim=-2)
    if config.gate == "off":  # step 5
        score = blend
    else:
        winner = a.amax(dim=-2)
        gate = torch.ones_like(blend) if config.gate == "max" else surprise_gate(a, config.tau, config.kappa, start)
        score = (1 - gate) * blend + gate * winner
    places = None if positions is None else positions.to(score.dtype) / max(seen - 1, 1)
    score = favour_recent(score, config.recency, places)  # beyond the paper: 0 = off
    score = favour_large_values(score, value_norms, config.value_weight, start)  # beyond the paper: 0 = off
    score = pool_neighbours(score, config.pool_size, config.pool, positions)  # beyond the paper: 1 = off
    return pin_protected(score, config.n_sink, config.n_recent)  # step 6


def pin_protected(scores: torch.Tensor, n_sink: int, n_recent: int) -> torch.Tensor:
    """Put the first ``n_sink`` and the last ``n_recent`` positions above every real score.
    ``(..., N) -> (..., N)``.

    Sinks score :data:`PINNED`; the recent positions score in (1, 2], the newest highest, so that a
    budget smaller than the protected window keeps the newest positions of it rather than a
    tie-broken few.
    """
    scores = scores.clone()
    if n_recent:
        window = min(n_recent, scores.shape[-1])
        steps = torch.arange(n_recent - window + 1, n_recent + 1, dtype=scores.dtype, device=scores.device)
        scores[..., -window:] = 1 + steps / n_recent
    scores[..., :n_sink] = PINNED
    return scores
