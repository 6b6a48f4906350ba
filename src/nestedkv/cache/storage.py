"""Cache storage for unequal per-head budgets: :class:`RaggedLayer`, the one owner of packed offsets.

A head-adaptive budget keeps a different number of context positions in every KV head. kvpress
holds such a cache at full size and hides evicted keys behind fake keys during decoding
(``masked`` storage: nothing is freed). :class:`RaggedLayer` really frees them: one layer's kept
context keys and values are packed head after head into a single ``(L, head_dim)`` buffer with
per-head offsets (cumulative lengths, as in FlashAttention's varlen interface), no padding to the
longest head; tokens that come later (the question, the answer) are appended to every head in an
ordinary dense tail ``(batch, kv_heads, T, head_dim)``. Keys keep the RoPE phases of their
original positions, since the cache stores rotated keys. :mod:`nestedkv.cache.attention` reads it.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer


class RaggedLayer(DynamicLayer):
    """One layer's cache with a different number of kept context positions per (batch row, KV head).

    context_keys, context_values: ``(L, head_dim)``, the kept positions of stream ``s = b * H + h``
    at rows ``offsets[s]:offsets[s + 1]`` in their original order. keys, values: the dense tail
    ``(B, H, T, head_dim)`` of tokens added after compression, as in ``DynamicLayer``;
    ``get_seq_length()`` counts the tail only (the context length differs per head: see
    :attr:`context_lengths`).
    """

    def __init__(self, context_keys: torch.Tensor, context_values: torch.Tensor, offsets: torch.Tensor,
                 batch: int, heads: int) -> None:
        super().__init__()
        self.context_keys, self.context_values, self.offsets = context_keys, context_values, offsets
        self.batch, self.heads = batch, heads
        self.dtype, self.device = context_keys.dtype, context_keys.device
        self.keys = context_keys.new_empty(batch, heads, 0, context_keys.shape[-1])
        self.values = context_values.new_empty(batch, heads, 0, context_values.shape[-1])
        self.is_initialized = True

    @classmethod
    def from_keep(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> RaggedLayer:
        """Pack the kept positions. keys, values: ``(B, H, N, d)``; keep: bool ``(B, H, N)``."""
        batch, heads = keep.shape[:2]
        lengths = keep.sum(dim=-1).flatten()
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        return cls(keys[keep], values[keep], offsets, batch, heads)

    @property
    def context_lengths(self) -> torch.Tensor:
        """Kept context positions per (batch row, head). ``-> (B, H)``."""
        return self.offsets.diff().view(self.batch, self.heads)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed context, its offsets, and the dense tail."""
        tensors = (self.context_keys, self.context_values, self.offsets, self.keys, self.values)
        return sum(t.nbytes for t in tensors)

    def update(self, key_states, value_states, cache_kwargs=None):
        keys, values = super().update(key_states, value_states, cache_kwargs)
        keys.ragged_layer = weakref.ref(self)  # tells the attention wrapper to read this layer
        return keys, values

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a ragged cache cannot be expanded for beam search or sampling several sequences")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a ragged cache cannot select batch rows")


