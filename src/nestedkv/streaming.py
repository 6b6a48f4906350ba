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
in the ragged layer's ``per_stream`` memory, everything they need (``d`` = head dim):

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
(``n_blocks``: the blocks with a held key, plus the open one) and two numbers per kept key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import BasePress
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.press import _can_hide_context, _LeavesModelAsFound, _no_cache, compressible, real_positions
from nestedkv.scoring import cosine_anomaly, normalise_keys, score_anomalies, window_means
from nestedkv.settings import BudgetedSettings, NestedKVConfig, check_context_length
from nestedkv.validation import check_number

STREAM_BLOCK_SIZE = 128
"""Block size when the config names none: the paper's ``clip(N // 32, 128, 256)`` needs the final
length N, which a stream does not know; 128 is its value up to 4k tokens."""


# --- the anchors' memory, as pure functions on one layer's streams ---------------------------------


def remember(memory: dict[str, torch.Tensor], k_hat: torch.Tensor, seen: int, config: NestedKVConfig) -> torch.Tensor:
    """Add new normalised keys to the anchors' memory; return their window anomalies.

    memory: per stream ``global_sum (S, d)``, ``block_sums (S, n_blocks, d)`` of the blocks numbered
    ``block_ids (S, n_blocks)`` (sorted, the same in every stream), ``recent_keys (S, <= W - 1, d)``
    (an empty dict for new streams);
    k_hat: ``(S, T, d)`` the keys at positions ``seen .. seen + T - 1``.
    ``-> (S, T)`` the anomaly of each new key against the mean of the ``window`` keys ending at it.
    """
    streams, t, d = k_hat.shape
    block_size = config.block_size or STREAM_BLOCK_SIZE
    if not memory:
        memory.update(global_sum=k_hat.new_zeros(streams, d), block_sums=k_hat.new_zeros(streams, 0, d),
                      block_ids=torch.zeros(streams, 0, dtype=torch.long, device=k_hat.device),
                      recent_keys=k_hat.new_zeros(streams, 0, d))
    memory["global_sum"] = memory["global_sum"] + k_hat.sum(dim=1)
    block_of = torch.arange(seen, seen + t, device=k_hat.device) // block_size
    known = memory["block_ids"][0]
    ids = torch.cat([known, block_of]).unique()  # sorted
    sums = k_hat.new_zeros(streams, len(ids), d)
    sums[:, torch.searchsorted(ids, known)] = memory["block_sums"]
    memory["block_sums"] = sums.index_add_(1, torch.searchsorted(ids, block_of), k_hat)
    memory["block_ids"] = ids.expand(streams, -1)
    recent_and_new = torch.cat([memory["recent_keys"], k_hat], dim=1)
    memory["recent_keys"] = recent_and_new[:, -(config.window - 1) :] if config.window > 1 else recent_and_new[:, :0]
    centre = recent_and_new.mean(dim=1, keepdim=True)
    prefix = torch.nn.functional.pad((recent_and_new - centre).cumsum(dim=1), (0, 0, 1, 0))
    window_anchor = window_means(prefix, centre, config.window)[:, -t:]
    return cosine_anomaly(k_hat, window_anchor, config.eps)


def forget_blocks(
    memory: dict[str, torch.Tensor], held_positions: torch.Tensor, seen: int, config: NestedKVConfig
) -> None:
    """Drop the sums of closed blocks none of whose keys is held any more (no held key needs their anchor),
    so the memory stays bounded by what is held. held_positions: every position any stream holds."""
    block_size = config.block_size or STREAM_BLOCK_SIZE
    needed = torch.cat([held_positions // block_size, held_positions.new_tensor([(seen - 1) // block_size])])
    keep = torch.isin(memory["block_ids"][0], needed.to(memory["block_ids"].device))
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
    held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], memory: dict[str, torch.Tensor], seen: int,
    config: NestedKVConfig,
) -> torch.Tensor:
    """NestedKV scores of what each stream holds. held: per stream (keys ``(N_s, d)``, positions ``(N_s,)``,
    window anomalies ``(N_s,)``) in position order; ``-> (streams, max N_s)``, ``-inf`` past each stream's end."""
    scores = torch.full((len(held), max(len(keys) for keys, *_ in held)), -torch.inf, device=held[0][0].device)
    for s, (keys, positions, window) in enumerate(held):
        k_hat = normalise_keys(keys, config.eps)
        raw = stream_anomalies(k_hat, positions, window, memory["global_sum"][s], memory["block_sums"][s],
                              memory["block_ids"][s], seen, config)
        scores[s, : len(keys)] = score_anomalies(raw[None], config, positions, seen)[0]
    return scores


