"""Each step of the NestedKV score against small hand-computed cases (spec: NESTEDKV_SPEC.md)."""

import dataclasses
import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from kvpress import KeyDiffPress
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import DynamicCache

from nestedkv import scoring, scoring_cpu
from nestedkv.budgets import head_adaptive_keep
from nestedkv.scoring import (
    PINNED,
    Rotary,
    anchors,
    block_bounds,
    block_cosine_anomaly,
    block_count,
    block_means,
    centred_prefix,
    compiled_nestedkv_score,
    cosine_anomaly,
    default_block_size,
    discriminative_gap,
    favour_large_values,
    favour_recent,
    minmax,
    mixing_weights,
    nestedkv_score,
    normalise_keys,
    pool_neighbours,
    rank_normalise,
    raw_anomalies,
    scale_anomalies,
    scale_std,
    surprise_gate,
    undo_rotary,
    window_means,
)
from nestedkv.settings import PAPER_SETTINGS, SCALES, NestedKVConfig


@pytest.fixture(params=["fused kernel", "tensor functions"])
def scoring_path(request, monkeypatch) -> str:
    """Runs a test on both CPU paths of :func:`nestedkv_score`'s steps 1 to 3: the fused C kernel and the
    tensor functions (what every other device, and a CPU without a C compiler, runs)."""
    if request.param == "tensor functions":
        monkeypatch.setattr(scoring_cpu, "kernel", lambda: None)
    elif scoring_cpu.kernel() is None:
        pytest.skip("no C compiler builds the CPU scoring kernel here")
    return request.param


def test_normalise_keys_unit_norm_float32_and_zero_key_stays_zero():
    keys = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.bfloat16)
    k_hat = normalise_keys(keys)
    assert k_hat.dtype == torch.float32
    assert torch.equal(k_hat, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))


