"""What a cache holds after compression: kept positions per layer and KV head, bytes before and after."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

from nestedkv.cache.storage import RaggedLayer
from nestedkv.models import attention_modules


@dataclass(frozen=True)
class CacheSummary:
    """What one cache (batch row 0) holds after compressing a context of ``context_length`` tokens.

    kept: ``[layer][kv_head]`` number of context positions that attention can still read.
    bytes_full: K+V bytes the uncompressed context takes; bytes_held: bytes the cache really holds
    (ragged layers: packed K+V plus offsets).
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
    though their bytes are still held. Batch rows after the first are not counted.
    """
    kept, bytes_full, bytes_held = [], 0, 0
    for module, layer in zip(attention_modules(model), cache.layers, strict=False):
        if isinstance(layer, RaggedLayer):
            per_head = layer.context_lengths[0]
            heads, head_dim, itemsize = layer.heads, layer.context_keys.shape[-1], layer.context_keys.element_size()
            bytes_held += layer.nbytes // layer.batch
        else:
            _, heads, length, head_dim = layer.keys.shape
            itemsize = layer.keys.element_size()
            per_head = torch.full((heads,), length)
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None:
                batch_idx, head_idx, _ = masked
                per_head = per_head - torch.bincount(head_idx[batch_idx == 0].cpu(), minlength=heads)
            bytes_held += layer.keys[:1].nbytes + layer.values[:1].nbytes
        kept.append(per_head.tolist())
        bytes_full += 2 * heads * context_length * head_dim * itemsize
    return CacheSummary(context_length, kept, bytes_full, bytes_held)
