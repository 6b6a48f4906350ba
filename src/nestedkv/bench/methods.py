"""The methods the benchmark compares: NestedKV, its ablations, and kvpress's peers.

Each method is a name and a factory ``ratio -> press``; every press is used exactly as kvpress
ships it (defaults included), except where the name says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvpress import (
    AdaKVPress,
    BasePress,
    BlockPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

from nestedkv.press import NestedKVPress
from nestedkv.validation import check_choice

RATIOS = (0.5, 0.75, 0.9, 0.95)
"""Compression ratios every benchmark compares by default (quality and speed)."""

NESTEDKV, ABLATION, PEER, STORAGE = "nestedkv", "ablation", "peer", "storage"
"""Groups of methods: NestedKV itself, its ablations (one switch of the spec changed), kvpress's peers,
and storage variants of NestedKV that keep the same positions (for the speed benchmark)."""


@dataclass(frozen=True)
class Method:
    """``ratio_free_scores``: the press's scores do not depend on the ratio, so the runner may score
    a sample once and reuse the scores for every ratio (worth it for expensive scorers)."""

    name: str
    group: str
    description: str
    make: Callable[[float], BasePress]
    ratio_free_scores: bool = False


NO_COMPRESSION = "none"
"""The uncompressed baseline: run once per sample, at ratio 0."""

def _nestedkv(name: str, group: str, description: str, **options) -> Method:
    """A NestedKV variant: ``NestedKVPress(r, **options)``. Its scores never depend on the ratio."""
    return Method(name, group, description, lambda r: NestedKVPress(r, **options), ratio_free_scores=True)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _nestedkv("nestedkv", NESTEDKV, "NestedKV as in the paper (ragged storage)"),
        _nestedkv("nestedkv-masked", STORAGE, "NestedKV, kvpress's masked storage", storage="masked"),
        # Ablations (spec, "Ablation switches"): one component off at a time.
        _nestedkv("nestedkv-uniform", ABLATION, "NestedKV score, uniform per-head budget", budget="uniform"),
        _nestedkv("nestedkv-global", ABLATION, "global anchor only, head-adaptive budget", scales=("global",)),
        _nestedkv("nestedkv-no-gate", ABLATION, "blend only, surprise gate off", gate="off"),
        _nestedkv("nestedkv-fixed-mix", ABLATION, "prior mixing weights, no head adaptation", mixing="fixed"),
        _nestedkv("nestedkv-recent64", ABLATION, "NestedKV + the last 64 positions protected", n_recent=64),
        # kvpress peers.
        Method("keydiff", PEER, "KeyDiff (kvpress)", lambda r: KeyDiffPress(compression_ratio=r)),
        Method(
            "block-keydiff", PEER, "KeyDiff, block-wise (kvpress BlockPress, 128)",
            lambda r: BlockPress(press=KeyDiffPress(compression_ratio=r), block_size=128),
        ),
        Method("snapkv", PEER, "SnapKV (kvpress)", lambda r: SnapKVPress(compression_ratio=r)),
        Method("streamingllm", PEER, "StreamingLLM (kvpress)", lambda r: StreamingLLMPress(compression_ratio=r)),
        Method("knorm", PEER, "KNorm (kvpress)", lambda r: KnormPress(compression_ratio=r)),
        Method("tova", PEER, "TOVA (kvpress)", lambda r: TOVAPress(compression_ratio=r)),
        Method(
            "expected-attention", PEER, "ExpectedAttention (kvpress)",
            lambda r: ExpectedAttentionPress(compression_ratio=r), ratio_free_scores=True,
        ),
        Method(
            "adakv-expected-attention", PEER, "AdaKV + ExpectedAttention (kvpress, masked)",
            lambda r: AdaKVPress(press=ExpectedAttentionPress(compression_ratio=r)), ratio_free_scores=True,
        ),
        Method("pyramidkv", PEER, "PyramidKV (kvpress)", lambda r: PyramidKVPress(compression_ratio=r)),
    ]
}

PEERS = tuple(name for name, method in METHODS.items() if method.group == PEER)
ABLATIONS = tuple(name for name, method in METHODS.items() if method.group == ABLATION)


def make_press(method: str, ratio: float) -> BasePress | None:
    """The press of ``method`` at ``ratio``; ``None`` for the uncompressed baseline."""
    if method == NO_COMPRESSION:
        return None
    return METHODS[check_method(method)].make(ratio)


def check_method(method: str) -> str:
    return check_choice("method", method, (NO_COMPRESSION, *METHODS))
