"""kvpress presses: glue between a model's prefill and the pure ``scoring`` and ``budgets`` modules.

``NestedKVPress`` is the method of the paper as a kvpress ``ScorerPress``: it only scores.
``HeadAdaptivePress`` turns the scores of any kvpress scorer (NestedKV's included) into
head-adaptive budgets and chooses how they are held. Both work as kvpress presses: as a context
manager around a forward pass or ``model.generate``, or with kvpress's
``kv-press-text-generation`` pipeline.

Padded batches: each row is scored from its own real tokens and keeps ``(1 - r)`` of its own
length; padding is never kept. Caches that cannot hold what a press does are refused before
anything is changed (static caches; quantized caches with ragged storage).
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, ComposedPress, KVPressTextGenerationPipeline, ScorerPress

from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.cache.attention import (
    attention_went_through_registry,
    check_attention_through_registry,
    check_reads_ragged_layers,
    mask_can_hide_context,
    visible_columns,
)
from nestedkv.models import attention_modules
from nestedkv.scoring import Rotary, compiled_nestedkv_score, nestedkv_score
from nestedkv.settings import (
    PAPER_SETTINGS,
    STORAGES,
    NestedKVConfig,
    NestedKVSettings,
    check_keeps_sinks,
    compute_n_kept,
    layer_compression_ratio,
    ramp_weight,
)
from nestedkv.validation import check_choice, check_number, check_ratio

# --- what a prefill hook sees -------------------------------------------------------------------


def real_positions(attention_mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """Which of the ``n`` prefilled positions of each row are real tokens, not padding. ``-> bool (B, N)``.

    Read from the mask the layer's attention received: a padding position is visible to no query.
    ``None`` when nothing is padded.
    """
    if attention_mask is None:
        return None
    queries = attention_mask.shape[-2] if attention_mask.dim() == 4 else 1
    real = visible_columns(attention_mask, batch, queries).any(dim=1)[:, -n:]
    return None if bool(real.all()) else real.expand(batch, n)


def _row_inputs(kwargs: dict, row: int, columns: torch.Tensor, batch: int, n: int) -> dict:
    """A hook's keyword arguments for batch row ``row`` alone, at its real ``columns``: every tensor laid
    out as ``(batch, N, ...)`` (hidden states, position embeddings), or ``(1, N, ...)`` for all rows, is cut;
    the mask is dropped (a row without its padding needs none)."""

    def cut(value):
        per_position = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n
        if per_position and value.shape[0] in (1, batch):
            return value[row : row + 1, columns] if value.shape[0] == batch else value[:, columns]
        if isinstance(value, tuple):
            return tuple(cut(item) for item in value)
        return value

    row_kwargs = {key: cut(value) for key, value in kwargs.items()}
    row_kwargs["attention_mask"] = None
    if isinstance(kwargs.get("cache_position"), torch.Tensor):
        row_kwargs["cache_position"] = kwargs["cache_position"][: len(columns)]
    return row_kwargs


def rotary_of(module: torch.nn.Module, keys: torch.Tensor, kwargs: dict) -> Rotary | None:
    """The rotation that RoPE applied to ``keys (B, H, N, d)``, as :func:`~nestedkv.scoring.undo_rotary` undoes
    it; ``None`` where the hook was not handed the angles of these keys.

    The layout (halves or interleaved pairs, angles used as given or derived from part of them) is the model's:
    :func:`_rotate_half_of` reads it off the ``apply_rotary_pos_emb`` of the module that defines the attention
    class. The angles are the hook's ``position_embeddings`` ``(cos, sin)``, each ``(B or 1, N, r)``; ``r < d``
    rotates the first ``r`` dimensions only (partial rotary: Phi, StableLM, GLM). A RoPE with an attention
    factor (YaRN) leaves the keys scaled, which the score's normalisation removes. ``None``: no
    ``apply_rotary_pos_emb`` of the probed form (no RoPE, Llama 4's complex angles) or angles of other positions
    than these N keys (a kvpress wrapper scoring part of them, as ``ChunkPress``, or a decoding step's, as
    ``DecodingPress``).
    """
    angles = kwargs.get("position_embeddings")
    rotate = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rotate is None or not isinstance(angles, tuple) or len(angles) != 2:
        return None
    cos, sin = (angle.float() for angle in angles)
    n, d = keys.shape[-2:]
    if cos.dim() != 3 or cos.shape[1] != n or cos.shape[-1] > d or cos.shape[0] not in (1, keys.shape[0]):
        return None
    layout = _rotate_half_of(rotate, cos.shape[-1])
    if layout is None:
        return None
    perm, sign, angles_as_given = layout
    perm, sign = perm.to(cos.device), sign.to(cos.device)  # the probe ran on CPU
    if not angles_as_given:
        cos, sin = _applied_angles(rotate, cos, sin, sign)
    return Rotary(cos, sin, perm, sign)


@functools.cache
def _rotate_half_of(rotate, r: int) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(perm, sign, angles_as_given)``: ``rotate(q, k, cos, sin)`` turns ``k`` into ``k * C + (k[perm] * sign) * S``,
    with ``(C, S) = (cos, sin)`` where ``angles_as_given``, else the :func:`_applied_angles` it derives from them
    (GLM, ERNIE repeat half of them); ``None`` where it does neither. Read off ``rotate`` once per function and
    ``r`` (rotated dimensions): with ``cos = 0, sin = 1`` it maps the unit vectors to ``sign * e[perm]``, and
    random keys and angles then check the form."""
    eye = torch.eye(r).reshape(1, 1, r, r)
    half = rotate(eye, eye, torch.zeros(1, r, r), torch.ones(1, r, r))[1][0, 0]  # row t: rotate_half(e_t)
    if not ((half.abs() == 1).sum(0) == 1).all() or not ((half != 0).sum(1) == 1).all():
        return None
    perm, sign = half.abs().argmax(0), half.sum(0)  # rotate_half(k)[t] = k[perm[t]] * sign[t]
    generator = torch.Generator().manual_seed(0)
    k, cos, sin = (torch.randn(shape, generator=generator) for shape in ((1, 2, 5, r), (1, 5, r), (1, 5, r)))

    def form(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return k * c.unsqueeze(1) + k[..., perm] * sign * s.unsqueeze(1)

    rotated = rotate(k, k, cos, sin)[1]
    if torch.allclose(rotated, form(cos, sin), atol=1e-5):
        return perm, sign, True
    applied = form(*_applied_angles(rotate, cos, sin, sign))
    return (perm, sign, False) if torch.allclose(rotated, applied, atol=1e-5) else None


def _applied_angles(
    rotate, cos: torch.Tensor, sin: torch.Tensor, sign: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosines and sines that ``rotate`` really turns each dimension by when handed ``cos, sin (B, N, r)``:
    a key of ones turned by the cosines alone, then by the sines alone (its ``rotate_half`` is ``sign``)."""
    ones = cos.new_ones(1, 1, *cos.shape[1:])
    applied_cos = rotate(ones, ones, cos, torch.zeros_like(sin))[1].squeeze(1)
    return applied_cos, rotate(ones, ones, torch.zeros_like(cos), sin)[1].squeeze(1) * sign


def compressible(layer, storage: str) -> bool:
    """Whether a cache layer can be compressed; refuses, before anything is changed, what cannot be.

    A sliding-window cache layer (transformers builds them for Mistral, Gemma, ...) holds at most
    its window and drops older tokens by itself, shifting what is left, which kvpress's masks cannot
    follow: it stays uncompressed in every storage (as kvpress leaves Gemma 3's sliding layers), with
    a warning. A plain layer read through a sliding-window mask is compressed: a ragged layer keeps
    its keys' positions so the mask still applies. Ragged storage is refused for values narrower than
    keys (:func:`~nestedkv.cache.attention.check_reads_ragged_layers`).
    """
    kind = type(layer).__name__
    if "Static" in kind:
        raise ValueError(
            "a static cache cannot be compressed (its empty slots would count as context); "
            "use the default dynamic cache (no cache_implementation='static')"
        )
    if storage == "ragged" and kind.startswith("Quantized"):
        raise ValueError(f"ragged storage needs a plain dynamic cache layer, got {kind}; use storage='masked'")
    if getattr(layer, "is_sliding", False):
        warnings.warn("sliding-window cache layers stay uncompressed (they hold at most their window)", stacklevel=3)
        return False
    if storage == "ragged":
        check_reads_ragged_layers(layer.keys, layer.values)
    return True


def _prefilling(module, kwargs: dict) -> bool:
    """kvpress's test for the first forward of a cache (``is_prefilling``: no token before this forward's),
    read from the cache layer's length, a Python int, rather than from ``cache_position``, so that a decoding
    step reads nothing back from the device: compiled decoding then has no graph break here.

    The layer holds this forward's tokens after anything before them: exactly these in a first forward,
    fewer when a press before this one (``ComposedPress``) has already compressed them, more otherwise."""
    return cache_layer(module, kwargs["past_key_values"]).get_seq_length() <= kwargs["hidden_states"].shape[1]


def cache_layer(module, cache):
    """The cache layer of ``module``'s decoder layer. Refuses (one line) a cache without layers of its own per
    decoder layer: Gemma 3n's last layers read an earlier layer's keys and values (refused at its first layer,
    before anything is compressed), hybrid caches of state-space models hold no such list."""
    if getattr(module.config, "num_kv_shared_layers", 0) or module.layer_idx >= len(getattr(cache, "layers", ())):
        raise ValueError(
            f"the model's cache ({type(cache).__name__}) has no key-value layer of its own for every attention layer "
            "(layers sharing another's keys and values, as in Gemma 3n, or a hybrid state-space cache); not supported"
        )
    return cache.layers[module.layer_idx]


def _no_cache(kwargs: dict) -> bool:
    """True (with a warning) when the forward pass runs without a cache: there is nothing to compress."""
    if kwargs.get("past_key_values") is not None:
        return False
    warnings.warn("the press does nothing without a cache (use_cache=False)", stacklevel=3)
    return True


class _LeavesModelAsFound:
    """Mixin: entering the press clears kvpress's head-wise masks left on the model by an earlier masked
    run (kvpress's attention patch would apply them to an unrelated cache); a refusal inside the press
    also drops the cache ``generate`` keeps on the model between calls (a static cache it was filling),
    so that the next ``generate`` starts from a fresh one."""

    @contextmanager
    def __call__(self, model):
        for module in attention_modules(model):
            module.masked_key_indices = None
        try:
            with super().__call__(model):
                yield
        except BaseException:
            if hasattr(model, "_cache"):
                del model._cache
            raise


def _refuse_unless_last_in_composed_press(press: BasePress) -> None:
    """Refuse a head-adaptive press that a kvpress ``ComposedPress`` runs before another press.

    The presses after it would prune a cache whose layout they do not know (a ragged layer's context
    is not in ``layer.keys``; masked storage's evicted indices would point at moved keys), so, like
    kvpress's own ``AdaKVPress``, it may only come last. kvpress tells a press nothing of the
    composition, so the ``ComposedPress`` that is setting this press up is found on the call stack.
    """
    frame = inspect.currentframe()
    while frame is not None:
        caller = frame.f_locals.get("self")
        if isinstance(caller, ComposedPress) and any(item is press for item in caller.presses[:-1]):
            raise ValueError(
                "a head-adaptive press must be the last press of a ComposedPress (the presses after it cannot "
                "prune its per-head cache); put it last, or use budget='uniform'"
            )
        frame = frame.f_back


# --- the presses ----------------------------------------------------------------------------------


@dataclass
class HeadAdaptivePress(_LeavesModelAsFound, BasePress):
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
        _refuse_unless_last_in_composed_press(self)
        self.press.post_init_from_model(model)

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        self.press.compression_ratio = value

    def _row_keep(self, n: int, scores: torch.Tensor) -> torch.Tensor:
        check_budget = getattr(self.press, "check_budget", None)
        if check_budget is not None:
            check_budget(n)
        return head_adaptive_keep(scores, compute_n_kept(n, self.compression_ratio), self.alpha_safeguard)

    def keep_mask(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """Which (batch, head, position) stay. ``keys (B, H, N, d) -> bool (B, H, N)``.

        In a padded batch each row is scored alone, from its real positions, with its own budget.
        """
        batch, heads, n, _ = keys.shape
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[-1] > n and real_positions(mask, batch, mask.shape[-1]) is not None:
            raise ValueError(  # a press before this one (ComposedPress) dropped positions: the mask no longer lines up
                "a press before the head-adaptive one shortened a padded batch's cache, so its padding cannot be "
                "found; compress the rows one at a time, or use the head-adaptive press alone"
            )
        real = real_positions(mask, batch, n)
        if real is None:
            return self._row_keep(n, self.press.score(module, hidden_states, keys, values, attentions, kwargs))
        keep = torch.zeros(batch, heads, n, dtype=torch.bool, device=keys.device)
        for row in range(batch):
            columns = real[row].nonzero().squeeze(-1)
            row_attentions = None if attentions is None else attentions[row : row + 1][..., columns[:, None], columns]
            scores = self.press.score(
                module, hidden_states[row : row + 1, columns], keys[row : row + 1, :, columns],
                values[row : row + 1, :, columns], row_attentions, _row_inputs(kwargs, row, columns, batch, n),
            )
            keep[row, :, columns] = self._row_keep(len(columns), scores)[0]
        return keep

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio > 0:
            keep = self.keep_mask(module, hidden_states, keys, values, attentions, kwargs)
            module.masked_key_indices = tuple((~keep).nonzero(as_tuple=True))
        return keys, values

    def forward_hook(self, module, input, kwargs, output):
        served = attention_went_through_registry(module)
        if self.compression_ratio == 0 or _no_cache(kwargs) or not _prefilling(module, kwargs):
            return output
        hidden_states, cache = kwargs["hidden_states"], kwargs["past_key_values"]
        layer = cache.layers[module.layer_idx]
        if not compressible(layer, self.storage):
            return output
        check_attention_through_registry(module, served)
        if self.storage == "masked":
            return super().forward_hook(module, input, kwargs, output)
        keep = self.keep_mask(module, hidden_states, layer.keys, layer.values, output[1], kwargs)
        cache.layers[module.layer_idx] = RaggedLayer.from_keep(
            layer.keys, layer.values, keep, keep_positions=mask_can_hide_context(module)
        )
        return output


@dataclass
class NestedKVPress(_LeavesModelAsFound, NestedKVSettings, ScorerPress):
    """NestedKV: training-free KV cache eviction scored from the keys (Chen et al., arXiv 2605.26678).

    After each layer's prefill, every position of every KV head is scored from its L2-normalised
    key (:func:`nestedkv.scoring.nestedkv_score`: three anchors, head-adaptive mixing, surprise gate,
    pinned sinks; the shipped default reads the key as it was before RoPE (:func:`rotary_of`)
    and blends in the value's norm, the paper's reads the cached key alone); the score does not depend
    on the ratio unless the recency ramp is tied to the budget (``recency_over_kept``). A budget then picks what
    stays: ``head-adaptive`` (the paper's: :class:`HeadAdaptivePress` around this scorer, safeguard
    ``alpha_safeguard``, held as ``storage`` says) or ``uniform`` (kvpress's own per-head top-k,
    dense cache).

    ``compression_ratio`` is the fraction of context positions removed (0.9 keeps 10 %).
    keys/values in the cache: ``(batch, kv_heads, N, head_dim)``; scores ``(batch, kv_heads, N)``.
    Every setting of :class:`~nestedkv.settings.NestedKVSettings` is a constructor argument; the
    defaults add a protected recent window, a recency ramp, the values' norms, blocks of 64 and keys scored
    before RoPE to the paper's method (``docs/tuning.md``); :meth:`paper` is the paper's.
    ``NestedKVPress.paper(scales=("global",), budget="uniform", n_sink=0)`` ranks exactly as kvpress's ``KeyDiffPress``.

    kvpress wrappers that score through :meth:`score` and store a dense cache (``DecodingPress``,
    ``ChunkPress``, ``CAMPress``) get the uniform budget, since a dense cache holds the same count per
    head, and score the keys as cached, with a warning, where they hand the angles of other keys than those
    they score; ``PerLayerCompressionPress`` sets the ratio of each layer; in a ``ComposedPress`` the
    head-adaptive budget must come last.

    ``compile_score``: score with :func:`~nestedkv.scoring.compiled_nestedkv_score` (``torch.compile``, one graph
    for every context length; the first prefill pays the compilation): for a GPU, where the eager score is bound
    by its many small kernel launches; on the CPU the default path (a C kernel) is faster. Where torch.compile
    cannot build (no C++ compiler, no Triton), the first prefill stops with a one-line ``ValueError``.
    """

    compile_score: bool = False
    _average_ratio: float | None = field(default=None, init=False, repr=False)  # the ratio while a layer's is set

    @classmethod
    def paper(cls, compression_ratio: float = 0.0, **options) -> NestedKVPress:
        """NestedKV exactly as the paper gives it (:data:`~nestedkv.settings.PAPER_SETTINGS`: no recent
        window, no recency ramp, the cached keys only, the paper's block sizes); any switch can still be set."""
        return cls(compression_ratio, **{**PAPER_SETTINGS, **options})

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        NestedKVSettings.__post_init__(self)

    def post_init_from_model(self, model) -> None:
        if self.budget == "head-adaptive":
            _refuse_unless_last_in_composed_press(self)

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and real_positions(mask, keys.shape[0], mask.shape[-1]) is not None:
            # HeadAdaptivePress scores each row of a padded batch alone (without a mask); whoever else
            # scores padded rows (budget='uniform', kvpress's ChunkPress, DecodingPress...) keeps a dense cache
            raise ValueError(
                "a dense cache (budget='uniform', or a kvpress wrapper such as ChunkPress or DecodingPress) cannot "
                "hold the different lengths of a padded batch's rows; use budget='head-adaptive', or run the rows "
                "one by one"
            )
        if getattr(module, "masked_key_indices", None) is not None:  # only set after a masked prefill
            raise ValueError(
                "this cache holds head-adaptive budgets in masked storage and cannot be compressed again (kvpress's "
                "DecodingPress would index evicted positions that no longer exist); use nestedkv.BudgetedPress"
            )
        rotary = None
        if self.scored_keys == "pre-rope":
            rotary = rotary_of(module, keys, kwargs)
            if rotary is None:
                warnings.warn(
                    "scored_keys='pre-rope': the model handed no RoPE angles of these keys (no rotary embedding, "
                    "or a kvpress wrapper scoring part of them); they are scored as cached", stacklevel=2,
                )
        # scores only pick positions: no gradient through them
        score = compiled_nestedkv_score() if self.compile_score else nestedkv_score
        try:
            return score(keys.detach(), self.score_config(), values.detach(), rotary)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # torch's message runs to many lines (a compiler's output, hints for its own bug reports)
            first_line = next(iter(str(error.inner_exception).strip().splitlines()), "")
            cause = f"{type(error.inner_exception).__name__}: {first_line}"
            raise ValueError(  # the CLI prints a ValueError as one line
                f"compile_score=True: torch.compile could not build the score on this machine ({cause}); "
                "use compile_score=False (the eager score keeps the same positions)"
            ) from error

    def score_config(self) -> NestedKVConfig:
        """The score's settings at this press's (or layer's) ratio: the press itself, or, with a ramp tied
        to the budget (``recency_over_kept``), its settings with the ramp's weight at this ratio
        (:func:`~nestedkv.settings.ramp_weight`)."""
        if self.ratio_free_scores:
            return self
        settings = {name: getattr(self, name) for name in NestedKVConfig.__dataclass_fields__}
        weight = ramp_weight(self.recency, self.recency_over_kept, self.compression_ratio)
        return NestedKVConfig(**{**settings, "recency": weight})

    def check_budget(self, n: int) -> None:
        """Refuse a ratio that keeps fewer of ``n`` positions per head than the sinks
        (:func:`~nestedkv.settings.check_keeps_sinks`)."""
        check_keeps_sinks(n, self.compression_ratio, self.n_sink)

    @contextmanager
    def _at_layer(self, module):
        """``compression_ratio`` set to ``module``'s layer's share (``layer_budget``) while that layer is
        compressed; the forward hook and ``compress`` (which kvpress's wrappers call directly) both enter
        it, the first one to do so sets it."""
        if self.layer_budget == 0 or self._average_ratio is not None:
            yield
            return
        self._average_ratio = self.compression_ratio
        self.compression_ratio = layer_compression_ratio(
            self._average_ratio, module.layer_idx, module.config.num_hidden_layers, self.layer_budget
        )
        try:
            yield
        finally:
            self.compression_ratio, self._average_ratio = self._average_ratio, None

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        with self._at_layer(module):
            if self.compression_ratio == 0:
                return keys, values
            self.check_budget(keys.shape[2])
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    def forward_hook(self, module, input, kwargs, output):
        if self.compression_ratio == 0 or _no_cache(kwargs) or not _prefilling(module, kwargs):
            return output
        with self._at_layer(module):
            if self.budget == "uniform":
                if not compressible(cache_layer(module, kwargs["past_key_values"]), "masked"):
                    return output
                return super().forward_hook(module, input, kwargs, output)
            head_adaptive = HeadAdaptivePress(self, self.alpha_safeguard, self.storage)
            return head_adaptive.forward_hook(module, input, kwargs, output)


_remove_answer_from_cache = KVPressTextGenerationPipeline._remove_answer_from_cache


def _remove_answer_from_ragged_layers(self, cache, cache_seq_lengths):
    """kvpress's pipeline drops each answer by slicing layers to their length before it; a ragged
    layer's length is logical (context + tail), so it is cropped by its own method first."""
    for layer, length in zip(cache.layers, cache_seq_lengths, strict=False):
        if isinstance(layer, RaggedLayer):
            layer.crop(length)
    _remove_answer_from_cache(self, cache, cache_seq_lengths)


KVPressTextGenerationPipeline._remove_answer_from_cache = _remove_answer_from_ragged_layers
