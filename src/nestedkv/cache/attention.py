"""Attention over a :class:`~nestedkv.cache.storage.RaggedLayer`, hooked into transformers.

:func:`ragged_attention` reads, for each KV head, only that head's packed positions plus the tail.
It is reached through transformers' attention registry, wrapped once at import (like kvpress's
own patch): when the key tensor handed to attention is the tail of a ragged layer, attention is
computed per head from the ragged layer; any other call goes to the original function, with the
attention mask cut to the layer's key length when layers hold different numbers of positions.
"""

from __future__ import annotations

import kvpress  # noqa: F401  (kvpress patches attention at import; ours must wrap around it)
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nestedkv.cache.storage import RaggedLayer


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
