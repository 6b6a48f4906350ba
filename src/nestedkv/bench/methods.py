"""The methods the benchmark compares: NestedKV, its ablations, and kvpress's peers.

Each method is a name and a factory ``ratio -> press``; every press is used as kvpress's own
evaluation registry configures it (defaults included), except where the name says otherwise.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING
from unittest import mock

import nestedkv
from nestedkv.settings import PAPER_SETTINGS, NestedKVSettings
from nestedkv.validation import check_choice

if TYPE_CHECKING:
    from kvpress import BasePress


class _Kvpress:
    """kvpress's presses, imported when the first press is built: the registry (names, groups, NestedKV
    arguments) is read by the command line to check its options before torch is imported."""

    def __getattr__(self, name: str) -> type:
        return getattr(importlib.import_module("kvpress"), name)


kvpress = _Kvpress()

RATIOS = (0.5, 0.75, 0.9, 0.95)
"""Compression ratios every benchmark compares by default (quality and speed)."""

NESTEDKV, ABLATION, PEER, STORAGE = "nestedkv", "ablation", "peer", "storage"
"""Groups of methods: NestedKV itself, its ablations (one switch of the spec changed), kvpress's peers,
and storage variants of NestedKV that keep the same positions (for the speed benchmark)."""

REPLAY, OWN_PREFILL, EAGER_PREFILL = "replay", "own", "eager"
"""How the benchmark gets a method's compressed cache: replayed on a shared prefill
(:mod:`nestedkv.bench.replay`); a prefill of its own under the press, for presses that run extra
passes over the context (KVzip re-reads it, KVCompose re-feeds it); or a prefill of its own with
eager attention, for presses that score the attention weights themselves."""


@dataclass(frozen=True)
class Method:
    """``ratio_free_scores``: the press's scores do not depend on the ratio, so the runner may score
    a sample once and reuse the scores for every ratio (worth it for expensive scorers); a method with
    a prefill of its own then runs it once per sample to score, and every ratio is replayed on the shared
    prefill (the kept keys and values are the shared prefill's: an eager prefill's up to rounding).
    ``prefill``: one of ``REPLAY``, ``OWN_PREFILL``, ``EAGER_PREFILL``. ``download``: the press loads
    trained weights or statistics from the Hugging Face hub, so it runs only where the hub (or its
    cache) is reachable and is left out of the default method lists."""

    name: str
    group: str
    description: str
    make: Callable[[float], BasePress]
    ratio_free_scores: bool = False
    prefill: str = REPLAY
    download: bool = False
    nestedkv_options: tuple[tuple[str, object], ...] | None = None
    """For NestedKV's variants: the ``NestedKVPress`` arguments beyond the ratio (see :func:`method_spec`)."""


NO_COMPRESSION = "none"
"""The uncompressed baseline: run once per sample, at ratio 0."""


def _nestedkv(name: str, group: str, description: str, **options) -> Method:
    """A NestedKV variant: ``NestedKVPress(r, **options)``. Its scores do not depend on the ratio unless its
    recency ramp is tied to the budget (``recency_over_kept``)."""
    return Method(
        name, group, description, lambda r: nestedkv.NestedKVPress(r, **options),
        ratio_free_scores=NestedKVSettings(**options).ratio_free_scores, nestedkv_options=tuple(options.items()),
    )


@functools.cache
def _kvzip_with_gguf_tokenizer() -> type[BasePress]:
    """``KVzipPress`` for GGUF-loaded models too: KVzip reloads the tokenizer from
    ``config.name_or_path``, a directory that holds no tokenizer files when the weights came from a
    GGUF file; :func:`nestedkv.models.load_model` records the file in ``config.gguf_file``."""
    from kvpress.presses import kvzip_press
    from transformers import AutoTokenizer

    class KVzipWithGGUFTokenizer(kvpress.KVzipPress):
        @contextmanager
        def __call__(self, model) -> Generator:
            gguf_file = getattr(model.config, "gguf_file", None)
            tokenizer_loader = SimpleNamespace(
                from_pretrained=functools.partial(AutoTokenizer.from_pretrained, gguf_file=gguf_file)
            )
            with (
                mock.patch.object(kvzip_press, "AutoTokenizer", tokenizer_loader) if gguf_file else nullcontext(),
                super().__call__(model),
            ):
                yield

    return KVzipWithGGUFTokenizer


