"""Attention over a :class:`~nestedkv.cache.storage.RaggedLayer`, hooked into transformers.

:func:`ragged_attention` reads, for each KV head of each batch row (a *stream*), only that
stream's packed context plus the dense tail, for all streams at once:

* the packed context, on CUDA in half precision, goes to PyTorch's variable-length FlashAttention
  (``torch.nn.attention.varlen``): each stream is one sequence whose queries are its group of
  query heads, its keys the rows ``offsets[s]:offsets[s + 1]`` of the packed buffer, read in place,
  and the dense tail ``(B, H, T, head_dim)`` is attended apart; the two partial softmaxes are
  merged by their log-sum-exps, as split-KV attention kernels do;
* on the CPU in float32 or bfloat16, when the mask hides nothing of the tail beyond causality (decoding, a new
  turn's prefill), a small C kernel (:mod:`nestedkv.cache.cpu_kernel`) reads each stream's context and
  tail in place, split over threads by chunks of keys, one call for every stream of the layer;
* elsewhere (float16 on the CPU, padding among the new tokens, a layer that keeps key positions,
  inside ``torch.compile``, or where no C compiler works) the context is gathered into a
  ``(streams, longest, head_dim)`` block whose missing entries are masked (:func:`gathered_context`),
  the tail appended, and one batched product and one softmax serve every head (a chunk of many
  new tokens goes a block of tokens at a time, so that its logits stay under :data:`GATHERED_LOGITS`).

It honours the attention mask transformers built for the layer, whose columns are cache positions
(the layer reports its logical length): the last ``T`` columns mask the tail (padding, causality),
and, where the layer keeps its keys' positions (sliding-window layers), the columns of those
positions mask the context. Logits and softmax are in float32 whatever the model's dtype (float64 for
a float64 model; inside the kernel on CUDA), with the scale applied to the queries before the product,
so half precision cannot overflow.

It is reached through transformers' attention registry, wrapped once at import (like kvpress's
own patch): when the key tensor handed to attention is the tail of a ragged layer, attention is
computed from the ragged layer; any other call goes to the original function, with the attention
mask fitted to the layer's key length when layers hold different numbers of positions
(:func:`fit_mask_to_keys`).
"""

from __future__ import annotations

import weakref

import kvpress  # noqa: F401  (kvpress patches attention at import; ours must wrap around it)
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nestedkv.cache import cpu_kernel
from nestedkv.cache.storage import RaggedLayer

try:
    from torch.nn.attention.varlen import AuxRequest, varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

VARLEN_DTYPES = (torch.float16, torch.bfloat16)

CPU_KERNEL_TOKENS = 512
"""The most new tokens per row the CPU kernel takes (beyond, the gathered path, which bounds its logits).
With its register tiles one layer call of 128-1024 new tokens ran 1.4-2.7x faster than the gathered path
(``scripts/cpu_kernel_tokens.py``, docs/benchmarks.md); the bound stays because the kernel's scratch
grows with new tokens x kept keys."""

GATHERED_LOGITS = 2**22
"""Float32 logits (16 MiB) the gathered path forms at once; a longer chunk of queries goes in blocks."""


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


