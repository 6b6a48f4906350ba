"""kvpress presses: glue between a model's prefill and the pure ``scoring`` and ``budgets`` modules.

``NestedKVPress`` is the method of the paper as a kvpress ``ScorerPress``: it only scores.
``HeadAdaptivePress`` turns the scores of any kvpress scorer (NestedKV's included) into
head-adaptive budgets and chooses how they are held. Both work as kvpress presses: as a context
manager around a forward pass or ``model.generate``, or with kvpress's
``kv-press-text-generation`` pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress import BasePress, ScorerPress
from kvpress.presses.base_press import is_prefilling

from nestedkv.budgets import BUDGETS, compute_n_kept, head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.scoring import NestedKVConfig, nestedkv_score
from nestedkv.validation import check_choice, check_number, check_ratio

STORAGES = ("ragged", "masked")
"""How unequal per-head budgets are held. ``ragged``: each head's kept positions are packed into
one buffer per layer (:class:`~nestedkv.cache.RaggedLayer`), so evicted memory is freed.
``masked``: kvpress's mechanism, every key is kept and evicted ones are hidden from attention by
fake keys during decoding (nothing is freed)."""


@dataclass
class HeadAdaptivePress(BasePress):
    """Head-adaptive budgets (AdaKV, arXiv 2407.11550) for any kvpress ``ScorerPress``.

    Like kvpress's ``AdaKVPress`` with a choice of storage: ``ragged`` frees what is evicted,
    ``masked`` is kvpress's own mechanism. Scores of the wrapped press must be comparable across
    heads. ``masked`` storage goes through kvpress's ``compress`` protocol (keys and values come
    back whole, ``module.masked_key_indices`` names the evicted triples); ``ragged`` storage
    replaces the layer of the cache in the forward hook, since it changes the cache's layout.
    """

    press: ScorerPress
    alpha_safeguard: float = 0.20
    storage: str = "ragged"

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise TypeError(f"HeadAdaptivePress wraps a kvpress ScorerPress, got {type(self.press).__name__}")
        check_number("alpha_safeguard", self.alpha_safeguard, low=0, high=1)
        check_choice("storage", self.storage, STORAGES)

    def post_init_from_model(self, model) -> None:
        self.press.post_init_from_model(model)

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    def keep_mask(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """Which (batch, head, position) stay. ``keys (B, H, N, d) -> bool (B, H, N)``."""
        if module.config._attn_implementation == "eager":
            raise ValueError("head-adaptive budgets need attn_implementation='sdpa' (or another non-eager one)")
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs)
        return head_adaptive_keep(scores, compute_n_kept(keys.shape[2], self.compression_ratio), self.alpha_safeguard)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio > 0:
            keep = self.keep_mask(module, hidden_states, keys, values, attentions, kwargs)
            module.masked_key_indices = tuple((~keep).nonzero(as_tuple=True))
        return keys, values

    def forward_hook(self, module, input, kwargs, output):
        if self.storage == "masked" or self.compression_ratio == 0:
            return super().forward_hook(module, input, kwargs, output)
        hidden_states, cache = kwargs["hidden_states"], kwargs["past_key_values"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        layer = cache.layers[module.layer_idx]
        if getattr(layer, "is_sliding", False) or type(layer).__name__.startswith("Quantized"):
            raise ValueError(
                f"ragged storage needs a plain dynamic cache layer, got {type(layer).__name__}; use storage='masked'"
            )
        keep = self.keep_mask(module, hidden_states, layer.keys, layer.values, output[1], kwargs)
        cache.layers[module.layer_idx] = RaggedLayer.from_keep(layer.keys, layer.values, keep)
        return output


@dataclass
class NestedKVPress(NestedKVConfig, ScorerPress):
    """NestedKV: key-only, training-free KV cache eviction (Chen et al., arXiv 2605.26678).

    After each layer's prefill, every position of every KV head is scored from its L2-normalised
    key alone (:func:`nestedkv.scoring.nestedkv_score`: three anchors, head-adaptive mixing,
    surprise gate, pinned sinks); the score does not depend on the ratio. A budget then picks what
    stays: ``head-adaptive`` (the paper's: :class:`HeadAdaptivePress` around this scorer, safeguard
    ``alpha_safeguard``, held as ``storage`` says) or ``uniform`` (kvpress's own per-head top-k,
    dense cache).

    ``compression_ratio`` is the fraction of context positions removed (0.9 keeps 10 %).
    keys/values in the cache: ``(batch, kv_heads, N, head_dim)``; scores ``(batch, kv_heads, N)``.
    Every score switch of :class:`~nestedkv.scoring.NestedKVConfig` is a constructor argument.
    ``scales=("global",), budget="uniform", n_sink=0`` ranks exactly as kvpress's ``KeyDiffPress``.

    kvpress wrappers that call :meth:`compress` themselves and store a dense cache (``DecodingPress``,
    ``ChunkPress``...) get the uniform budget, since a dense cache holds the same count per head.
    """

    budget: str = "head-adaptive"
    alpha_safeguard: float = 0.20
    storage: str = "ragged"

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        NestedKVConfig.__post_init__(self)
        check_choice("budget", self.budget, BUDGETS)
        check_number("alpha_safeguard", self.alpha_safeguard, low=0, high=1)
        check_choice("storage", self.storage, STORAGES)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        return nestedkv_score(keys, self)

    def check_budget(self, n: int) -> None:
        """Refuse a ratio that keeps fewer positions per head than the protected ones (sinks, recent)."""
        n_kept = compute_n_kept(n, self.compression_ratio)
        if n_kept < self.n_sink + self.n_recent:
            raise ValueError(
                f"compression_ratio {self.compression_ratio} keeps {n_kept} of {n} positions per head, "
                f"fewer than the {self.n_sink} sink + {self.n_recent} recent positions that are always kept"
            )

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio > 0:
            self.check_budget(keys.shape[2])
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    def forward_hook(self, module, input, kwargs, output):
        if self.budget == "uniform" or self.compression_ratio == 0:
            return super().forward_hook(module, input, kwargs, output)
        if is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            self.check_budget(kwargs["past_key_values"].layers[module.layer_idx].keys.shape[2])
        budgeted = HeadAdaptivePress(self, self.alpha_safeguard, self.storage)
        return budgeted.forward_hook(module, input, kwargs, output)
