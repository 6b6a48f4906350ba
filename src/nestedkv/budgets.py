"""Which positions each KV head keeps, given scores: pure tensor functions shared by every method.

A budget turns scores ``(batch, heads, N)`` into a boolean keep mask of the same shape. The
uniform budget keeps the same number of positions in every head; the head-adaptive budget
(AdaKV, arXiv 2407.11550, as the NestedKV paper uses it) keeps the same number per *layer* but
lets heads compete for it, with a per-head safeguard.
"""

from __future__ import annotations

import torch
from kvpress.utils import compute_n_kept

BUDGETS = ("head-adaptive", "uniform")

__all__ = ["BUDGETS", "compute_n_kept", "head_adaptive_keep", "keep_indices", "uniform_keep"]


def uniform_keep(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """Keep the ``n_kept`` best positions of every head. ``(B, H, N) -> bool (B, H, N)``."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(n_kept, dim=-1).indices, True)


def head_adaptive_keep(scores: torch.Tensor, n_kept: int, alpha_safeguard: float = 0.20) -> torch.Tensor:
    """Head-adaptive keep mask for one layer. ``(B, H, N) -> bool (B, H, N)``.

    Each head first keeps its own best ``floor(alpha_safeguard * n_kept)`` positions; the rest of
    the layer budget ``H * n_kept`` goes to the best remaining (head, position) pairs of the layer.
    Every batch row keeps exactly ``H * n_kept`` positions. Scores must be comparable across heads.
    """
    if not 0 <= alpha_safeguard <= 1:
        raise ValueError(f"alpha_safeguard must be in [0, 1], got {alpha_safeguard}")
    batch, heads, n = scores.shape
    n_safe = int(alpha_safeguard * n_kept)
    keep = uniform_keep(scores, n_safe)
    # Scores of -inf (some scorers use them) are lifted so that already-kept pairs sort last.
    remaining = scores.clamp_min(torch.finfo(scores.dtype).min).masked_fill(keep, -torch.inf)
    remaining = remaining.reshape(batch, heads * n)
    extra = remaining.topk(heads * (n_kept - n_safe), dim=-1).indices
    return keep.reshape(batch, heads * n).scatter_(-1, extra, True).reshape(batch, heads, n)


def keep_indices(keep: torch.Tensor) -> list[list[torch.Tensor]]:
    """Positions kept by each (batch row, head), in increasing order. ``bool (B, H, N) -> [B][H] (n_bh,)``."""
    return [[row.nonzero().squeeze(-1) for row in heads] for heads in keep]