def _peer(name: str, description: str, make: Callable[[float], BasePress], **options) -> Method:
    return Method(name, PEER, description, make, **options)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _nestedkv("nestedkv", NESTEDKV,
                  "NestedKV as shipped: the paper's + recent window, recency ramp, value norms, blocks of 64, keys "
                  "before RoPE (ragged)"),
        _nestedkv("nestedkv-paper", NESTEDKV, "NestedKV as in the paper (ragged storage)", **PAPER_SETTINGS),
        _nestedkv("nestedkv-masked", STORAGE, "NestedKV, kvpress's masked storage", storage="masked"),
        # Ablations of the paper's method (spec, "Ablation switches"): one component changed at a time.
        _nestedkv("nestedkv-uniform", ABLATION, "paper's score, uniform per-head budget",
                  **PAPER_SETTINGS, budget="uniform"),
        _nestedkv("nestedkv-global", ABLATION, "paper's, global anchor only", **PAPER_SETTINGS, scales=("global",)),
        _nestedkv("nestedkv-no-gate", ABLATION, "paper's, surprise gate off (blend only)",
                  **PAPER_SETTINGS, gate="off"),
        _nestedkv("nestedkv-fixed-mix", ABLATION, "paper's, prior mixing weights (no head adaptation)",
                  **PAPER_SETTINGS, mixing="fixed"),
        _nestedkv("nestedkv-recent64", ABLATION, "paper's + the last 64 positions protected",
                  **{**PAPER_SETTINGS, "n_recent": 64}),
        # kvpress peers, configured as kvpress's evaluation registry configures them.
        _peer("random", "Random (kvpress; the floor, seed 0)", lambda r: kvpress.RandomPress(r, seed=0)),
        _peer("streamingllm", "StreamingLLM (kvpress)", lambda r: kvpress.StreamingLLMPress(compression_ratio=r)),
        _peer("knorm", "KNorm (kvpress)", lambda r: kvpress.KnormPress(compression_ratio=r)),
        _peer("keydiff", "KeyDiff (kvpress)", lambda r: kvpress.KeyDiffPress(compression_ratio=r)),
        _peer(
            "block-keydiff", "KeyDiff, block-wise (kvpress BlockPress, 128)",
            lambda r: kvpress.BlockPress(press=kvpress.KeyDiffPress(compression_ratio=r), block_size=128),
        ),
        _peer("snapkv", "SnapKV (kvpress)", lambda r: kvpress.SnapKVPress(compression_ratio=r)),
        _peer("adakv-snapkv", "AdaKV + SnapKV (kvpress, masked)", lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(r))),
        _peer("pyramidkv", "PyramidKV (kvpress)", lambda r: kvpress.PyramidKVPress(compression_ratio=r)),
        _peer("tova", "TOVA (kvpress)", lambda r: kvpress.TOVAPress(compression_ratio=r)),
        _peer("observed-attention", "H2O / ObservedAttention (kvpress, eager attention)",
              lambda r: kvpress.ObservedAttentionPress(r), prefill=EAGER_PREFILL, ratio_free_scores=True),
        _peer("expected-attention", "ExpectedAttention (kvpress)",
              lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r), ratio_free_scores=True),
        _peer("adakv-expected-attention", "AdaKV + ExpectedAttention (kvpress, masked)",
              lambda r: kvpress.AdaKVPress(press=kvpress.ExpectedAttentionPress(compression_ratio=r)),
              ratio_free_scores=True),
        _peer("adakv-expected-attention-e2", "AdaKV + ExpectedAttention, epsilon 1e-2 (kvpress leaderboard's)",
              lambda r: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(r, epsilon=1e-2)), ratio_free_scores=True),
        # kvpress's head-wise peers again, through our HeadAdaptivePress: the same budgets, stored ragged
        # (the evicted positions are freed instead of masked by kvpress's fake keys).
        _peer("ragged-adakv-snapkv", "AdaKV + SnapKV, ragged storage (nestedkv HeadAdaptivePress)",
              lambda r: nestedkv.HeadAdaptivePress(kvpress.SnapKVPress(r))),
        _peer("ragged-adakv-expected-attention-e2", "AdaKV + ExpectedAttention e2, ragged (HeadAdaptivePress)",
              lambda r: nestedkv.HeadAdaptivePress(kvpress.ExpectedAttentionPress(r, epsilon=1e-2)),
              ratio_free_scores=True),
        _peer("critical-snapkv", "CriticalKV + SnapKV (kvpress)",
              lambda r: kvpress.CriticalKVPress(kvpress.SnapKVPress(r))),
        _peer("critical-adakv-snapkv", "CriticalAdaKV + SnapKV (kvpress, masked)",
              lambda r: kvpress.CriticalAdaKVPress(kvpress.SnapKVPress(r))),
        _peer("critical-expected-attention", "CriticalKV + ExpectedAttention (kvpress)",
              lambda r: kvpress.CriticalKVPress(kvpress.ExpectedAttentionPress(r, use_vnorm=False))),
        _peer("critical-adakv-expected-attention", "CriticalAdaKV + ExpectedAttention (kvpress, masked)",
              lambda r: kvpress.CriticalAdaKVPress(kvpress.ExpectedAttentionPress(r, use_vnorm=False))),
        _peer("chunkkv", "ChunkKV + SnapKV, chunks of 20 (kvpress)",
              lambda r: kvpress.ChunkKVPress(press=kvpress.SnapKVPress(r), chunk_length=20)),
        _peer("compactor", "Compactor (kvpress)", lambda r: kvpress.CompactorPress(compression_ratio=r)),
        _peer("adakv-compactor", "AdaKV + Compactor (kvpress, masked)",
              lambda r: kvpress.AdaKVPress(kvpress.CompactorPress(r))),
        _peer("leverage-score", "LeverageScore (kvpress)", lambda r: kvpress.LeverageScorePress(compression_ratio=r)),
        _peer("cur", "CUR (kvpress)", lambda r: kvpress.CURPress(compression_ratio=r)),
        _peer("lagkv", "LagKV (kvpress)", lambda r: kvpress.LagKVPress(compression_ratio=r)),
        _peer("merging-knorm", "MergingPress + KNorm: evicted values merged (kvpress)",
              lambda r: kvpress.MergingPress(kvpress.KnormPress(r))),
        _peer("merging-snapkv", "MergingPress + SnapKV: evicted values merged (kvpress)",
              lambda r: kvpress.MergingPress(kvpress.SnapKVPress(r))),
        _peer("kvcompose", "KVCompose, structured (kvpress; re-feeds the context, eager attention)",
              lambda r: kvpress.KVComposePress(compression_ratio=r), prefill=OWN_PREFILL,
              ratio_free_scores=True),
        _peer("kvzip", "KVzip (kvpress; re-reads the context to score it, masked)",
              lambda r: _kvzip_with_gguf_tokenizer()(compression_ratio=r), prefill=OWN_PREFILL,
              ratio_free_scores=True),
        # Peers that load trained weights or statistics from the hub (not in the offline tables).
        _peer("kvzap", "KVzap, MLP, DMS thresholding (kvpress; hub weights)",
              lambda r: kvpress.DMSPress(press=kvpress.KVzapPress(r, model_type="mlp")), download=True),
        _peer("fastkvzip", "FastKVzip (kvpress; hub gates)", lambda r: kvpress.FastKVzipPress(r), download=True),
        _peer("qfilter", "Q-Filter (kvpress; hub filters)", lambda r: kvpress.QFilterPress(r), download=True),
        _peer("duo-attention", "DuoAttention (kvpress; hub head patterns)",
              lambda r: kvpress.DuoAttentionPress(head_compression_ratio=r), download=True),
        _peer("expected-attention-stats", "ExpectedAttention with hub query statistics (kvpress)",
              lambda r: kvpress.ExpectedAttentionStatsPress(r), download=True),
        _peer("lukv", "LU-KV + ExpectedAttention (kvpress; hub budget curves, one model so far)",
              lambda r: kvpress.LUKVPress(compression_ratio=r), download=True),
    ]
}

