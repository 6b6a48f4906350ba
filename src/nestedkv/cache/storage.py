"""Cache storage for unequal per-head budgets: :class:`RaggedLayer`, the one owner of packed offsets.

A head-adaptive budget keeps a different number of context positions in every KV head. kvpress
holds such a cache at full size and hides evicted keys behind fake keys during decoding
(``masked`` storage: nothing is freed). :class:`RaggedLayer` really frees them: one layer's kept
context keys and values are packed stream after stream (a stream is one batch row's KV head) into
a single ``(L, head_dim)`` buffer with cumulative offsets, as in FlashAttention's varlen
interface, with no padding to the longest head; tokens that come later (the question, the answer,
a new turn) are appended to every head in an ordinary dense tail ``(batch, kv_heads, T, head_dim)``.
Keys keep the RoPE phases of their original positions, since the cache stores rotated keys.

The layer reports the conversation's *logical* length (context columns + tail), as an uncompressed
cache would: transformers uses it to slice new input ids, to place positions and to size attention
masks, whose columns then keep their meaning (column ``j`` is the token at cache position ``j``).
:mod:`nestedkv.cache.attention` reads the layer.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer


class RaggedLayer(DynamicLayer):
    """One layer's cache with a different number of kept context positions per (batch row, KV head).

    context_keys, context_values: ``(L, head_dim)``, the kept positions of stream ``s = b * H + h``
    at rows ``offsets[s]:offsets[s + 1]``, in their original order. positions: ``(L,)`` cache
    position (mask column) of each kept key, kept only where attention can hide context keys from
    later tokens (sliding windows); ``None`` otherwise. context_length: mask columns the compressed
    context spans (its length before compression, padding included). longest: the most positions
    any stream keeps, a Python int read when the offsets change, so that attention needs no host
    synchronisation while decoding. keys, values: the dense tail ``(B, H, T, head_dim)`` of tokens
    added after compression, as in ``DynamicLayer``. per_key, per_stream: what a streaming scorer
    remembers (:mod:`nestedkv.streaming`), tensors whose first axis runs over the kept keys ``(L, ...)``
    or over the streams ``(B * H, ...)``; batch operations move them with the keys.
    """

    def __init__(
        self, context_keys: torch.Tensor, context_values: torch.Tensor, offsets: torch.Tensor, batch: int, heads: int,
        context_length: int, positions: torch.Tensor | None = None, *,
        per_key: dict[str, torch.Tensor] | None = None, per_stream: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.context_keys, self.context_values = context_keys, context_values
        self._set_offsets(offsets)
        self.positions, self.context_length = positions, context_length
        self.per_key, self.per_stream = per_key or {}, per_stream or {}
        self.batch, self.heads = batch, heads
        self.dtype, self.device = context_keys.dtype, context_keys.device
        self.keys = context_keys.new_empty(batch, heads, 0, context_keys.shape[-1])
        self.values = context_values.new_empty(batch, heads, 0, context_values.shape[-1])
        self.tail_length = 0  # tokens appended since compression: what the tail must hold
        self.is_initialized = True

    @classmethod
    def from_keep(
        cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, *, keep_positions: bool = False,
        context_length: int | None = None,
    ) -> RaggedLayer:
        """Pack the kept positions. keys, values: ``(B, H, N, d)``; keep: bool ``(B, H, N)``.
        ``keep_positions``: record each kept key's position (for masks that can hide context keys).
        ``context_length``: the tokens the keys stand for, if not ``N`` (a cache a press has already
        shortened; then there are no positions to keep)."""
        batch, heads, n = keep.shape
        offsets = cls.offsets_of(keep.sum(dim=-1).flatten())
        positions = torch.arange(n, device=keep.device).expand(batch, heads, n)[keep] if keep_positions else None
        return cls(keys[keep], values[keep], offsets, batch, heads, n if context_length is None else context_length,
                   positions)

    @classmethod
    def stack(cls, layers: list[RaggedLayer]) -> RaggedLayer:
        """One layer whose batch rows are the rows of ``layers``, in order: compressions of one context
        (the same ``context_length`` and heads), nothing appended yet, no key positions or scorer memory."""
        first = layers[0]
        for layer in layers:
            if (layer.heads, layer.context_length) != (first.heads, first.context_length):
                raise ValueError("only layers of the same heads and context length can be stacked")
            if not layer.stackable:
                raise ValueError("only freshly compressed layers without key positions can be stacked")
        return cls(
            torch.cat([layer.context_keys for layer in layers]), torch.cat([layer.context_values for layer in layers]),
            cls.offsets_of(torch.cat([layer.offsets.diff() for layer in layers])), sum(layer.batch for layer in layers),
            first.heads, first.context_length,
        )

    @staticmethod
    def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
        """Cumulative offsets of streams of ``lengths (streams,)`` packed one after another. ``-> (streams + 1,)``."""
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0))

    @property
    def stackable(self) -> bool:
        """Whether :meth:`stack` takes this layer: nothing appended yet, no key positions, no scorer memory."""
        return not (self.tail_length or self.positions is not None or self.per_key or self.per_stream)

    def _set_offsets(self, offsets: torch.Tensor) -> None:
        self.offsets = offsets
        lengths = offsets.diff()
        self.longest = int(lengths.max()) if len(lengths) else 0
        # What the varlen kernel reads on every decoding step, made once per change of the offsets.
        self.offsets_int32, self.empty_streams = offsets.to(torch.int32), lengths == 0
        self._padded_layout: tuple[torch.Tensor, torch.Tensor] | None = None

    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each stream's kept keys sit when padded to the longest stream, made once per change of
        the offsets (the gathered attention reads it on every step). ``-> rows (streams * longest,)``,
        the buffer row of each slot (a missing slot points at a valid row); ``slot_bias`` float32
        ``(streams, 1, longest)``, 0 at a kept key and -inf at a missing slot (added to the logits)."""
        if self._padded_layout is None:
            slots = torch.arange(self.longest, device=self.offsets.device)
            missing = slots >= self.offsets.diff()[:, None]
            rows = (self.offsets[:-1, None] + slots).clamp_max(max(self.context_keys.shape[0] - 1, 0))
            slot_bias = torch.zeros(missing.shape, device=missing.device).masked_fill(missing, float("-inf"))
            self._padded_layout = rows.flatten(), slot_bias[:, None, :]
        return self._padded_layout

    @property
    def context_lengths(self) -> torch.Tensor:
        """Kept context positions per (batch row, head). ``-> (B, H)``."""
        return self.offsets.diff().view(self.batch, self.heads)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed context, its offsets (and positions), the dense tail, and what a streaming
        scorer remembers."""
        tensors = [self.context_keys, self.context_values, self.offsets, self.keys, self.values,
                   *self.per_key.values(), *self.per_stream.values()]
        if self.positions is not None:
            tensors.append(self.positions)
        # A streaming scorer's per-key positions may be the very tensor ``positions`` is: count it once.
        return sum(t.nbytes for t in {id(t): t for t in tensors}.values())

    def get_seq_length(self) -> int:
        """The logical length: context columns plus tail, what an uncompressed cache would hold."""
        if self.keys.shape[-2] != self.tail_length:
            # kvpress's DecodingPress (or any press that prunes a dense cache) rewrote the tail it can see
            # and would never see the packed context: the positions and budgets would silently drift.
            raise ValueError(
                "a press pruned the tail of a compressed (ragged) cache (kvpress's DecodingPress cannot follow a "
                "head-adaptive ragged prefill); use nestedkv.BudgetedPress to keep a cache within a budget while "
                "decoding, or budget='uniform' with DecodingPress"
            )
        return self.context_length + self.tail_length

    def update(self, key_states, value_states, cache_kwargs=None):
        self.get_seq_length()  # refuses a tail rewritten from outside before anything is added to it
        self.tail_length += key_states.shape[-2]
        keys, values = super().update(key_states, value_states, cache_kwargs)
        keys.ragged_layer = weakref.ref(self)  # tells the attention wrapper to read this layer
        return keys, values

    def crop(self, max_length: int) -> None:
        """Drop tail tokens beyond the logical ``max_length`` (negative: drop that many)."""
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        if max_length < self.context_length:
            raise ValueError(
                f"cannot crop a compressed cache to {max_length} tokens: its first {self.context_length} were "
                "compressed together (assisted or prompt-lookup decoding drafts tokens into the prefill); "
                "generate without assistant_model / prompt_lookup_num_tokens, or compress without them"
            )
        self.tail_length = min(self.tail_length, max_length - self.context_length)
        self.keys, self.values = self.keys[..., : self.tail_length, :], self.values[..., : self.tail_length, :]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Make batch row ``i`` a copy of row ``rows[i]``, context and tail alike. ``rows: (B',)``.

        Serves beam search (``reorder_cache``), several sequences per prompt
        (``batch_repeat_interleave``) and dropping finished rows (``batch_select_indices``, which may also
        pass a boolean ``(B,)`` mask of the rows that stay, as a dense layer takes it).
        """
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(-1)
        rows = rows.to(self.offsets.device)
        heads = torch.arange(self.heads, device=rows.device)
        streams = (rows[:, None] * self.heads + heads).flatten()
        lengths = self.offsets.diff()[streams]
        offsets = self.offsets_of(lengths)
        # Row j of the new buffer is row (old start of its stream) + (j - new start of its stream).
        shift = torch.repeat_interleave(self.offsets[streams] - offsets[:-1], lengths)
        index = torch.arange(int(offsets[-1]), device=rows.device) + shift
        self.context_keys, self.context_values = self.context_keys[index], self.context_values[index]
        if self.positions is not None:
            self.positions = self.positions[index]
        self.per_key = {name: tensor[index] for name, tensor in self.per_key.items()}
        self.per_stream = {name: tensor[streams] for name, tensor in self.per_stream.items()}
        self._set_offsets(offsets)
        self.batch = len(rows)
        tail_rows = rows.to(self.keys.device)
        self.keys, self.values = self.keys[tail_rows], self.values[tail_rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.as_tensor(indices, device=self.offsets.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch, device=self.offsets.device).repeat_interleave(repeats))

    def offload(self) -> None:
        super().offload()
        self.context_keys, self.context_values = self.context_keys.to("cpu"), self.context_values.to("cpu")

    def prefetch(self) -> None:
        super().prefetch()
        self.context_keys, self.context_values = self.context_keys.to(self.device), self.context_values.to(self.device)

    def reset(self) -> None:
        raise ValueError("a compressed (ragged) cache cannot be reset for reuse; start a new cache instead")