@pytest.mark.parametrize(("n", "size"), [(100, 128), (4096, 128), (6400, 200), (8192, 256), (32768, 256)])
def test_default_block_size_is_clipped_n_over_32(n, size):
    assert default_block_size(n) == size


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (256, 128, [0, 128, 256]),  # exact blocks
        (300, 128, [0, 128, 300]),  # 44-token tail (< 64) joins the last full block
        (200, 128, [0, 128, 200]),  # 72-token tail (>= 64) is its own block
        (100, 128, [0, 100]),  # shorter than a block: one block
        (5, 1, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_block_bounds_including_the_trailing_block(n, size, expected):
    assert block_bounds(n, size) == expected


def test_block_count_cuts_what_cutting_and_merging_the_trailing_block_cuts():
    """``block_count``'s arithmetic (what a compiled score needs: no branch on N) against the rule written out: blocks
    of ``b``, a trailing block shorter than ``b // 2`` merged into the one before."""
    for size in range(1, 70):
        for n in range(1, 300):
            bounds = [*range(0, n, size), n]
            if len(bounds) > 2 and n - bounds[-2] < size // 2:
                del bounds[-2]
            assert block_bounds(n, size) == bounds and block_count(n, size) == len(bounds) - 1


def test_centred_prefix_sums_spans():
    k_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    centre = k_hat.mean(dim=0, keepdim=True)
    prefix = centred_prefix(k_hat, centre)
    assert prefix.shape == (4, 2) and torch.equal(prefix[0], torch.zeros(2))
    assert torch.allclose(prefix[3] - prefix[1], (k_hat[1:] - centre).sum(dim=0))


@pytest.mark.parametrize("n", [300, 64, 20])  # two blocks and full windows; a window as long as N; shorter
def test_block_and_window_means_match_a_direct_loop(n):
    torch.manual_seed(0)
    k_hat = normalise_keys(torch.randn(2, 3, n, 8))
    centre = k_hat.mean(dim=-2, keepdim=True)
    prefix = centred_prefix(k_hat, centre)
    bounds = block_bounds(n, 128)
    expected = torch.stack([k_hat[..., s:e, :].mean(dim=-2) for s, e in pairwise(bounds)], dim=-2)
    torch.testing.assert_close(block_means(prefix, centre, 128), expected, atol=1e-6, rtol=1e-5)
    # causal window [max(0, i - W + 1), i], the position included
    expected = torch.stack([k_hat[..., max(0, i - 63) : i + 1, :].mean(dim=-2) for i in range(n)], dim=-2)
    torch.testing.assert_close(window_means(prefix, centre, 64), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("n", "size"), [(300, 128), (256, 128), (200, 128), (100, 128)])
def test_block_cosine_anomaly_uses_each_position_s_block(n, size):
    torch.manual_seed(5)
    k_hat = normalise_keys(torch.randn(2, n, 8))
    bounds = block_bounds(n, size)
    block_anchor = torch.randn(2, len(bounds) - 1, 8)
    lengths = [e - s for s, e in pairwise(bounds)]
    per_position = block_anchor.repeat_interleave(torch.tensor(lengths), dim=1)
    assert torch.equal(block_cosine_anomaly(k_hat, block_anchor, size), cosine_anomaly(k_hat, per_position))


def test_anchors_on_a_hand_example():
    # 4 positions in 2-d, window 2, one block (size 4): anchors are plain averages.
    k_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    result = anchors(k_hat, NestedKVConfig(window=2, block_size=4))
    assert torch.allclose(result["global"], torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(result["block"], torch.tensor([[0.5, 0.5]]))  # one row per block
    # window start: position 0 averages only itself
    assert torch.allclose(result["window"], torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))


def test_cosine_anomaly_is_minus_cosine_and_zero_for_a_zero_key():
    k_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    anchor = torch.tensor([[2.0, 0.0]])
    assert torch.allclose(cosine_anomaly(k_hat, anchor), torch.tensor([-1.0, 0.0, 1.0, 0.0]))


def test_minmax_hand_cases_constant_vector_and_excluded_sinks():
    assert torch.allclose(minmax(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(minmax(torch.full((5,), 0.3)), torch.zeros(5))
    # the sink (10.0) takes no part in the range and is clamped into [0, 1]
    assert torch.allclose(minmax(torch.tensor([10.0, 1.0, 2.0, 3.0]), start=1), torch.tensor([1.0, 0.0, 0.5, 1.0]))


def test_rank_normalise():
    ranks = rank_normalise(torch.tensor([5.0, 0.3, 0.1, 0.2]), start=1)
    assert torch.allclose(ranks, torch.tensor([1.0, 1.0, 0.0, 0.5]))


def test_discriminative_gap_averages_top_and_bottom_tenth():
    assert discriminative_gap(torch.arange(10.0) / 9).item() == pytest.approx(1.0)  # one each side
    values = torch.tensor([0.0, 0.2] + [0.5] * 16 + [0.8, 1.0])  # 20 values: two each side
    assert discriminative_gap(values).item() == pytest.approx(0.9 - 0.1)


def test_mixing_weights_modes():
    prior = torch.tensor([0.4, 0.4, 0.2])
    assert torch.allclose(mixing_weights(torch.zeros(3), prior, 3.0), prior)
    gaps = torch.tensor([1.0, 0.0, 0.5])
    logits = torch.tensor([math.log(0.4) + 3.0, math.log(0.4), math.log(0.2) + 1.5])
    assert torch.allclose(mixing_weights(gaps, prior, 3.0), torch.softmax(logits, dim=0))
    assert torch.allclose(mixing_weights(gaps, prior, 3.0, "fixed"), prior)
    assert torch.allclose(mixing_weights(gaps, prior, 3.0, "uniform"), torch.full((3,), 1 / 3))


def test_scale_std_is_torch_population_std():
    torch.manual_seed(6)
    a = torch.rand(2, 3, 3, 5000)
    assert torch.equal(scale_std(a), a.std(dim=-2, correction=0))
    assert torch.equal(scale_std(a[..., :1, :]), torch.zeros(2, 3, 5000))


def test_surprise_gate_hand_case():
    # two positions agree across scales (std 0), one disagrees most, one half as much
    a = torch.tensor([[0.0, 0.5, 1.0, 0.5], [0.0, 0.5, 0.0, 0.5], [0.0, 0.5, 0.0, 0.0]])
    std = a.std(dim=0, correction=0)
    s = std / std.max()
    expected = torch.sigmoid(10 * (s - s.mean() - 0.6))
    assert torch.allclose(surprise_gate(a, tau=0.6, kappa=10), expected)
    # a single scale never disagrees with itself: the gate is sigmoid(-kappa * tau) everywhere
    assert torch.allclose(surprise_gate(a[:1], 0.6, 10), torch.full((4,), torch.sigmoid(torch.tensor(-6.0)).item()))


def test_score_range_sinks_recent_dtype_and_determinism():
    torch.manual_seed(1)
    keys, values = torch.randn(2, 1, 2, 600, 16, dtype=torch.bfloat16)
    config = NestedKVConfig(n_sink=4, n_recent=8)
    scores = nestedkv_score(keys, config, values)
    assert scores.shape == (1, 2, 600) and scores.dtype == torch.float32
    assert (scores[..., :4] == PINNED).all()
    # the recent window: above every real score, the newest highest
    assert torch.equal(scores[..., -8:], (1 + torch.arange(1, 9) / 8).expand(1, 2, 8))
    middle = scores[..., 4:-8]
    assert middle.min() >= 0 and middle.max() <= 1
    assert torch.equal(scores, nestedkv_score(keys, config, values))


def test_a_recent_window_larger_than_the_budget_keeps_its_newest_positions():
    keys = torch.randn(1, 1, 40, 8)
    scores = nestedkv_score(keys, NestedKVConfig(n_sink=2, n_recent=30), values=keys)
    assert scores[0, 0].topk(12).indices.sort().values.tolist() == [0, 1, *range(30, 40)]
    # a window longer than the context protects every position after the sinks, newest first
    scores = nestedkv_score(keys, NestedKVConfig(n_sink=2, n_recent=100), values=keys)
    assert scores[0, 0].topk(5).indices.sort().values.tolist() == [0, 1, 37, 38, 39]


def test_recency_ramp_on_a_hand_example():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    torch.testing.assert_close(favour_recent(scores, 1.0), torch.tensor([0.25, 0.375, 0.5, 0.625, 0.75]))
    assert torch.equal(favour_recent(scores, 0.0), scores)


def test_value_norms_on_a_hand_example():
    scores = torch.tensor([9.0, 0.2, 0.4, 0.6])  # position 0 is a sink: out of the value norms' range
    norms = torch.tensor([100.0, 1.0, 3.0, 2.0])
    torch.testing.assert_close(favour_large_values(scores, norms, 1.0, start=1), torch.tensor([5.0, 0.1, 0.7, 0.55]))
    assert torch.equal(favour_large_values(scores, norms, 0.0, start=1), scores)


def test_value_weight_blends_value_norms_into_the_key_score(monkeypatch):
    torch.manual_seed(9)
    keys, values = torch.randn(2, 3, 300, 16), torch.randn(2, 3, 300, 16) * torch.rand(2, 3, 300, 1)
    config = NestedKVConfig(n_recent=8, value_weight=0.0)  # the key score
    monkeypatch.setattr(scoring, "CPU_CHUNK_ELEMENTS", 300 * 16 * 2)  # two heads a chunk: values follow their keys
    weighted = nestedkv_score(keys, dataclasses.replace(config, value_weight=0.5), values)
    expected = (nestedkv_score(keys, config) + 0.5 * minmax(values.norm(dim=-1), config.n_sink)) / 1.5
    torch.testing.assert_close(weighted[..., 4:-8], expected[..., 4:-8])
    assert torch.equal(weighted[..., :4], nestedkv_score(keys, config)[..., :4])  # sinks and recent stay pinned
    assert torch.equal(weighted[..., -8:], nestedkv_score(keys, config)[..., -8:])
    with pytest.raises(ValueError, match="value_weight 0.5 needs values of the keys' shape"):
        nestedkv_score(keys, dataclasses.replace(config, value_weight=0.5))


def test_heads_scored_a_few_at_a_time_give_the_same_scores(monkeypatch):
    torch.manual_seed(8)
    keys, values = torch.randn(2, 2, 3, 500, 16)
    fused = nestedkv_score(keys, values=values)
    monkeypatch.setattr(scoring_cpu, "kernel", lambda: None)  # the tensor functions, by chunks of heads on CPU
    at_once = nestedkv_score(keys, values=values)  # 48k key elements: one chunk
    monkeypatch.setattr(scoring, "CPU_CHUNK_ELEMENTS", 2 * 500 * 16)  # two heads per chunk: three chunks
    assert torch.equal(nestedkv_score(keys, values=values), at_once)
    assert torch.equal(nestedkv_score(keys[1, 2], values=values[1, 2]), at_once[1, 2])  # one head, (N, d)
    torch.testing.assert_close(fused, at_once, rtol=0, atol=1e-6)


@pytest.mark.skipif(scoring_cpu.kernel() is None, reason="no C compiler builds the CPU scoring kernel here")
@pytest.mark.parametrize(
    ("n", "d", "switches"),
    [
        (2, 8, {"n_sink": 0}),  # two half blocks of one key
        (100, 12, {"block_size": 30, "window": 7}),  # a merged trailing block; d not a multiple of any vector
        (130, 64, {"window": 5000}),  # a window longer than the context
        (1000, 64, {}),
        (4097, 64, PAPER_SETTINGS),
        (300, 128, {"scales": ("window", "global")}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_cpu_anomalies_equal_the_tensor_functions(n, d, switches, dtype):
    """The kernel's steps 1 to 3 against :func:`raw_anomalies`, zero keys included (their anomalies are 0)."""
    generator = torch.Generator().manual_seed(n)
    keys = (torch.randn(3, n, d, generator=generator) + torch.randn(d, generator=generator)).to(dtype)
    keys[1, n // 2 :] = 0  # a head whose later keys are all zero
    config = NestedKVConfig(**switches)
    fused = scoring_cpu.raw_anomalies_cpu(keys, scoring.block_bounds_of(n, config), config.window, config.eps)
    expected = raw_anomalies(keys, dataclasses.replace(config, scales=scoring_cpu.KERNEL_SCALES))
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)


def random_rotary(batch: int, n: int, r: int, interleaved: bool, generator: torch.Generator) -> Rotary:
    """RoPE angles of positions 0..N-1 at random frequencies, paired dimensions turning together, as halves or
    interleaved pairs."""
    frequencies = torch.rand(batch, 1, r // 2, generator=generator)
    theta = torch.arange(n).view(1, n, 1) * frequencies
    if interleaved:
        theta = theta.repeat_interleave(2, dim=-1)
        perm = torch.arange(r).view(-1, 2).flip(-1).reshape(-1)
        sign = torch.tensor([-1.0, 1.0]).repeat(r // 2)
    else:
        theta = torch.cat([theta, theta], dim=-1)
        perm = torch.arange(r).roll(r // 2)
        sign = torch.cat([-torch.ones(r // 2), torch.ones(r // 2)])
    return Rotary(theta.cos(), theta.sin(), perm, sign)


@pytest.mark.skipif(scoring_cpu.kernel() is None, reason="no C compiler builds the CPU scoring kernel here")
@pytest.mark.parametrize(
    ("batch", "angle_rows", "n", "d", "r", "interleaved"),
    [(1, 1, 1000, 64, 64, False), (2, 2, 300, 16, 8, True), (2, 1, 257, 12, 12, False), (3, 3, 130, 64, 32, True)],
)
def test_fused_cpu_anomalies_undo_the_rotation_as_the_tensor_functions(batch, angle_rows, n, d, r, interleaved):
    """Angles given to the kernel: its anomalies are those of the keys turned back by :func:`undo_rotary`, for
    every batch row's angles (one row shared by all, or one each) and a part of the dimensions rotated."""
    generator = torch.Generator().manual_seed(n)
    rotary = random_rotary(angle_rows, n, r, interleaved, generator)
    keys = torch.randn(batch, 3, n, d, generator=generator) + torch.randn(d, generator=generator)
    config = NestedKVConfig()
    fused = scoring_cpu.raw_anomalies_cpu(keys.reshape(-1, n, d), scoring.block_bounds_of(n, config), config.window,
                                          config.eps, rotary)
    unrotated = undo_rotary(keys, rotary)
    expected = raw_anomalies(unrotated.reshape(-1, n, d), dataclasses.replace(config, scales=scoring_cpu.KERNEL_SCALES))
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    assert (unrotated - keys).abs().max() > 1  # the rotation was undone, not skipped


def test_the_compiled_score_is_one_graph_for_every_context_length(monkeypatch):
    """:func:`compiled_nestedkv_score` traced once (``fullgraph``: a break fails) for contexts of 300, 1000 and 4097
    positions with values and RoPE angles, each score the tensor path's bit for bit (a counting backend that runs
    the traced graph eagerly); a context shorter than a block is a second graph."""
    counter = CompileCounterWithBackend("eager")
    compiled = compiled_nestedkv_score(counter)
    config = NestedKVConfig()
    for n in (300, 1000, 4097, 40):
        generator = torch.Generator().manual_seed(n)
        rotary = random_rotary(1, n, 64, False, generator)
        keys, values = torch.randn(2, 1, 3, n, 64, generator=generator)
        shipped = nestedkv_score(keys, config, values, rotary)  # the C kernel's path where it builds
        with monkeypatch.context() as patch:
            patch.setattr(scoring_cpu, "kernel", lambda: None)
            assert torch.equal(compiled(keys, config, values, rotary), nestedkv_score(keys, config, values, rotary))
        assert counter.frame_count == (1 if n >= config.block_size else 2)
        assert_same_kept_positions(compiled(keys, config, values, rotary), shipped, atol=1e-5)


def test_undo_rotary_inverts_the_rotation():
    """Rotate keys known before RoPE with the stated form, then turn them back."""
    generator = torch.Generator().manual_seed(4)
    for interleaved in (False, True):
        rotary = random_rotary(2, 50, 8, interleaved, generator)
        before = torch.randn(2, 3, 50, 12, generator=generator)
        part, rest = before[..., :8], before[..., 8:]
        cos, sin = rotary.cos.unsqueeze(1), rotary.sin.unsqueeze(1)
        rotated = torch.cat([part * cos + part[..., rotary.perm] * rotary.sign * sin, rest], dim=-1)
        torch.testing.assert_close(undo_rotary(rotated, rotary), before, rtol=0, atol=1e-5)


def test_the_score_of_rotated_keys_is_the_same_on_both_cpu_paths(scoring_path):
    generator = torch.Generator().manual_seed(5)
    rotary = random_rotary(1, 600, 16, False, generator)
    keys, values = torch.randn(2, 2, 2, 600, 16, generator=generator)
    scores = nestedkv_score(keys, values=values, rotary=rotary)
    expected = nestedkv_score(undo_rotary(keys, rotary), values=values)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_gate_off_is_the_blend_and_gate_max_is_the_winner():
    torch.manual_seed(2)
    keys = torch.randn(1, 1, 300, 8)
    uniform_off = nestedkv_score(keys, NestedKVConfig(**PAPER_SETTINGS, gate="off", mixing="uniform", n_sink=0))
    always_max = nestedkv_score(keys, NestedKVConfig(**PAPER_SETTINGS, gate="max", n_sink=0))
    k_hat = normalise_keys(keys)
    paper = NestedKVConfig(**PAPER_SETTINGS)
    per_scale = minmax(scale_anomalies(k_hat, anchors(k_hat, paper), paper))  # (1, 1, S, N)
    torch.testing.assert_close(uniform_off, per_scale.mean(dim=-2))
    torch.testing.assert_close(always_max, per_scale.amax(dim=-2))


def test_global_scale_alone_ranks_as_keydiff():
    torch.manual_seed(3)
    keys = torch.randn(2, 3, 500, 32)
    ours = nestedkv_score(keys, NestedKVConfig(**PAPER_SETTINGS, scales=("global",), n_sink=0))
    keydiff = KeyDiffPress().score(None, None, keys, None, None, {})
    assert torch.equal(ours.argsort(dim=-1), keydiff.argsort(dim=-1))


def test_zero_norm_keys_do_not_produce_nan():
    keys = torch.randn(1, 1, 300, 8)
    keys[..., 100:110, :] = 0
    assert torch.isfinite(nestedkv_score(keys, values=keys)[..., 4:]).all()  # zero values too


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scales": ("global", "weekly")}, "unknown scale 'weekly'"),
        ({"scales": ()}, "at least one"),
        ({"mixing": "learned"}, "unknown mixing 'learned'"),
        ({"gate": "hard"}, "unknown gate 'hard'"),
        ({"normalisation": "zscore"}, "unknown normalisation 'zscore'"),
        ({"n_sink": -1}, "n_sink must be >= 0"),
        ({"window": 0}, "window must be >= 1"),
        ({"pool_size": 4}, "pool_size must be odd"),
        ({"pool": "median"}, "unknown pool 'median'"),
        ({"scored_keys": "unrotated"}, "unknown scored_keys 'unrotated'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        NestedKVConfig(**options)


def test_context_shorter_than_sinks_is_refused_and_shorter_than_a_block_uses_two_half_blocks():
    with pytest.raises(ValueError, match="not longer than the 4 sink tokens"):
        nestedkv_score(torch.randn(1, 1, 4, 8))
    keys, paper = torch.randn(1, 1, 100, 8), NestedKVConfig(**PAPER_SETTINGS)  # the paper's block: 128 from N // 32
    half_blocks = NestedKVConfig(**{**PAPER_SETTINGS, "block_size": 50})
    assert torch.equal(nestedkv_score(keys, paper), nestedkv_score(keys, half_blocks))
    short = torch.randn(1, 2, 5, 8)
    assert torch.isfinite(nestedkv_score(short, values=short)[..., 4:]).all()
    # without the block scale a short context is fine
    keys_only = NestedKVConfig(scales=("global", "window"), value_weight=0.0)
    assert nestedkv_score(torch.randn(1, 1, 100, 8), keys_only).shape == (1, 1, 100)


def test_pooling_shares_a_score_with_the_neighbours_on_a_hand_example():
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.5, 0.0]])
    assert torch.equal(pool_neighbours(scores, 1), scores)
    assert torch.equal(pool_neighbours(scores, 3), torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 0.5]]))
    mean = torch.tensor([[1 / 2, 1 / 3, 1 / 3, 0.5 / 3, 0.5 / 3, 0.5 / 2]])
    torch.testing.assert_close(pool_neighbours(scores, 3, "mean"), mean)


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("size", [3, 5, 9])
def test_pooling_over_held_positions_takes_the_held_keys_within_reach_of_each(pool, size):
    torch.manual_seed(size)
    scores = torch.rand(2, 40)
    contiguous = pool_neighbours(scores, size, pool, torch.arange(40))
    torch.testing.assert_close(contiguous, pool_neighbours(scores, size, pool))
    positions = torch.randperm(100)[:40].sort().values  # a stream's held positions, with gaps
    half, reduce = size // 2, (lambda x: x.amax(-1)) if pool == "max" else (lambda x: x.mean(-1))
    expected = torch.stack([reduce(scores[:, (positions - p).abs() <= half]) for p in positions], dim=-1)
    torch.testing.assert_close(pool_neighbours(scores, size, pool, positions), expected)


def test_the_papers_settings_are_the_spec_s_and_the_shipped_default_differs_in_five():
    paper, shipped = NestedKVConfig(**PAPER_SETTINGS), NestedKVConfig()
    assert (paper.scales, paper.mixing, paper.gate, paper.normalisation) == (SCALES, "adaptive", "soft", "minmax")
    assert (paper.n_sink, paper.n_recent, paper.window, paper.block_size) == (4, 0, 64, None)
    assert (paper.prior, paper.beta, paper.tau, paper.kappa) == ((0.4, 0.4, 0.2), 3.0, 0.6, 10.0)
    assert paper.gap_fraction == 0.1
    assert (paper.recency, paper.pool_size, paper.value_weight) == (0.0, 1, 0.0)
    differ = {f.name for f in dataclasses.fields(NestedKVConfig) if getattr(paper, f.name) != getattr(shipped, f.name)}
    assert paper.scored_keys == "cached"
    assert differ == {"n_recent", "recency", "value_weight", "block_size", "scored_keys"}
    switches = (shipped.n_recent, shipped.recency, shipped.value_weight, shipped.block_size, shipped.scored_keys)
    assert switches == (64, 0.5, 0.25, 64, "pre-rope")


def test_scales_are_canonically_ordered():
    assert NestedKVConfig(scales=("window", "global")).scales == ("global", "window")
    assert NestedKVConfig(scales="block").scales == ("block",)


def test_cosine_anomaly_matches_torch_cosine():
    torch.manual_seed(4)
    k_hat = normalise_keys(torch.randn(50, 8))
    anchor = torch.randn(50, 8)
    assert torch.allclose(cosine_anomaly(k_hat, anchor), -F.cosine_similarity(k_hat, anchor, dim=-1), atol=1e-6)


# --- the whole score against a reference implementation ------------------------------------------


def reference_score(keys: torch.Tensor, config: NestedKVConfig, values: torch.Tensor | None = None) -> torch.Tensor:
    """The NestedKV score as first written (``nestedkv.scoring`` at commit c797a0c), kept as an oracle for rewrites,
    with the later switches (recency, value norms, pooling) written out as the settings' docstring states them.

    Straightforward and slow: per-position anchors gathered from one padded prefix sum per anchor.
    """
    n = keys.shape[-2]
    start = config.n_sink
    keys = keys.float()
    k_hat = keys / keys.norm(dim=-1, keepdim=True).clamp_min(config.eps)

    def span_means(starts, ends):
        centre = k_hat.mean(dim=-2, keepdim=True)
        prefix = F.pad((k_hat - centre).cumsum(dim=-2), (0, 0, 1, 0))
        return (prefix[..., ends, :] - prefix[..., starts, :]) / (ends - starts).unsqueeze(-1).float() + centre

    def minmax_(x):
        low = x[..., start:].amin(dim=-1, keepdim=True)
        span = x[..., start:].amax(dim=-1, keepdim=True) - low
        scaled = (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny)
        return torch.where(span > 0, scaled, torch.zeros_like(x)).clamp(0.0, 1.0)

    def rank_(x):
        ranks = x[..., start:].argsort(dim=-1, stable=True).argsort(dim=-1).float() / max(n - start - 1, 1)
        return torch.cat([torch.ones_like(x[..., :start]), ranks], dim=-1)

    positions = torch.arange(n)
    size = config.block_size or min(max(n // 32, 128), 256)
    block_id = positions // size
    if -(-n // size) > 1 and 0 < n % size < size // 2:
        block_id = block_id.clamp(max=-(-n // size) - 2)
    block_ends = torch.where(block_id == block_id[-1], n, torch.clamp(block_id * size + size, max=n))
    anchor = {
        "global": k_hat.mean(dim=-2, keepdim=True),
        "block": span_means(block_id * size, block_ends),
        "window": span_means((positions - config.window + 1).clamp_min(0), positions + 1),
    }
    normalise = minmax_ if config.normalisation == "minmax" else rank_
    a = torch.stack(
        [
            normalise(-(k_hat * anchor[s]).sum(dim=-1) / anchor[s].norm(dim=-1).clamp_min(config.eps))
            for s in config.scales
        ],
        dim=-2,
    )
    k = max(1, int(config.gap_fraction * (n - start)))
    stats = a[..., start:]
    gaps = stats.topk(k, dim=-1).values.mean(-1) - stats.topk(k, dim=-1, largest=False).values.mean(-1)
    prior = torch.tensor([config.prior[SCALES.index(s)] for s in config.scales])
    prior = prior / prior.sum()
    weights = {
        "adaptive": torch.softmax(prior.log() + config.beta * gaps, dim=-1),
        "fixed": prior.expand_as(gaps),
        "uniform": torch.full_like(gaps, 1.0 / gaps.shape[-1]),
    }[config.mixing]
    blend = (weights.unsqueeze(-1) * a).sum(dim=-2)
    score = blend
    if config.gate != "off":
        surprise = minmax_(a.std(dim=-2, correction=0))
        centred = surprise - surprise[..., start:].mean(dim=-1, keepdim=True)
        gate = torch.sigmoid(config.kappa * (centred - config.tau))
        gate = torch.ones_like(blend) if config.gate == "max" else gate
        score = (1 - gate) * blend + gate * a.amax(dim=-2)
    score = (score + config.recency * torch.arange(n) / max(n - 1, 1)) / (1 + config.recency)
    if config.value_weight:
        score = (score + config.value_weight * minmax_(values.float().norm(dim=-1))) / (1 + config.value_weight)
    if config.pool_size > 1:  # the window of each position, cut at the ends, one position at a time
        half = config.pool_size // 2
        reduce = (lambda x: x.amax(dim=-1)) if config.pool == "max" else (lambda x: x.mean(dim=-1))
        score = torch.stack([reduce(score[..., max(0, i - half) : i + half + 1]) for i in range(n)], dim=-1)
    score = score.clone()
    for age in range(min(config.n_recent, n)):  # age 0 is the newest position
        score[..., n - 1 - age] = 1 + (config.n_recent - age) / config.n_recent
    score[..., :start] = PINNED
    return score


SWITCHES = [
    {},
    {"scales": ("global",)},
    {"scales": ("block",)},
    {"scales": ("window",)},
    {"scales": ("global", "window"), "mixing": "fixed"},
    {"scales": ("block", "window"), "gate": "max"},
    {"mixing": "uniform", "gate": "off"},
    {"gate": "max"},
    {"normalisation": "rank"},
    {"normalisation": "rank", "gate": "off", "scales": ("global", "block")},
    {"n_recent": 32, "n_sink": 0},
    {"block_size": 100, "window": 17},
    {"window": 5000, "n_sink": 1},  # a window longer than the context
    {"prior": (0.2, 0.3, 0.5), "beta": 1.0, "tau": 0.3, "kappa": 4.0, "gap_fraction": 0.5},
    {"pool_size": 5},
    {"pool_size": 3, "pool": "mean", "n_recent": 16},
    {"recency": 0.5, "n_recent": 700},  # a recent window longer than the shortest context
    {"value_weight": 1.0, "n_recent": 0},
    PAPER_SETTINGS,  # the paper's method ({} above is the shipped default)
]


def assert_same_kept_positions(scores: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    """Same scores up to float32 rounding (``atol``), and the same positions kept by per-head top-k and by the
    layer budget."""
    torch.testing.assert_close(scores, expected, rtol=0, atol=atol)
    n = scores.shape[-1]
    for n_kept in (n // 20, n // 4, n // 2):
        top = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(top, expected.topk(n_kept, dim=-1).indices.sort(dim=-1).values)
        assert torch.equal(head_adaptive_keep(scores, n_kept), head_adaptive_keep(expected, n_kept))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [130, 1000, 4097])
def test_score_keeps_the_positions_of_the_reference_implementation(n, dtype, scoring_path):
    """Pins the kept positions of the shipped default (``{}``), of the paper's method and of every switch on
    fixed inputs to those of the reference."""
    keys, values = random_keys_and_values(n, dtype)
    for switches in SWITCHES:
        config = NestedKVConfig(**switches)
        assert_matches_reference(nestedkv_score(keys, config, values), reference_score(keys, config, values), config)


def assert_matches_reference(scores: torch.Tensor, expected: torch.Tensor, config: NestedKVConfig) -> None:
    """:func:`assert_same_kept_positions`. The fused kernel sums in double, another summation order than the
    reference's float32 prefix sums: its min-max scores agree to 1e-5 (the reference's own rounding, which
    min-max normalisation scales up) and keep the same positions; under rank normalisation near-ties become rank
    steps (:func:`assert_close_up_to_rank_steps`)."""
    if scoring_cpu.kernel() is None:
        assert_same_kept_positions(scores, expected)
    elif config.normalisation == "rank":
        assert_close_up_to_rank_steps(scores, expected, config)
    else:
        assert_same_kept_positions(scores, expected, atol=1e-5)


def random_keys_and_values(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``(1, 3, n, 64)`` sharing a direction, as real keys do, and values of varied norms, seeded by ``n``."""
    generator = torch.Generator().manual_seed(n)
    keys = torch.randn(1, 3, n, 64, generator=generator) + 0.5 * torch.randn(64, generator=generator)
    values = torch.randn(1, 3, n, 64, generator=generator) * torch.rand(1, 3, n, 1, generator=generator)
    return keys.to(dtype), values.to(dtype)


def assert_same_score_in_another_summation_order(score, n: int) -> None:
    """``score(keys, config, values)``, computed with its sums added in another order, against the reference on
    fixed inputs, for every switch (:func:`assert_close_up_to_rank_steps`)."""
    keys, values = random_keys_and_values(n, torch.bfloat16)
    for switches in SWITCHES:
        config = NestedKVConfig(**switches)
        assert_close_up_to_rank_steps(score(keys, config, values), reference_score(keys, config, values), config)


def assert_close_up_to_rank_steps(scores: torch.Tensor, expected: torch.Tensor, config: NestedKVConfig) -> None:
    """Scores agree to float32 rounding, except that rank normalisation turns a near-tie two summation orders
    break differently into a step of a rank (``1 / (n - 1)``) in a few scores; kept positions agree up to
    near-ties."""
    n = scores.shape[-1]
    if config.normalisation == "rank":
        torch.testing.assert_close(scores, expected, rtol=0, atol=1 / (n - 1))
        assert ((scores - expected).abs() > 1e-5).float().mean() <= 0.01
    else:
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    n_kept = n // 10
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n_kept, dim=-1).indices, True)
    want = torch.zeros_like(kept).scatter_(-1, expected.topk(n_kept, dim=-1).indices, True)
    assert (kept != want).sum() <= max(2, kept.numel() // 1000)


@pytest.mark.parametrize("n", [1000, 4097])
def test_prefix_sums_rounded_once_give_the_reference_score_up_to_rank_steps(n, monkeypatch):
    """The check the CUDA scan must pass, on the CPU: prefix sums computed in float64 and rounded once (the
    most accurate summation order) differ from the CPU's sequential float32 ones by rounding, which rank
    normalisation turns into a rank step where two statistics nearly tie (n = 1000: 2.3e-4, as on an H200)."""
    sequential = scoring.centred_prefix

    def rounded_once(k_hat: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        return sequential(k_hat.double(), centre.double()).float()

    monkeypatch.setattr(scoring, "centred_prefix", rounded_once)
    monkeypatch.setattr(scoring_cpu, "kernel", lambda: None)  # the tensor functions, whose prefix sum this is
    assert_same_score_in_another_summation_order(nestedkv_score, n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [130, 1000, 4097, 32768])
def test_cuda_score_equals_the_reference_up_to_summation_order(n):
    """On CUDA the prefix sum runs along another axis (a parallel scan: another summation order)."""
    def on_cuda(keys, config, values):
        return nestedkv_score(keys.cuda(), config, values.cuda()).cpu()

    assert_same_score_in_another_summation_order(on_cuda, n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_score_of_rotated_keys_equals_the_cpu_score():
    """On CUDA the rotation is undone by :func:`undo_rotary` before the tensor functions; on CPU inside the
    kernel: the same scores up to summation order, with every part of the rotation on the GPU."""
    keys, values = random_keys_and_values(4097, torch.bfloat16)
    rotary = random_rotary(1, 4097, 64, False, torch.Generator().manual_seed(6))
    on_gpu = Rotary(*(part.cuda() for part in (rotary.cos, rotary.sin, rotary.perm, rotary.sign)))
    config = NestedKVConfig()
    scores = nestedkv_score(keys.cuda(), config, values.cuda(), on_gpu).cpu()
    assert_close_up_to_rank_steps(scores, nestedkv_score(keys, config, values, rotary), config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_score_equals_the_cpu_score():
    """The compiled score on CUDA (Triton kernels) against the CPU score of the same rotated keys and values, at two
    lengths of one graph: the same scores up to summation order."""
    config = NestedKVConfig()
    for n in (4097, 6000):
        keys, values = random_keys_and_values(n, torch.bfloat16)
        rotary = random_rotary(1, n, 64, False, torch.Generator().manual_seed(n))
        on_gpu = Rotary(*(part.cuda() for part in (rotary.cos, rotary.sin, rotary.perm, rotary.sign)))
        scores = compiled_nestedkv_score()(keys.cuda(), config, values.cuda(), on_gpu).cpu()
        assert_close_up_to_rank_steps(scores, nestedkv_score(keys, config, values, rotary), config)


def test_score_keeps_the_positions_of_the_reference_implementation_on_real_keys(model, scoring_path):
    """Keys of every layer of the real model after a short prefill of random tokens."""
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(100, model.config.vocab_size, (1, 300), generator=generator)  # a merged trailing block
    with torch.no_grad():
        model.model(input_ids=input_ids, past_key_values=cache)
    for layer in cache.layers:
        for switches in ({}, {"normalisation": "rank", "n_recent": 16}):
            config = NestedKVConfig(**switches)
            assert_matches_reference(
                nestedkv_score(layer.keys, config, layer.values), reference_score(layer.keys, config, layer.values),
                config,
            )
