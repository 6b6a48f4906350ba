"""Attention over a :class:`~nestedkv.cache.storage.RaggedLayer`, hooked into transformers.

:func:`ragged_attention` reads, for each KV head of each batch row (a *stream*), only that
stream's packed context plus the dense tail, for all streams at once: the packed context is
gathered into a ``(streams, longest, head_dim)`` block whose missing entries are masked, and one
batched matrix product serves every head. It honours the attention mask transformers built for
the layer, whose columns are cache positions (the layer reports its logical length): the last
``T`` columns mask the tail (padding, causality), and, where the layer keeps its keys' positions
(sliding-window layers), the columns of those positions mask the context. Logits and softmax are
in float32 whatever the model's dtype, with the scale applied to the queries before the product,
so half precision cannot overflow.

It is reached through transformers' attention registry, wrapped once at import (like kvpress's
own patch): when the key tensor handed to attention is the tail of a ragged layer, attention is
computed from the ragged layer; any other call goes to the original function, with the attention
mask cut to the layer's key length when layers hold different numbers of positions.
"""

from __future__ import annotations

import kvpress  # noqa: F401  (kvpress patches attention at import; ours must wrap around it)
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nestedkv.cache.storage import RaggedLayer


def visible_columns(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor | None:
    """Which (row, query, cache column) attention may read, from any mask transformers hands to attention.

    ``(B, 1, q, K)`` boolean (sdpa) or additive float masks, ``(B, K)`` padding masks (flash
    attention) and ``None`` (nothing hidden beyond causality) are understood. ``-> bool (B, q, K)`` or ``None``.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"ragged storage cannot read a {type(attention_mask).__name__} attention mask; "
            "load the model with attn_implementation='sdpa' or use storage='masked'"
        )
    if attention_mask.dim() == 2:  # a padding mask over cache columns
        return attention_mask.bool()[:, None, :].expand(batch, q_len, -1)
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[:, 0].expand(batch, q_len, -1) if mask.shape[1] == 1 else mask.any(dim=1).expand(batch, q_len, -1)


def ragged_attention(
    query: torch.Tensor, layer: RaggedLayer, scaling: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of ``query (B, Hq, q, d)`` over each KV head's own positions. ``-> (B, q, Hq, d)``.

    Query heads are grouped onto KV heads as in grouped-query attention. Every query sees its
    head's kept context (unless ``attention_mask`` hides a kept key's column: sliding windows) and
    the tail, causally and as ``attention_mask`` allows (the tail's last ``q`` entries are the
    queries' own tokens). A query that can see nothing gets a zero output.
    """
    batch, query_heads, q_len, head_dim = query.shape
    heads, tail = layer.heads, layer.keys.shape[-2]
    group, streams = query_heads // heads, batch * heads
    device = query.device
    lengths = layer.offsets.diff()
    longest = int(lengths.max()) if streams else 0
    # (streams, longest) rows of the packed buffer, and which of them belong to the stream.
    slots = torch.arange(longest, device=device)
    present = slots < lengths[:, None]
    rows = (layer.offsets[:-1, None] + slots).clamp_max(max(layer.context_keys.shape[0] - 1, 0))
    q = (query.float() * scaling).reshape(streams, group * q_len, head_dim)
    tail_keys = layer.keys.reshape(streams, tail, head_dim).float()
    tail_values = layer.values.reshape(streams, tail, head_dim).float()
    logits = torch.cat(
        [q @ layer.context_keys[rows].float().transpose(1, 2), q @ tail_keys.transpose(1, 2)], dim=-1
    ).view(batch, heads, group, q_len, longest + tail)

    causal = torch.arange(tail, device=device) <= torch.arange(tail - q_len, tail, device=device)[:, None]
    context_visible = present.view(batch, heads, 1, 1, longest)
    tail_visible = causal.view(1, 1, 1, q_len, tail)
    visible = visible_columns(attention_mask, batch, q_len)
    if visible is not None:
        tail_visible = tail_visible & visible[..., -tail:].view(batch, 1, 1, q_len, tail)
        if layer.positions is not None:  # the mask's columns at the kept keys' own positions
            columns = layer.positions[rows].view(batch, heads * longest)
            seen = visible.gather(-1, columns[:, None, :].expand(-1, q_len, -1))
            context_visible = context_visible & seen.view(batch, q_len, heads, longest).permute(0, 2, 1, 3)[:, :, None]
    shape = (batch, heads, group, q_len)
    visible_all = torch.cat([context_visible.expand(*shape, longest), tail_visible.expand(*shape, tail)], dim=-1)
    weights = torch.softmax(logits.masked_fill(~visible_all, float("-inf")), dim=-1).nan_to_num(0.0)
    weights = weights.view(streams, group * q_len, longest + tail)
    values = torch.cat([layer.context_values[rows].float(), tail_values], dim=1)
    output = (weights @ values).view(batch, query_heads, q_len, head_dim)
    return output.to(query.dtype).transpose(1, 2).contiguous()


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
        if kwargs.get("sliding_window") is not None and layer.positions is None:
            raise ValueError("a sliding-window layer was compressed without its key positions; compress it again")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ragged_attention(query, layer, scale, attention_mask), None

    return wrapper


for _name, _attention in list(ALL_ATTENTION_FUNCTIONS.items()):
    ALL_ATTENTION_FUNCTIONS[_name] = _reads_ragged_layers(_attention)
