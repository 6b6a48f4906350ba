"""Budget invariants, by hand and as properties (hypothesis)."""

import itertools

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nestedkv.budgets import head_adaptive_keep, uniform_keep
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import NestedKVConfig, compute_n_kept, layer_compression_ratio, ramp_weight


def test_head_adaptive_hand_case():
    # 2 heads, 6 positions, keep 3 per head on average = 6 per layer, safeguard 1 per head
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    keep = head_adaptive_keep(scores, n_kept=3, alpha_safeguard=0.34)
    assert keep[0, 0].tolist() == [True] * 5 + [False]
    assert keep[0, 1].tolist() == [True] + [False] * 5  # only its safeguard


def test_uniform_keep_takes_the_best_of_each_head():
    scores = torch.tensor([[[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]]])
    assert uniform_keep(scores, 2).tolist() == [[[False, True, True], [True, False, True]]]


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 5),
    n=st.integers(8, 200),
    ratio=st.floats(0.0, 0.99),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_head_adaptive_invariants(batch, heads, n, ratio, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, heads, n, generator=generator)
    scores[..., :2] = float("inf")  # two pinned positions (sinks)
    n_kept = max(compute_n_kept(n, ratio), 2)
    keep = head_adaptive_keep(scores, n_kept, alpha)

    # the layer keeps exactly its budget
    assert (keep.sum(dim=(1, 2)) == heads * n_kept).all()
    # every head keeps at least its safeguard, and its own best positions
    n_safe = int(alpha * n_kept)
    assert (keep.sum(dim=-1) >= n_safe).all()
    own_best = uniform_keep(scores, n_safe)
    assert (keep | ~own_best).all()
    # pinned positions are always kept
    assert keep[..., :2].all()
    # every kept pair outranks every evicted pair that is not protected by a safeguard
    if n_kept < n:
        competing = ~own_best
        lowest_kept = scores.masked_fill(~(keep & competing), float("inf")).flatten(1).amin(dim=1)
        highest_evicted = scores.masked_fill(keep, -float("inf")).flatten(1).amax(dim=1)
        assert (lowest_kept >= highest_evicted).all()
    # deterministic
    assert torch.equal(keep, head_adaptive_keep(scores.clone(), n_kept, alpha))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(130, 600), ratio=st.floats(0.5, 0.97), seed=st.integers(0, 2**16))
def test_nestedkv_scores_through_the_budget_keep_sinks(n, ratio, seed):
    assume(compute_n_kept(n, ratio) >= 4)  # a budget below the 4 sinks is refused by the press (check_keeps_sinks)
    keys = torch.randn(1, 3, n, 16, generator=torch.Generator().manual_seed(seed))
    scores = nestedkv_score(keys, NestedKVConfig(scales=("global", "window"), value_weight=0.0))
    keep = head_adaptive_keep(scores, compute_n_kept(n, ratio), 0.2)
    assert keep[..., :4].all()
    assert keep.sum() == 3 * compute_n_kept(n, ratio)


@given(st.floats(0.5, 0.95), st.integers(2, 40), st.floats(-0.99, 0.99))
def test_layer_shares_average_to_the_ratio_and_slope_with_the_layer_budget(ratio, layers, layer_budget):
    shares = [1 - layer_compression_ratio(ratio, layer, layers, layer_budget) for layer in range(layers)]
    assert abs(sum(shares) / layers - (1 - ratio)) < 1e-9  # r >= 0.5 and |layer_budget| < 1: no layer is capped
    assert abs(shares[0] - (1 - ratio) * (1 + layer_budget)) < 1e-9
    assert abs(shares[-1] - (1 - ratio) * (1 - layer_budget)) < 1e-9
    steps = [b - a for a, b in itertools.pairwise(shares)]
    assert all(step <= 1e-12 for step in steps) if layer_budget >= 0 else all(step >= -1e-12 for step in steps)


def test_layer_shares_keep_no_compression_and_cap_at_the_whole_context():
    assert [layer_compression_ratio(0.0, layer, 4, 0.5) for layer in range(4)] == [0.0] * 4
    assert layer_compression_ratio(0.25, 0, 4, 0.5) == 0.0  # 0.75 * 1.5 > 1: the whole layer is kept
    assert layer_compression_ratio(0.9, 3, 7, 0.0) == 0.9


def test_the_ramp_tied_to_the_budget_grows_as_the_kept_share_shrinks():
    assert [ramp_weight(0.5, 0.1, r) for r in (0.0, 0.75)] == [0.5, 0.5]  # 0.1 / kept share below the floor
    assert [round(ramp_weight(0.5, 0.1, r), 12) for r in (0.875, 0.9, 0.95)] == [0.8, 1.0, 2.0]
    assert ramp_weight(0.5, 0.0, 0.95) == 0.5  # off: the fixed ramp