def compress_layer(
    layer: DynamicLayer, budget: int, max_per_head: int, alpha_safeguard: float, config: NestedKVConfig,
    keep_positions: bool = False,
) -> RaggedLayer:
    """Bring one layer back to ``budget`` positions per head on average (at most ``max_per_head`` in
    any head): score what it holds, keep the best, repack. A plain layer holds positions ``0..T-1``;
    a ragged layer made here holds its kept context plus the tail added since."""
    tail_keys, tail_values = layer.keys, layer.values
    batch, heads, t, d = tail_keys.shape
    streams = batch * heads
    if isinstance(layer, RaggedLayer):
        seen, memory = layer.context_length, dict(layer.per_stream)
        offsets, context = layer.offsets.tolist(), (layer.context_keys, layer.context_values)
        held_positions, held_window = layer.per_key["position"], layer.per_key["window_anomaly"]
    else:
        seen, memory, offsets = 0, {}, [0] * (streams + 1)
        context = (tail_keys.new_empty(0, d), tail_values.new_empty(0, d))
        held_positions, held_window = torch.empty(0, dtype=torch.long), tail_keys.new_empty(0, dtype=torch.float32)
    check_context_length(seen + t, config)
    new_k_hat = normalise_keys(tail_keys, config.eps).reshape(streams, t, d)
    new_window = remember(memory, new_k_hat, seen, config)
    new_positions = torch.arange(seen, seen + t, device=tail_keys.device)
    seen += t

    # Every stream's candidates: its kept context, then the tail, in position order.
    candidates = []
    for s in range(streams):
        start, end = offsets[s], offsets[s + 1]
        row, head = divmod(s, heads)
        candidates.append((
            torch.cat([context[0][start:end], tail_keys[row, head]]),
            torch.cat([context[1][start:end], tail_values[row, head]]),
            torch.cat([held_positions[start:end].to(new_positions.device), new_positions]),
            torch.cat([held_window[start:end].to(new_window.device), new_window[s]]),
        ))
    scores = held_scores([(keys, positions, window) for keys, _, positions, window in candidates], memory, seen, config)
    longest = scores.shape[-1]
    lengths = torch.tensor([len(keys) for keys, *_ in candidates], device=scores.device)
    valid = torch.arange(longest, device=scores.device) < lengths[:, None]
    keep = head_adaptive_keep(scores.view(batch, heads, longest), min(budget, longest), alpha_safeguard,
                              max_per_head=max_per_head, valid=valid.view(batch, heads, longest)).view(streams, -1)

    kept = [tuple(part[keep[s, : len(part)]] for part in candidate) for s, candidate in enumerate(candidates)]
    kept_lengths = torch.tensor([len(keys) for keys, *_ in kept])
    offsets = RaggedLayer.offsets_of(kept_lengths).to(tail_keys.device)
    keys, values, positions, window = (torch.cat(parts) for parts in zip(*kept, strict=True))
    forget_blocks(memory, positions, seen, config)
    return RaggedLayer(keys, values, offsets, batch, heads, seen, positions if keep_positions else None,
                       per_key={"position": positions, "window_anomaly": window}, per_stream=memory)


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
    default dynamic cache; a padded batch is refused (rows of different lengths: run them one by one).
    """

    def forward_hook(self, module, input, kwargs, output):
        if _no_cache(kwargs):
            return output
        cache, hidden_states = kwargs["past_key_values"], kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        # Padding is looked for among the new tokens only: earlier ones were checked when they came, and a
        # sliding window hides old keys from every new query without their being padding.
        batch, new_tokens = hidden_states.shape[:2]
        if isinstance(mask, torch.Tensor) and real_positions(mask, batch, new_tokens) is not None:
            raise ValueError("a budgeted cache cannot hold a padded batch (rows of different lengths); "
                             "run the rows one by one")
        layer = cache.layers[module.layer_idx]
        if not compressible(layer, "ragged"):
            return output
        if isinstance(layer, RaggedLayer) and "global_sum" not in layer.per_stream:
            raise ValueError("this cache was compressed by another press and cannot be kept within a budget; "
                             "start from a new cache")
        average, _ = held_per_head(layer)
        due = new_tokens > 1 or layer.keys.shape[-2] >= self.interval
        budget = self.target(layer.get_seq_length())
        if due and average > budget:
            with torch.no_grad():  # eviction picks positions; nothing to differentiate
                cache.layers[module.layer_idx] = compress_layer(
                    layer, budget, budget + self.head_slack, self.alpha_safeguard, self.config,
                    keep_positions=_can_hide_context(module),
                )
        return output


def prefill_in_chunks(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache | None = None, chunk_size: int = 512
) -> DynamicCache:
    """Feed ``input_ids (B, N)`` to the model ``chunk_size`` tokens at a time, into ``cache`` (a new
    one if ``None``); returns the cache. Under a :class:`BudgetedPress` each chunk is compressed back to
    the budget before the next one attends to it, so peak cache memory depends on budget + chunk, not
    on N. The positions continue from what the cache already holds (a new turn). To generate next,
    prefill all but the last token and pass all of them to ``generate(..., past_key_values=cache)``.
    """
    check_number("chunk_size", chunk_size, low=1, integer=True)
    cache = DynamicCache() if cache is None else cache
    with torch.no_grad():
        for start in range(0, input_ids.shape[1], chunk_size):
            # logits_to_keep=1: a chunk's logits (chunk x vocabulary floats) would outweigh a small budget's cache
            model(input_ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache
