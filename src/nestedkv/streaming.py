"""A cache that stays within a budget while it grows: chunked prefill, compression while decoding, multi-turn.

:class:`BudgetedPress` keeps every layer of the cache near ``budget`` positions per KV head,
whatever the length of the prompt, the turns or the generation: after a forward pass of several
tokens (a prompt, a chunk of one, a new turn) the layer is brought back to the budget, and while
decoding it is brought back every ``interval`` tokens. Each compression re-scores what the layer
holds (the positions kept so far and the tokens added since) with NestedKV, chooses head-adaptive
budgets (AdaKV) capped at ``budget + head_slack`` positions per head, and repacks the survivors in a
:class:`~nestedkv.cache.RaggedLayer`, so evicted memory is freed. Between compressions a layer holds
at most ``budget + interval`` positions per head on average and ``budget + head_slack + interval``
in its longest head (:func:`prefill_in_chunks` adds at most one chunk to that while prefilling).

NestedKV's anchors in a stream. The score compares each key with three anchors; once keys are
evicted they must not be forgotten by the anchors, so each stream (one batch row's KV head) keeps,
in the ragged layer's ``per_stream`` memory, everything they need (``d`` = head dim), and counts the
tokens it has seen: a padded row's padding enters no anchor, and its tokens' positions count its own
tokens only, as ``generate`` places them:

* global: the sum of every normalised key seen, evicted or not (``(d,)``); the anchor is the sum
  divided by the tokens seen;
* block: the sum of every normalised key of each block of ``block_size`` positions (``(n_blocks, d)``);
  a closed block's mean never changes, the open one's follows its keys; a closed block none of whose
  keys is held any more is forgotten (no held key needs it), so this memory is bounded by the budget;
* window: each key's anomaly against the mean of the ``window`` keys ending at it is fixed once the
  key is seen (the window is causal), so it is computed then, from the last ``window - 1`` keys
  seen (``(window - 1, d)``), and kept beside the key in ``per_key``, with the key's position.

The anomalies of the held keys against these anchors then go through the paper's steps 3 to 6
(:func:`nestedkv.scoring.score_anomalies`: min-max over the held positions, head-adaptive mixing,
surprise gate, a recency ramp, if asked for, by each key's position among the tokens seen, a max
over the held keys within a few positions (:data:`~nestedkv.settings.STREAM_POOL`), pinned sinks and
recent positions). Before anything is evicted this is the one-shot
score of :func:`nestedkv.scoring.nestedkv_score` with the same block size. A compression of a layer
holding ``M`` positions per head and ``T`` new ones costs ``O((M + T) d)`` per head plus a
``(B, H * (M + T))`` top-k; the memory added is ``(n_blocks + window + 1) d`` floats per stream
(``n_blocks``: the blocks with a held key, plus the open one), and two numbers per kept key (three
where the mask needs each key's column: sliding windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import BasePress
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.cache.attention import (
    attention_went_through_registry,
    check_attention_through_registry,
    mask_can_hide_context,
)
from nestedkv.press import _LeavesModelAsFound, _no_cache, cache_layer, compressible, real_positions
from nestedkv.scoring import cosine_anomaly, normalise_keys, score_anomalies
from nestedkv.settings import BudgetedSettings, NestedKVConfig, check_context_length
from nestedkv.validation import check_number

STREAM_BLOCK_SIZE = 128
"""Block size when the config names none: the paper's ``clip(N // 32, 128, 256)`` needs the final
length N, which a stream does not know; 128 is its value up to 4k tokens."""


# --- the anchors' memory, as pure functions on one layer's streams ---------------------------------


def right_aligned(values: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stream's real entries moved, in order, to the end of its row, zeros before them.

    values ``(S, L, d)``, real bool ``(S, L)``. ``-> packed (S, L, d)`` and ``slots (S, L)``: where each
    entry went (meaningful at real entries only).
    """
    slots = values.shape[1] - real.sum(dim=1, keepdim=True) + real.cumsum(dim=1) - 1
    packed = torch.zeros_like(values)
    streams = torch.arange(len(values), device=values.device)[:, None].expand_as(real)
    packed[streams[real], slots[real]] = values[real]
    return packed, slots


