"""Each step of the NestedKV score against small hand-computed cases (spec: NESTEDKV_SPEC.md)."""

import math

import pytest
import torch
import torch.nn.functional as F
from kvpress import KeyDiffPress

from nestedkv.scoring import (
    PINNED,
    NestedKVConfig,
    anchors,
    block_bounds,
    cosine_anomaly,
    default_block_size,
    discriminative_gap,
    minmax,
    mixing_weights,
    nestedkv_score,
    normalise_keys,
    rank_normalise,
    span_means,
    surprise_gate,
    window_bounds,
)


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
        (256, 128, [(0, 128), (128, 256)]),  # exact blocks
        (300, 128, [(0, 128), (128, 300)]),  # 44-token tail (< 64) joins the last full block
        (200, 128, [(0, 128), (128, 200)]),  # 72-token tail (>= 64) is its own block
        (100, 128, [(0, 100)]),  # shorter than a block: one block
    ],
)
def test_block_bounds_including_the_trailing_block(n, size, expected):
    starts, ends = block_bounds(n, size)
    for i in range(n):
        block = next(b for b in expected if b[0] <= i < b[1])
        assert (starts[i].item(), ends[i].item()) == block


def test_window_bounds_are_causal_and_include_the_position():
    starts, ends = window_bounds(5, 3)
    assert starts.tolist() == [0, 0, 0, 1, 2]
    assert ends.tolist() == [1, 2, 3, 4, 5]


def test_span_means_match_a_direct_loop():
    torch.manual_seed(0)
    k_hat = normalise_keys(torch.randn(2, 3, 300, 8))
    for starts, ends in (block_bounds(300, 128), window_bounds(300, 64)):
        expected = torch.stack([k_hat[..., s:e, :].mean(dim=-2) for s, e in zip(starts, ends, strict=True)], dim=-2)
        torch.testing.assert_close(span_means(k_hat, starts, ends), expected, atol=1e-6, rtol=1e-5)


def test_anchors_on_a_hand_example():
    # 4 positions in 2-d, window 2, one block (size 4): anchors are plain averages.
    k_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    result = anchors(k_hat, NestedKVConfig(window=2, block_size=4))
    assert torch.allclose(result["global"], torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(result["block"], torch.tensor([[0.5, 0.5]] * 4))
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
    keys = torch.randn(1, 2, 600, 16, dtype=torch.bfloat16)
    config = NestedKVConfig(n_sink=4, n_recent=8)
    scores = nestedkv_score(keys, config)
    assert scores.shape == (1, 2, 600) and scores.dtype == torch.float32
    assert (scores[..., :4] == PINNED).all() and (scores[..., -8:] == PINNED).all()
    middle = scores[..., 4:-8]
    assert middle.min() >= 0 and middle.max() <= 1
    assert torch.equal(scores, nestedkv_score(keys, config))


def test_gate_off_is_the_blend_and_gate_max_is_the_winner():
    torch.manual_seed(2)
    keys = torch.randn(1, 1, 300, 8)
    uniform_off = nestedkv_score(keys, NestedKVConfig(gate="off", mixing="uniform", n_sink=0))
    always_max = nestedkv_score(keys, NestedKVConfig(gate="max", n_sink=0))
    k_hat = normalise_keys(keys)
    per_scale = torch.stack([minmax(cosine_anomaly(k_hat, a)) for a in anchors(k_hat, NestedKVConfig()).values()])
    torch.testing.assert_close(uniform_off, per_scale.mean(dim=0))
    torch.testing.assert_close(always_max, per_scale.amax(dim=0))


def test_global_scale_alone_ranks_as_keydiff():
    torch.manual_seed(3)
    keys = torch.randn(2, 3, 500, 32)
    ours = nestedkv_score(keys, NestedKVConfig(scales=("global",), n_sink=0))
    keydiff = KeyDiffPress().score(None, None, keys, None, None, {})
    assert torch.equal(ours.argsort(dim=-1), keydiff.argsort(dim=-1))


def test_zero_norm_keys_do_not_produce_nan():
    keys = torch.randn(1, 1, 300, 8)
    keys[..., 100:110, :] = 0
    assert torch.isfinite(nestedkv_score(keys)[..., 4:]).all()


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
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        NestedKVConfig(**options)


def test_context_shorter_than_sinks_or_a_block_is_refused():
    with pytest.raises(ValueError, match="not longer than the 4 sink tokens"):
        nestedkv_score(torch.randn(1, 1, 4, 8))
    with pytest.raises(ValueError, match="shorter than one block of 128 tokens"):
        nestedkv_score(torch.randn(1, 1, 100, 8))
    # without the block scale a short context is fine
    assert nestedkv_score(torch.randn(1, 1, 100, 8), NestedKVConfig(scales=("global", "window"))).shape == (1, 1, 100)


def test_scales_are_canonically_ordered():
    assert NestedKVConfig(scales=("window", "global")).scales == ("global", "window")
    assert NestedKVConfig(scales="block").scales == ("block",)


def test_cosine_anomaly_matches_torch_cosine():
    torch.manual_seed(4)
    k_hat = normalise_keys(torch.randn(50, 8))
    anchor = torch.randn(50, 8)
    assert torch.allclose(cosine_anomaly(k_hat, anchor), -F.cosine_similarity(k_hat, anchor, dim=-1), atol=1e-6)
