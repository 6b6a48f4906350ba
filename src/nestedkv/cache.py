"""What a compressed cache holds: kept positions per layer and head, and its bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (text models and multimodal wrappers)."""
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in decoder.layers]


@dataclass(frozen=True)
class CacheSummary:
    """What one cache (batch row 0) holds after compressing a context of ``context_length`` tokens.

    kept: ``[layer][kv_head]`` number of context positions that attention can still read.
    bytes_full: K+V bytes the uncompressed context takes; bytes_held: K+V bytes the cache holds.
    """

    context_length: int
    kept: list[list[int]]
    bytes_full: int
    bytes_held: int

    @property
    def kept_fraction(self) -> float:
        total = sum(map(sum, self.kept))
        return total / (self.context_length * sum(map(len, self.kept)))

    def format(self) -> str:
        lines = [f"context: {self.context_length} tokens; kept {self.kept_fraction:.1%} of (layer, head, position)"]
        for layer, heads in enumerate(self.kept):
            lines.append(f"  layer {layer:>2}: {sum(heads):>6} kept  per head {heads}")
        lines.append(
            f"KV bytes: {self.bytes_full / 2**20:.2f} MiB uncompressed -> {self.bytes_held / 2**20:.2f} MiB held "
            f"({self.bytes_held / self.bytes_full:.1%})"
        )
        return "\n".join(lines)


def summarize_cache(model: PreTrainedModel, cache: Cache, context_length: int) -> CacheSummary:
    """Summarise a cache right after a (possibly compressed) prefill of ``context_length`` tokens.

    Positions masked by a head-wise press (``module.masked_key_indices``) are counted as evicted,
    though their bytes are still held.
    """
    kept, bytes_full, bytes_held = [], 0, 0
    for module, layer in zip(attention_modules(model), cache.layers, strict=False):
        keys, values = layer.keys, layer.values
        _, heads, length, head_dim = keys.shape
        per_head = torch.full((heads,), length)
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:
            batch_idx, head_idx, _ = masked
            per_head -= torch.bincount(head_idx[batch_idx == 0], minlength=heads)
        kept.append(per_head.tolist())
        bytes_held += keys[:1].nbytes + values[:1].nbytes
        bytes_full += 2 * heads * context_length * head_dim * keys.element_size()
    return CacheSummary(context_length, kept, bytes_full, bytes_held)
