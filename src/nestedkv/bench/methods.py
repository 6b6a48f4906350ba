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


@dataclass(frozen=True)
class Method:
    """``ratio_free_scores``: the press's scores do not depend on the ratio, so the runner may score
    a sample once and reuse the scores for every ratio (worth it for expensive scorers)."""

    name: str
    description: str
    make: Callable[[float], BasePress]
    ratio_free_scores: bool = False


NO_COMPRESSION = "none"
"""The uncompressed baseline: run once per sample, at ratio 0."""

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("nestedkv", "NestedKV as in the paper (ragged storage)", lambda r: NestedKVPress(r)),
        # Same kept positions, held as kvpress holds head-wise budgets (nothing freed): for `nestedkv bench`.
        Method(
            "nestedkv-masked", "NestedKV, kvpress's masked storage", lambda r: NestedKVPress(r, storage="masked")
        ),
        # Ablations (spec, "Ablation switches"): one component off at a time.
        Method(
            "nestedkv-uniform", "NestedKV score, uniform per-head budget", lambda r: NestedKVPress(r, budget="uniform")
        ),
        Method(
            "nestedkv-global",
            "global anchor only, head-adaptive budget",
            lambda r: NestedKVPress(r, scales=("global",)),
        ),
        Method("nestedkv-no-gate", "blend only, surprise gate off", lambda r: NestedKVPress(r, gate="off")),
        Method(
            "nestedkv-fixed-mix", "prior mixing weights, no head adaptation", lambda r: NestedKVPress(r, mixing="fixed")
        ),
        Method(
            "nestedkv-recent64", "NestedKV + the last 64 positions protected", lambda r: NestedKVPress(r, n_recent=64)
        ),
        # kvpress peers.
        Method("keydiff", "KeyDiff (kvpress)", lambda r: KeyDiffPress(compression_ratio=r)),
        Method(
            "block-keydiff",
            "KeyDiff, block-wise (kvpress BlockPress, 128)",
            lambda r: BlockPress(press=KeyDiffPress(compression_ratio=r), block_size=128),
        ),
        Method("snapkv", "SnapKV (kvpress)", lambda r: SnapKVPress(compression_ratio=r)),
        Method("streamingllm", "StreamingLLM (kvpress)", lambda r: StreamingLLMPress(compression_ratio=r)),
        Method("knorm", "KNorm (kvpress)", lambda r: KnormPress(compression_ratio=r)),
        Method("tova", "TOVA (kvpress)", lambda r: TOVAPress(compression_ratio=r)),
        Method(
            "expected-attention",
            "ExpectedAttention (kvpress)",
            lambda r: ExpectedAttentionPress(compression_ratio=r),
            ratio_free_scores=True,
        ),
        Method(
            "adakv-expected-attention",
            "AdaKV + ExpectedAttention (kvpress, masked)",
            lambda r: AdaKVPress(press=ExpectedAttentionPress(compression_ratio=r)),
            ratio_free_scores=True,
        ),
        Method("pyramidkv", "PyramidKV (kvpress)", lambda r: PyramidKVPress(compression_ratio=r)),
    ]
}

PEERS = (
    "keydiff",
    "block-keydiff",
    "snapkv",
    "streamingllm",
    "knorm",
    "tova",
    "expected-attention",
    "adakv-expected-attention",
    "pyramidkv",
)
ABLATIONS = ("nestedkv-uniform", "nestedkv-global", "nestedkv-no-gate", "nestedkv-fixed-mix", "nestedkv-recent64")


def make_press(method: str, ratio: float) -> BasePress | None:
    """The press of ``method`` at ``ratio``; ``None`` for the uncompressed baseline."""
    if method == NO_COMPRESSION:
        return None
    return METHODS[check_method(method)].make(ratio)


def check_method(method: str) -> str:
    if method != NO_COMPRESSION and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {NO_COMPRESSION}, {', '.join(METHODS)}")
    return method