PEERS = tuple(name for name, method in METHODS.items() if method.group == PEER and not method.download)
"""Every peer that runs offline (the default comparison)."""
DOWNLOAD_PEERS = tuple(name for name, method in METHODS.items() if method.download)
ABLATIONS = tuple(name for name, method in METHODS.items() if method.group == ABLATION)


OPTION_SEPARATOR = ":"


def _option_value(text: str) -> object:
    """``64`` -> 64, ``0.5`` -> 0.5, ``global+block`` -> ("global", "block"), anything else as written."""
    if "+" in text:
        return tuple(_option_value(part) for part in text.split("+"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_arguments(method: str, fields: Iterable[str]) -> tuple[str, dict[str, object]]:
    """``base:field=value:...`` -> ``(base, {field: value})``, values read by :func:`_option_value`;
    a ``ValueError`` for an argument that is not ``field=value`` with one of ``fields``."""
    base, *assignments = method.split(OPTION_SEPARATOR)
    fields, options = tuple(fields), {}
    for assignment in assignments:
        field, equals, value = assignment.partition("=")
        if not equals or field not in fields:
            choices = ", ".join(fields)
            raise ValueError(f"method {method!r}: {assignment!r} is not field=value with a field among {choices}")
        options[field] = _option_value(value)
    return base, options


def method_spec(method: str) -> Method | None:
    """The registry entry of ``method``; ``None`` for the uncompressed baseline.

    A NestedKV method may carry ``NestedKVPress`` arguments after its name, each as ``:field=value``
    (tuples joined by ``+``): ``nestedkv-paper:n_recent=128:pool_size=5`` is the paper's method with
    those two switches changed. Such a name is a method of its own in the results store, so variants
    can be measured with ``nestedkv eval`` without a registry entry each. Raises ``ValueError`` for an
    unknown method or argument, or an invalid value.
    """
    base, arguments = split_arguments(method, NestedKVSettings.__dataclass_fields__)
    if base == NO_COMPRESSION and not arguments:
        return None
    spec = METHODS[check_choice("method", base, (NO_COMPRESSION, *METHODS))] if base != NO_COMPRESSION else None
    if not arguments:
        return spec
    if spec is None or spec.nestedkv_options is None:
        raise ValueError(f"method {method!r}: only NestedKV methods take ':field=value' arguments")
    options = {**dict(spec.nestedkv_options), **arguments}
    NestedKVSettings(**options)  # validates every value now, before torch or a model loads
    given = method.split(OPTION_SEPARATOR, 1)[1].replace(OPTION_SEPARATOR, ", ")
    return _nestedkv(method, spec.group, f"{spec.description}, with {given}", **options)


def make_press(method: str, ratio: float) -> BasePress | None:
    """The press of ``method`` at ``ratio``; ``None`` for the uncompressed baseline."""
    spec = method_spec(method)
    return spec.make(ratio) if spec else None


def check_method(method: str) -> str:
    method_spec(method)
    return method