def remember(
    memory: dict[str, torch.Tensor], k_hat: torch.Tensor, config: NestedKVConfig, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Add new normalised keys to the anchors' memory; return their window anomalies.

    memory: per stream ``seen (S,)``, the tokens seen so far; ``global_sum (S, d)``; ``block_sums
    (S, n_blocks, d)`` of the blocks numbered ``block_ids (S, n_blocks)`` (sorted, the same in every
    stream); ``recent_keys (S, W - 1, d)``, the last keys seen, at the end, zeros where a stream has
    seen fewer (an empty dict for new streams).
    k_hat: ``(S, T, d)`` the new keys; real: bool ``(S, T)``, which of them are tokens (``None``: all).
    Padding enters no anchor; a stream's tokens take its next positions ``seen, seen + 1, ...``.
    ``-> (S, T)`` the anomaly of each new token against the mean of the ``window`` keys ending at it
    (0 at padding).
    """
    streams, t, d = k_hat.shape
    block_size, window = config.block_size or STREAM_BLOCK_SIZE, config.window
    if not memory:
        memory.update(seen=torch.zeros(streams, dtype=torch.long, device=k_hat.device),
                      global_sum=k_hat.new_zeros(streams, d), block_sums=k_hat.new_zeros(streams, 0, d),
                      block_ids=torch.zeros(streams, 0, dtype=torch.long, device=k_hat.device),
                      recent_keys=k_hat.new_zeros(streams, window - 1, d))
    real = torch.ones(streams, t, dtype=torch.bool, device=k_hat.device) if real is None else real
    seen, counts = memory["seen"], real.sum(dim=1)
    stream_of = torch.arange(streams, device=k_hat.device)[:, None].expand(streams, t)[real]
    real_keys = k_hat[real]  # (tokens, d), stream after stream
    memory["global_sum"] = memory["global_sum"].index_add(0, stream_of, real_keys)

    block_of = ((seen[:, None] + real.cumsum(dim=1) - 1) // block_size)[real]
    known = memory["block_ids"][0]
    ids = torch.cat([known, block_of]).unique()  # sorted
    sums = k_hat.new_zeros(streams, len(ids), d)
    sums[:, torch.searchsorted(ids, known)] = memory["block_sums"]
    sums.view(-1, d).index_add_(0, stream_of * len(ids) + torch.searchsorted(ids, block_of), real_keys)
    memory["block_sums"], memory["block_ids"] = sums, ids.expand(streams, -1)

    # Each stream's last keys then its new tokens, packed at the end: the window of slot c is c - W + 1 .. c.
    recent_real = torch.arange(window - 1, device=k_hat.device) >= window - 1 - seen.clamp_max(window - 1)[:, None]
    packed, slots = right_aligned(torch.cat([memory["recent_keys"], k_hat], dim=1), torch.cat([recent_real, real], 1))
    held = seen.clamp_max(window - 1) + counts  # real slots at the end of each stream's packed row
    length = packed.shape[1]
    centre = (packed.sum(dim=1) / held.clamp_min(1)[:, None])[:, None]
    filled = (torch.arange(length, device=k_hat.device) >= length - held[:, None])[..., None]
    prefix = torch.nn.functional.pad(((packed - centre) * filled).cumsum(dim=1), (0, 0, 1, 0))
    ends = torch.arange(window, length + 1, device=k_hat.device)  # slots W - 1 .. L - 1, the new tokens' places
    in_window = (ends - (length - held[:, None])).clamp(1, window)  # real keys in each slot's window
    window_anchor = centre + (prefix[:, window:] - prefix[:, :t]) / in_window[..., None]
    anomalies = cosine_anomaly(packed[:, window - 1 :], window_anchor, config.eps)
    memory["recent_keys"], memory["seen"] = packed[:, t:], seen + counts
    new_slots = slots[:, window - 1 :] - (window - 1)
    return torch.where(real, anomalies.gather(1, new_slots.clamp_min(0)), 0.0)


def forget_blocks(memory: dict[str, torch.Tensor], held_positions: torch.Tensor, config: NestedKVConfig) -> None:
    """Drop the sums of closed blocks none of whose keys is held any more (no held key needs their anchor),
    so the memory stays bounded by what is held. held_positions: every position any stream holds."""
    block_size = config.block_size or STREAM_BLOCK_SIZE
    open_blocks = (memory["seen"] - 1) // block_size
    needed = torch.cat([held_positions.to(open_blocks.device) // block_size, open_blocks])
    keep = torch.isin(memory["block_ids"][0], needed)
    memory["block_ids"], memory["block_sums"] = memory["block_ids"][:, keep], memory["block_sums"][:, keep]


def stream_anomalies(
    k_hat: torch.Tensor, positions: torch.Tensor, window_anomaly: torch.Tensor, global_sum: torch.Tensor,
    block_sums: torch.Tensor, block_ids: torch.Tensor, seen: int, config: NestedKVConfig,
) -> torch.Tensor:
    """Raw anomalies of one stream's held keys against its remembered anchors. ``-> (S_scales, N)``.

    k_hat ``(N, d)``, positions ``(N,)``, window_anomaly ``(N,)``: the held keys, in position order;
    global_sum ``(d,)`` over all ``seen`` keys; block_sums ``(n_blocks, d)`` of the blocks ``block_ids``,
    which include every held key's block.
    """
    block_size = config.block_size or STREAM_BLOCK_SIZE
    per_scale = []
    for scale in config.scales:
        if scale == "global":
            per_scale.append(cosine_anomaly(k_hat, (global_sum / seen)[None], config.eps))
        elif scale == "block":
            block = positions // block_size
            counts = (seen - block * block_size).clamp_max(block_size).unsqueeze(-1)
            means = block_sums[torch.searchsorted(block_ids, block)] / counts
            per_scale.append(cosine_anomaly(k_hat, means, config.eps))
        else:
            per_scale.append(window_anomaly)
    return torch.stack(per_scale)


def held_scores(
    held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], memory: dict[str, torch.Tensor], config: NestedKVConfig
) -> torch.Tensor:
    """NestedKV scores of what each stream holds. held: per stream (keys ``(N_s, d)``, positions ``(N_s,)``,
    window anomalies ``(N_s,)``) in position order; ``-> (streams, max N_s)``, ``-inf`` past each stream's end."""
    scores = torch.full((len(held), max(len(keys) for keys, *_ in held)), -torch.inf, device=held[0][0].device)
    for s, ((keys, positions, window), seen) in enumerate(zip(held, memory["seen"].tolist(), strict=True)):
        if not len(keys):  # a row that has only had padding so far
            continue
        k_hat = normalise_keys(keys, config.eps)
        raw = stream_anomalies(k_hat, positions, window, memory["global_sum"][s], memory["block_sums"][s],
                               memory["block_ids"][s], seen, config)
        scores[s, : len(keys)] = score_anomalies(raw[None], config, positions, seen)[0]
    return scores


def compress_layer(
    layer: DynamicLayer, budgets: list[int], head_slack: int, alpha_safeguard: float, config: NestedKVConfig,
    keep_positions: bool = False, real: torch.Tensor | None = None,
) -> RaggedLayer:
    """Bring each batch row ``b`` of one layer back to ``budgets[b]`` positions per head on average (at
    most ``budgets[b] + head_slack`` in any head): score what it holds, keep the best, repack. A plain
    layer holds mask columns ``0..T-1``; a ragged layer made here holds its kept context plus the tail
    added since. real: bool ``(B, T)``, which tail entries are tokens rather than padding (``None``: all);
    padding is never kept, and a row's positions count its tokens only, as ``generate`` places a padded
    row's tokens. ``keep_positions``: record each kept key's mask column (sliding windows)."""
    tail_keys, tail_values = layer.keys, layer.values
    batch, heads, t, d = tail_keys.shape
    streams, device = batch * heads, tail_keys.device
    names = ["keys", "values", "position", "window_anomaly"] + (["column"] if keep_positions else [])
    if isinstance(layer, RaggedLayer):
        columns, memory, offsets = layer.context_length, dict(layer.per_stream), layer.offsets.tolist()
        held = {"keys": layer.context_keys, "values": layer.context_values, "column": layer.positions, **layer.per_key}
    else:
        columns, memory, offsets = 0, {}, [0] * (streams + 1)
        no_keys, no_positions = tail_keys.new_empty(0, d), torch.empty(0, dtype=torch.long, device=device)
        held = {"keys": no_keys, "values": no_keys, "position": no_positions, "column": no_positions,
                "window_anomaly": no_keys.new_empty(0)}
    check_context_length(columns + t, config)
    real = torch.ones(batch, t, dtype=torch.bool, device=device) if real is None else real.to(device)
    real = real.repeat_interleave(heads, dim=0)  # (streams, T)
    seen_before = memory["seen"] if memory else torch.zeros(streams, dtype=torch.long, device=device)
    new = {
        "keys": tail_keys.reshape(streams, t, d), "values": tail_values.reshape(streams, t, d),
        "position": seen_before[:, None] + real.cumsum(dim=1) - 1,
        "window_anomaly": remember(memory, normalise_keys(tail_keys, config.eps).reshape(streams, t, d), config, real),
        "column": torch.arange(columns, columns + t, device=device).expand(streams, t),
    }

    # Every stream's candidates: its kept context, then its new tokens, in position order.
    candidates = [{name: torch.cat([held[name][offsets[s] : offsets[s + 1]], new[name][s, real[s]]]) for name in names}
                  for s in range(streams)]
    scores = held_scores([(c["keys"], c["position"], c["window_anomaly"]) for c in candidates], memory, config)
    longest = scores.shape[-1]
    lengths = torch.tensor([len(c["keys"]) for c in candidates], device=scores.device)
    valid = (torch.arange(longest, device=scores.device) < lengths[:, None]).view(batch, heads, longest)
    scores = scores.view(batch, heads, longest)
    keep = torch.cat([
        head_adaptive_keep(scores[row : row + 1], min(budget, longest), alpha_safeguard,
                           max_per_head=budget + head_slack, valid=valid[row : row + 1])
        for row, budget in enumerate(budgets)
    ]).view(streams, longest)

    kept = {name: [c[name][keep[s, : len(c[name])]] for s, c in enumerate(candidates)] for name in names}
    offsets = RaggedLayer.offsets_of(torch.tensor([len(keys) for keys in kept["keys"]])).to(device)
    kept = {name: torch.cat(parts) for name, parts in kept.items()}
    forget_blocks(memory, kept["position"], config)
    return RaggedLayer(kept["keys"], kept["values"], offsets, batch, heads, columns + t, kept.get("column"),
                       per_key={"position": kept["position"], "window_anomaly": kept["window_anomaly"]},
                       per_stream=memory)


def held_per_row(layer: DynamicLayer) -> list[float]:
    """Positions one KV head of each batch row holds on average: kept context plus tail."""
    tail = layer.keys.shape[-2]
    if not isinstance(layer, RaggedLayer):
        return [float(tail)] * layer.keys.shape[0]
    return (layer.context_lengths.sum(dim=-1) / layer.heads + tail).tolist()


def held_per_head(layer: DynamicLayer) -> tuple[float, int]:
    """(average, most) positions one KV head of the layer holds: kept context plus tail."""
    tail = layer.keys.shape[-2]
    if not isinstance(layer, RaggedLayer):
        return float(tail), tail
    return int(layer.offsets[-1]) / len(layer.offsets[:-1]) + tail, layer.longest + tail


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes a cache holds: keys and values, and, in a ragged layer, what its scorer remembers."""
    return sum(getattr(layer, "nbytes", None) or layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def most_held(cache: DynamicCache) -> int:
    """The most positions any KV head of any layer of the cache holds."""
    return max((held_per_head(layer)[1] for layer in cache.layers), default=0)


# --- the press ----------------------------------------------------------------------------------------


@dataclass
class BudgetedPress(_LeavesModelAsFound, BudgetedSettings, BasePress):
    """Keep the cache within ``budget`` positions per KV head whatever comes: NestedKV in a stream.

    Settings (budget, interval, head slack, NestedKV's switches): :class:`~nestedkv.settings.BudgetedSettings`.
    Works as a context manager around ``model(...)``, ``model.generate`` or a chat loop, with the
    default dynamic cache, and over padded batches: a forward pass with padding among its tokens is
    compressed at once, padding dropped; each row is scored from its own tokens (its positions count
    them only) and kept within its own budget (a ratio of its own tokens). The layer's schedule is
    shared: when any row's heads hold more than its budget on average, every row is brought back to its own.
    """

    def forward_hook(self, module, input, kwargs, output):
        served = attention_went_through_registry(module)
        if _no_cache(kwargs):
            return output
        cache, hidden_states = kwargs["past_key_values"], kwargs["hidden_states"]
        layer = cache_layer(module, cache)
        if not compressible(layer, "ragged"):
            return output
        check_attention_through_registry(module, served)
        if isinstance(layer, RaggedLayer) and "global_sum" not in layer.per_stream:
            raise ValueError("this cache was compressed by another press and cannot be kept within a budget; "
                             "start from a new cache")
        # Padding is looked for among the new tokens only: a forward pass with padding is compressed at once,
        # so the tail before it holds none, and a sliding window hides old keys without their being padding.
        batch, new_tokens = hidden_states.shape[:2]
        mask, tail = kwargs.get("attention_mask"), layer.keys.shape[-2]
        new_real = real_positions(mask, batch, new_tokens) if isinstance(mask, torch.Tensor) else None
        real = None if new_real is None else torch.nn.functional.pad(new_real, (tail - new_tokens, 0), value=True)
        due = real is not None or new_tokens > 1 or tail >= self.interval
        if not due:
            return output
        if self.compression_ratio is None:
            budgets = [self.budget] * batch
        else:  # each row keeps a share of its own tokens
            tokens = torch.full((batch,), tail) if real is None else real.sum(dim=1).cpu()
            if isinstance(layer, RaggedLayer):  # and those compressed before
                tokens += layer.per_stream["seen"].view(batch, -1)[:, 0].cpu()
            budgets = [self.target(n) for n in tokens.tolist()]
        if real is not None or any(held > budget for held, budget in zip(held_per_row(layer), budgets, strict=True)):
            with torch.no_grad():  # eviction picks positions; nothing to differentiate
                cache.layers[module.layer_idx] = compress_layer(
                    layer, budgets, self.head_slack, self.alpha_safeguard, self.config,
                    keep_positions=mask_can_hide_context(module), real=real,
                )
        return output


def prefill_in_chunks(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache | None = None, chunk_size: int = 512,
    attention_mask: torch.Tensor | None = None,
) -> DynamicCache:
    """Feed ``input_ids (B, N)`` to the model ``chunk_size`` tokens at a time, into ``cache`` (a new
    one if ``None``); returns the cache. Under a :class:`BudgetedPress` each chunk is compressed back to
    the budget before the next one attends to it, so peak cache memory depends on budget + chunk, not
    on N. The positions continue from what the cache already holds (a new turn). To generate next,
    prefill all but the last token and pass all of them to ``generate(..., past_key_values=cache)``.

    attention_mask: for a padded batch, ``(B, past + N)`` as transformers takes it (1 at a token, 0 at
    padding) over the cache's ``past`` columns and the new ids; each row's positions then count its
    tokens only, as ``generate`` places them (pass the same mask, extended, to ``generate``).
    """
    check_number("chunk_size", chunk_size, low=1, integer=True)
    cache = DynamicCache() if cache is None else cache
    past, (batch, n) = cache.get_seq_length(), input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + n):
        raise ValueError(f"attention_mask must be (batch, cached + new tokens) = ({batch}, {past + n}), "
                         f"got {tuple(attention_mask.shape)}")
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            padded = {} if attention_mask is None else {"attention_mask": attention_mask[:, : past + end],
                                                        "position_ids": positions[:, past + start : past + end]}
            # logits_to_keep=1: a chunk's logits (chunk x vocabulary floats) would outweigh a small budget's cache
            model(input_ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1, **padded)
    return cache