def _masked_logits(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """Logits of scaled ``q (S, R, d)`` (float32, or float64 for a float64 model) against ``keys (S, K, d)``,
    -inf where not ``visible`` (bool, broadcast to ``(S, R, K)``; ``None``: all visible). ``-> (S, R, K)``."""
    logits = q @ keys.to(q.dtype).transpose(1, 2)
    return logits if visible is None else logits.masked_fill(~visible, float("-inf"))


def _weights(logits: torch.Tensor, may_see_nothing: bool = True) -> torch.Tensor:
    """Softmax of ``logits (S, R, K)`` over keys; a row that sees nothing gets zero weights (only
    possible where ``may_see_nothing``: a query that sees its own token always sees something)."""
    weights = torch.softmax(logits, dim=-1)
    return weights.nan_to_num(0.0) if may_see_nothing else weights


def gathered_context(
    layer: RaggedLayer, tail_keys: torch.Tensor, tail_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each stream's packed context gathered into a block padded to the longest stream, followed by
    its tail: what one batched product per stream reads.

    ``tail_keys, tail_values (streams, T, d)``. ``-> keys, values (streams, longest + T, d)`` and
    ``bias`` float32 ``(streams, 1, longest + T)``: -inf at the padding slots, 0 elsewhere.
    """
    streams, tail, head_dim = tail_keys.shape
    rows, slot_bias = layer.padded_layout()
    keys = layer.context_keys.index_select(0, rows).view(streams, layer.longest, head_dim)
    values = layer.context_values.index_select(0, rows).view(streams, layer.longest, head_dim)
    bias = torch.nn.functional.pad(slot_bias, (0, tail))
    return torch.cat([keys, tail_keys], 1), torch.cat([values, tail_values], 1), bias


def context_visible_at_positions(
    layer: RaggedLayer, visible: torch.Tensor, rows_per_stream: int
) -> torch.Tensor:
    """Which kept keys of a layer that keeps their positions the mask lets each query read: the mask's
    columns at those positions. ``visible`` bool ``(B, q_len, K)``. ``-> (streams, rows_per_stream, longest)``."""
    batch, heads, longest = layer.batch, layer.heads, layer.longest
    q_len = visible.shape[1]
    rows, _ = layer.padded_layout()
    columns = layer.positions[rows].view(batch, heads * longest)
    seen = visible.gather(-1, columns[:, None, :].expand(-1, q_len, -1))  # (B, q_len, H * longest)
    seen = seen.view(batch, q_len, heads, longest).transpose(1, 2)[:, :, None]  # (B, H, 1, q_len, longest)
    group = rows_per_stream // q_len
    return seen.expand(-1, -1, group, -1, -1).reshape(batch * heads, rows_per_stream, longest)


def _varlen_context_attention(q: torch.Tensor, layer: RaggedLayer, scaling: float):
    """Attention over each stream's packed context by variable-length FlashAttention, reading the buffer in place.

    ``q (streams, R, d)`` unscaled, in the layer's half dtype; each stream is a sequence of ``R``
    queries (its query heads x new tokens) over its own kept keys. ``-> (float32 output, log-sum-exp)``.
    """
    streams, rows_per_stream, head_dim = q.shape
    cu_seq_q = torch.arange(0, (streams + 1) * rows_per_stream, rows_per_stream, device=q.device, dtype=torch.int32)
    output, lse = varlen_attn(
        q.reshape(streams * rows_per_stream, 1, head_dim),
        layer.context_keys[:, None, :], layer.context_values[:, None, :],
        cu_seq_q, layer.offsets_int32, rows_per_stream, max(layer.longest, 1),
        return_aux=AuxRequest(lse=True), scale=scaling,
    )
    lse = lse.reshape(streams, rows_per_stream).float()
    lse = lse.masked_fill(layer.empty_streams[:, None], float("-inf"))  # FlashAttention leaves these at +inf
    return output.view(streams, rows_per_stream, head_dim).float(), lse


def uses_varlen_kernel(query: torch.Tensor, layer: RaggedLayer) -> bool:
    """Whether :func:`ragged_attention` reads ``layer``'s context with variable-length FlashAttention:
    on CUDA, in float16/bfloat16, head dims FlashAttention takes, and no per-key mask (sliding windows)."""
    return (
        varlen_attn is not None and query.is_cuda and layer.context_keys.dtype in VARLEN_DTYPES
        and query.dtype == layer.context_keys.dtype and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
        and layer.positions is None
    )


def uses_cpu_kernel(query: torch.Tensor, layer: RaggedLayer) -> bool:
    """Whether :func:`ragged_attention` can read ``layer``'s context with the CPU kernel
    (:mod:`nestedkv.cache.cpu_kernel`), if the mask hides nothing of the tail beyond causality: on the CPU,
    in float32 or bfloat16, no per-key mask (sliding windows), nothing to differentiate, not inside
    ``torch.compile`` (which traces the gathered path into its graph), and a kernel this machine could build."""
    return (
        query.device.type == "cpu" and query.dtype == layer.context_keys.dtype in cpu_kernel.DTYPES
        and layer.positions is None and not (torch.is_grad_enabled() and query.requires_grad)
        and not torch.compiler.is_compiling() and cpu_kernel.kernel() is not None
    )


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
    rows_per_stream = group * q_len
    grouped = query.reshape(streams, rows_per_stream, head_dim)  # stream s = (b, h) holds query heads h*group...
    q = grouped.to(torch.promote_types(query.dtype, torch.float32)) * scaling  # float64 stays float64
    visible = visible_columns(attention_mask, batch, q_len)

    device = query.device
    tail_keys, tail_values = layer.keys.reshape(streams, tail, head_dim), layer.values.reshape(streams, tail, head_dim)
    # Which tail keys each new token may see by causality; nothing to build for one new token and no mask.
    causal = None
    if visible is not None or q_len > 1:
        causal = torch.arange(tail, device=device) <= torch.arange(tail - q_len, tail, device=device)[:, None]
    # The CPU kernel applies causality itself: it serves a mask that hides nothing of the tail beyond it
    # (the common case: no padding among the new tokens). A host sync, but only with a mask.
    use_cpu_kernel = q_len <= CPU_KERNEL_TOKENS and uses_cpu_kernel(query, layer) and (
        visible is None or bool((visible[..., -tail:] | ~causal).all())
    )
    tail_visible = None  # what the mask and causality hide of the tail, where the kernels need it spelled out
    if causal is not None and not use_cpu_kernel:
        tail_visible = causal.expand(batch, q_len, tail)
        if visible is not None:
            tail_visible = tail_visible & visible[..., -tail:]
        tail_visible = tail_visible[:, None, None].expand(batch, heads, group, q_len, tail)
        tail_visible = tail_visible.reshape(streams, rows_per_stream, tail)

    if use_cpu_kernel:
        output = cpu_kernel.ragged_attention_cpu(
            q, layer.context_keys, layer.context_values, layer.offsets, tail_keys, tail_values, q_len
        )
    elif uses_varlen_kernel(query, layer):
        context_out, context_lse = _varlen_context_attention(grouped, layer, scaling)
        tail_logits = _masked_logits(q, tail_keys, tail_visible)
        tail_lse = torch.logsumexp(tail_logits, dim=-1)
        tail_out = _weights(tail_logits) @ tail_values.to(q.dtype)
        # Merge the two partial softmaxes, each weighted by its share of the total exp-sum.
        top = torch.maximum(context_lse, tail_lse)
        top = top.masked_fill(top == float("-inf"), 0.0)
        context_weight, tail_weight = torch.exp(context_lse - top), torch.exp(tail_lse - top)
        output = (context_weight[..., None] * context_out + tail_weight[..., None] * tail_out) / (
            context_weight + tail_weight
        )[..., None]
        output = output.nan_to_num(0.0)
    else:  # one softmax over the gathered context followed by the tail
        keys, values, bias = gathered_context(layer, tail_keys, tail_values)
        keys, values = keys.to(q.dtype).transpose(1, 2), values.to(q.dtype)
        hidden = None  # which (stream, query row, key) the mask hides, beyond the padding slots
        if tail_visible is not None:
            context_visible = (
                context_visible_at_positions(layer, visible, rows_per_stream)
                if visible is not None and layer.positions is not None
                else tail_visible.new_ones(()).expand(streams, rows_per_stream, layer.longest)
            )
            hidden = ~torch.cat([context_visible, tail_visible], -1)

        def attend(q_rows: torch.Tensor, hidden_rows: torch.Tensor | None) -> torch.Tensor:
            """``(streams, R, d)`` outputs of ``R`` query rows, with what the mask hides from those rows."""
            logits = torch.baddbmm(bias.to(q.dtype), q_rows, keys)
            if hidden_rows is not None:
                logits = logits.masked_fill(hidden_rows, float("-inf"))
            return _weights(logits, may_see_nothing=visible is not None) @ values

        # A chunk of many new tokens goes a block of tokens at a time, so that its float32 logits stay
        # under GATHERED_LOGITS (a 512-token chunk of a 1B model would otherwise need 64 MiB per layer).
        block = max(1, GATHERED_LOGITS // (streams * group * keys.shape[-1]))
        if block >= q_len:  # decoding, and short chunks: every row at once
            output = attend(q, hidden)
        else:
            by_token = [None if tensor is None else tensor.view(streams, group, q_len, -1) for tensor in (q, hidden)]
            output = q.new_empty(streams, group, q_len, head_dim)
            for start in range(0, q_len, block):
                rows = (None if tensor is None else tensor[:, :, start : start + block].reshape(
                    streams, -1, tensor.shape[-1]) for tensor in by_token)
                output[:, :, start : start + block] = attend(*rows).view(streams, group, -1, head_dim)
    output = output.view(batch, query_heads, q_len, head_dim)
    return output.to(query.dtype).transpose(1, 2).contiguous()


def fit_mask_to_keys(attention_mask: torch.Tensor, keys: int, new_tokens: int) -> torch.Tensor:
    """A mask over ``K`` cache columns (``(B, 1, q, K)`` boolean or additive, or a ``(B, K)`` padding mask of
    ones) for a layer that holds ``keys`` positions instead of ``K``.

    transformers sizes the mask from layer 0's cache, but a press may keep a different number of context
    positions in other layers: fewer (PyramidKV) or more (KVCompose, by a rounding). The mask's last
    ``new_tokens`` columns are this forward's tokens; when every column before them is visible (one unpadded
    row, no sliding window), the layer's compressed context is fully visible too, so the mask loses columns at
    its start, or gains visible ones there. A mask that hides some of those columns (left padding in a batch,
    a sliding window) says nothing about which of this layer's kept keys it hid, and is refused (``ValueError``,
    one host read, on this path only). ``-> (..., keys)``.
    """
    visible = 0.0 if attention_mask.is_floating_point() else 1  # additive masks add 0; others keep on true / 1
    earlier = attention_mask[..., : max(attention_mask.shape[-1] - new_tokens, 0)]
    if not bool((earlier == visible).all()):
        raise ValueError(
            f"a layer holds {keys} positions but the attention mask covers {attention_mask.shape[-1]} and hides "
            "some of the context (left padding or a sliding window), which cannot be matched to its kept keys; "
            "compress one unpadded prompt at a time with this press, or use a NestedKV press (padding-aware)"
        )
    extra = keys - attention_mask.shape[-1]
    if extra <= 0:
        return attention_mask[..., attention_mask.shape[-1] - keys :]
    return torch.nn.functional.pad(attention_mask, (extra, 0), value=visible)


def mask_can_hide_context(module: torch.nn.Module) -> bool:
    """Whether an attention layer's mask can hide earlier tokens from later ones (a sliding window, Llama 4's
    attention chunks), so that a ragged layer must remember where each kept key was."""
    config = getattr(module, "config", None)
    return any(
        getattr(owner, name, None) is not None
        for owner in (module, config)
        for name in ("sliding_window", "attention_chunk_size")
    )


def check_reads_ragged_layers(keys: torch.Tensor, values: torch.Tensor) -> None:
    """Refuses, before a layer's cache becomes ragged, values narrower than keys (multi-head latent attention:
    the kernels take one head size). ``keys (B, H, N, d_k)``, ``values (B, H, N, d_v)``."""
    if keys.shape[-1] != values.shape[-1]:
        raise ValueError(
            f"ragged storage needs values as wide as keys, this model's are {values.shape[-1]} and "
            f"{keys.shape[-1]} wide (multi-head latent attention); use NestedKVPress(..., storage='masked')"
        )


_SERVED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
"""Attention modules whose last attention went through the registry (this module's wrapper)."""


def record_attention_through_registry(module: torch.nn.Module) -> None:
    """Note that ``module`` computed its attention through the registry (the wrapper does, and a benchmark's
    replay of a recorded prefill for the presses' hooks)."""
    if not torch.compiler.is_compiling():
        _SERVED.add(module)


def attention_went_through_registry(module: torch.nn.Module) -> bool:
    """Whether ``module`` computed its attention through transformers' attention registry since this was last
    asked (a press's hook asks after each forward, so each forward answers for itself). Inside ``torch.compile``
    nothing is recorded, and the answer is yes: the layers were checked when they were compressed."""
    if torch.compiler.is_compiling():
        return True
    served = module in _SERVED
    _SERVED.discard(module)
    return served


def check_attention_through_registry(module: torch.nn.Module, served: bool) -> None:
    """Refuses (one line) a layer whose attention did not go through transformers' attention registry
    (``served``, from :func:`attention_went_through_registry`): eager attention, or a model whose attention
    class calls SDPA itself (Nemotron, DiffLlama). A ragged layer is read, and kvpress's head-wise masks are
    applied, only there: elsewhere the compressed context would be dropped or the eviction ignored, silently."""
    if served:
        return
    implementation = module.config._attn_implementation
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(
            "head-adaptive budgets and ragged storage are read through transformers' attention registry, which "
            f"attn_implementation='{implementation}' bypasses; load the model with attn_implementation='sdpa'"
        )
    raise ValueError(
        f"{type(module).__name__} computes attention itself, outside transformers' attention registry, through "
        "which head-adaptive budgets and ragged storage are read; use NestedKVPress(..., budget='uniform')"
    )


def _reads_ragged_layers(attention, name: str):
    def wrapper(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if name == "flex_attention":  # kvpress's patch passes dropout where flex takes the scale: a TypeError
            raise ValueError("flex attention does not run under kvpress 0.5.5's attention patch; load the model "
                             "with attn_implementation='sdpa'")
        record_attention_through_registry(module)
        reference = getattr(key, "ragged_layer", None)
        layer = reference() if reference is not None else None
        if layer is None or layer.keys is not key:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.shape[-1] != key.shape[-2]:
                attention_mask = fit_mask_to_keys(attention_mask, key.shape[-2], query.shape[-2])
            return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if layer.positions is None and (kwargs.get("sliding_window") is not None or mask_can_hide_context(module)):
            raise ValueError("a layer whose mask can hide context (a sliding window, attention chunks) was compressed "
                             "without its key positions; compress it again")
        # sdpa ignores soft-capping and attention sinks (so does the uncompressed model under it); others apply them
        unread = [option for option in ("softcap", "s_aux") if kwargs.get(option) is not None]
        if unread and name != "sdpa":
            raise ValueError(f"ragged attention does not apply {' or '.join(unread)} ({name} attention would); "
                             "load the model with attn_implementation='sdpa', or use storage='masked'")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ragged_attention(query, layer, scale, attention_mask), None

    return wrapper


for _name, _attention in list(ALL_ATTENTION_FUNCTIONS.items()):
    ALL_ATTENTION_FUNCTIONS[_name] = _reads_ragged_layers(_attention, _name)
