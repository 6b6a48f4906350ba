"""Which positions each KV head keeps, given scores: pure tensor functions shared by every method.

A budget turns scores ``(batch, heads, N)`` into a boolean keep mask of the same shape. The
uniform budget keeps the same number of positions in every head; the head-adaptive budget
(AdaKV, arXiv 2407.11550, as the NestedKV paper uses it) keeps the same number per *layer* but
lets heads compete for it, with a per-head safeguard. How many positions a budget keeps out of N:
:func:`nestedkv.settings.compute_n_kept`.
"""

from __future__ import annotations

import torch

from nestedkv.validation import check_number


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last axis, equal values in index order.
    ``(..., M) -> (..., k)``.

    ``topk`` may break ties differently for the same values at shifted indices; a stable sort does
    not, so a padded row keeps what it keeps alone even when scores tie (a protected recent window
    scores the same in every head).
    """
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def uniform_keep(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Keep the ``n_kept`` best positions of every head. ``(B, H, N) -> bool (B, H, N)``."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, top_indices(scores, n_kept), True)


def head_adaptive_keep(
    scores: torch.Tensor,
    n_kept: int,
    alpha_safeguard: float = 0.20,
    *,
    max_per_head: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-adaptive keep mask for one layer. ``(B, H, N) -> bool (B, H, N)``.

    Each head first keeps its own best ``floor(alpha_safeguard * n_kept)`` positions; the rest of
    the layer budget ``H * n_kept`` goes to the best remaining (head, position) pairs of the layer.
    Every batch row keeps exactly ``H * n_kept`` positions. Scores must be comparable across heads.

    ``max_per_head`` caps what one head may keep (a streaming cache bounds its longest head);
    ``valid`` (bool ``(B, H, N)``) marks real candidates when heads have different numbers of them
    (the rest is padding, never kept). A row with too few eligible candidates keeps them all.
    """
    check_number("alpha_safeguard", alpha_safeguard, low=0, high=1)
    batch, heads, n = scores.shape
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
    n_safe = min(int(alpha_safeguard * n_kept), n)
    keep = uniform_keep(scores, n_safe)
    # Scores of -inf (some scorers use them) are lifted so that already-kept pairs sort last.
    remaining = scores.clamp_min(torch.finfo(scores.dtype).min).masked_fill(keep, -torch.inf)
    if max_per_head is not None:
        remaining = remaining.masked_fill(~uniform_keep(scores, min(max_per_head, n)), -torch.inf)
    if valid is not None:
        remaining = remaining.masked_fill(~valid, -torch.inf)
    remaining = remaining.reshape(batch, heads * n)
    extra = top_indices(remaining, heads * (n_kept - n_safe))
    picked = torch.zeros_like(remaining, dtype=torch.bool).scatter_(-1, extra, remaining.gather(-1, extra) > -torch.inf)
    keep = keep | picked.reshape(batch, heads, n)
    return keep if valid is None else keep & valid
