"""Cache storage for unequal per-head budgets, the attention that reads it, and cache summaries.

A head-adaptive budget keeps a different number of context positions in every KV head. kvpress
holds such a cache at full size and hides evicted keys behind fake keys during decoding
(``masked`` storage: nothing is freed). :class:`RaggedLayer` really frees them: one layer's kept
context keys and values are packed head after head into a single ``(L, head_dim)`` buffer with
per-head offsets, no padding to the longest head; tokens that come later (the question, the
answer) are appended to every head in an ordinary dense tail ``(batch, kv_heads, T, head_dim)``.
Keys keep the RoPE phases of their original positions, since the cache stores rotated keys.

:func:`ragged_attention` reads, for each KV head, only that head's packed positions plus the tail.
It is reached through transformers' attention registry, wrapped once at import (like kvpress's
own patch): when the key tensor handed to attention is the tail of a ragged layer, attention is
computed per head from the ragged layer; any other call goes to the original function, with the
attention mask cut to the layer's key length when layers hold different numbers of positions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import kvpress  # noqa: F401  (kvpress patches attention at import; ours must wrap around it)
import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


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


def ragged_attention(query: torch.Tensor, layer: RaggedLayer, scaling: float) -> torch.Tensor:
    """Attention of ``query (B, Hq, q, d)`` over each KV head's own positions. ``-> (B, q, Hq, d)``.

    Query heads are grouped onto KV heads as in grouped-query attention. Every query sees all of
    its head's kept context and, causally, the tail (whose last ``q`` entries are the queries'
    own tokens). Logits are softmaxed in float32.
    """
    batch, query_heads, q_len, _ = query.shape
    group = query_heads // layer.heads
    tail = layer.keys.shape[-2]
    causal = torch.arange(tail, device=query.device) <= torch.arange(tail - q_len, tail, device=query.device)[:, None]
    output = torch.empty_like(query)
    for b in range(batch):
        for h in range(layer.heads):
            stream = b * layer.heads + h
            start, end = layer.offsets[stream].item(), layer.offsets[stream + 1].item()
            q = query[b, h * group : (h + 1) * group]  # (G, q, d)
            context_logits = q @ layer.context_keys[start:end].T
            tail_logits = (q @ layer.keys[b, h].T).masked_fill(~causal, float("-inf"))
            weights = torch.softmax(torch.cat([context_logits, tail_logits], dim=-1).float() * scaling, dim=-1)
            weights = weights.to(query.dtype)
            context_part = weights[..., : end - start] @ layer.context_values[start:end]
            output[b, h * group : (h + 1) * group] = context_part + weights[..., end - start :] @ layer.values[b, h]
    return output.transpose(1, 2).contiguous()


def _reads_ragged_layers(attention):
    def wrapper(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        reference = getattr(key, "ragged_layer", None)
        layer = reference() if reference is not None else None
        if layer is None or layer.keys is not key:
            if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
                # transformers sizes the mask from layer 0's cache; a press that keeps fewer positions in
                # deeper layers (PyramidKV) needs its last columns: the compressed context is fully visible
                # to the new tokens, whose causal part comes last.
                attention_mask = attention_mask[..., -key.shape[-2] :]
            return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ragged_attention(query, layer, scale), None

    return wrapper


for _name, _attention in list(ALL_ATTENTION_FUNCTIONS.items()):
    ALL_ATTENTION_FUNCTIONS[_name] = _reads_ragged_layers(_attention)


# --- what a cache holds -----------------------------------------------------------------------


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (text models and multimodal wrappers)."""
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in decoder.layers]


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
                per_head = per_head - torch.bincount(head_idx[batch_idx == 0], minlength=heads)
            bytes_held += layer.keys[:1].nbytes + layer.values[:1].nbytes
        kept.append(per_head.tolist())
        bytes_full += 2 * heads * context_length * head_dim * itemsize
    return CacheSummary(context_length, kept, bytes_full, bytes_held)
