"""What ``nestedkv eval`` and ``nestedkv bench`` are asked to run, checked before anything heavy loads.

:class:`EvalConfig` (a benchmark run: methods, ratios, lengths, tasks) and :class:`BenchSettings`
(the speed and memory benchmark) check every value at construction; the command line builds them
before it imports torch, so that bad options are refused in milliseconds. Running them:
:mod:`nestedkv.bench.runner` and :mod:`nestedkv.bench.speed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nestedkv.bench.documents import DOCUMENT_TASKS, DOCUMENTS
from nestedkv.bench.hub import BENCHMARKS as HUB_BENCHMARKS
from nestedkv.bench.hub import load_hub_samples, resolve_subset, subsets
from nestedkv.bench.methods import ABLATIONS, NO_COMPRESSION, PEERS, RATIOS, check_method
from nestedkv.bench.ruler import Sample
from nestedkv.models import check_fits
from nestedkv.settings import NestedKVConfig, check_context_length, check_keeps_sinks
from nestedkv.validation import check_choice, check_ratio

LOCAL_RULER = "ruler-local"
"""RULER's tasks built offline by :mod:`nestedkv.bench.ruler`."""
LOCAL_BENCHMARKS = (LOCAL_RULER, DOCUMENTS)
"""Built offline: RULER, and real documents (:mod:`nestedkv.bench.documents`); the others come from the hub."""

SPLIT_SEEDS = {"dev": 0, "test": 1}
"""The dev/test split as seeds: local RULER samples are drawn from their seed (dev: the seed every
earlier run used, so every choice made so far was made on dev); the documents of each split are
fixed by their names (:func:`nestedkv.bench.documents.split_of`) and recorded under its seed."""


@dataclass
class EvalConfig:
    """What one benchmark run measures. ``model`` is the name recorded with every result.

    ``benchmark``: ``ruler-local`` (RULER built offline at ``lengths``) or a hub benchmark of
    :mod:`nestedkv.bench.hub` with its ``subset`` (or a local copy in ``data_files``). ``tasks``:
    ``None`` runs every task of the benchmark. ``shard = (k, n)``: this process measures only every
    n-th planned sample, starting at the k-th, so that n processes (one per GPU, or per CPU core)
    can share one run and one results store; the shard is not part of a result's key.
    """

    model: str
    tasks: tuple[str, ...] | None = None
    lengths: tuple[int, ...] = (4096,)
    ratios: tuple[float, ...] = RATIOS
    methods: tuple[str, ...] = (NO_COMPRESSION, "nestedkv", "nestedkv-paper", *ABLATIONS, *PEERS)
    samples: int = 5
    seed: int = 0
    query_aware: bool = False
    squad_path: str | None = None
    hotpot_path: str | None = None
    benchmark: str = LOCAL_RULER
    subset: str | None = None
    data_files: str | None = None
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        if self.benchmark == DOCUMENTS:
            if self.seed not in SPLIT_SEEDS.values():
                raise ValueError("the documents benchmark has two splits, not seeds: choose --split dev or test")
            for task in self.tasks or ():
                check_choice("documents task", task, DOCUMENT_TASKS)
        elif self.benchmark != LOCAL_RULER:
            if self.benchmark not in HUB_BENCHMARKS:
                choices = ", ".join((*LOCAL_BENCHMARKS, *HUB_BENCHMARKS))
                raise ValueError(f"unknown benchmark {self.benchmark!r}; choose one of {choices}")
            if self.subset is not None:
                resolve_subset(self.benchmark, self.subset)
            elif self.data_files is None:
                raise ValueError(f"choose a {self.benchmark} subset: one of {', '.join(subsets(self.benchmark))}")
        for method in self.methods:
            check_method(method)
        for ratio in self.ratios:
            check_ratio(ratio)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"context lengths must be positive token counts, got {self.lengths}")
        index, count = self.shard
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: need 0 <= k < n for shard k/n")

    def jobs(self) -> list[tuple[str, float]]:
        """(method, ratio) pairs: the baseline once at ratio 0, every other method at every ratio."""
        return [(m, 0.0) for m in self.methods if m == NO_COMPRESSION] + [
            (m, r) for m in self.methods if m != NO_COMPRESSION for r in self.ratios
        ]


PRESETS: dict[str, dict] = {
    # About 20 minutes on 2 CPU cores with the default model: 2 samples per task at 2k tokens
    # (3 samples took 29 minutes: docs/benchmarks.md).
    "quick": dict(
        lengths=(2048,),
        ratios=(0.5, 0.75, 0.9),
        samples=2,
        methods=(NO_COMPRESSION, "nestedkv", "keydiff", "snapkv", "streamingllm", "knorm", "expected-attention"),
    ),
    # The first measurement of docs/benchmarks.md: 4k tokens, four ratios, every method and ablation.
    "full": dict(lengths=(4096,), ratios=RATIOS, samples=20),
    # kvpress's public leaderboard: RULER at 4k, query-agnostic, its four ratios plus our two smallest
    # caches, every offline peer, the 13 tasks averaged as kvpress averages them (mean of task means).
    "leaderboard": dict(
        lengths=(4096,), ratios=(0.25, 0.5, 0.75, 0.875, 0.9, 0.95), samples=20,
        methods=(NO_COMPRESSION, "nestedkv", "nestedkv-paper", *PEERS),
    ),
    # Continuation loss and code completion on real documents (docs/benchmarks.md): low variance.
    "documents": dict(
        benchmark=DOCUMENTS, lengths=(2048,), ratios=(0.75, 0.875, 0.9, 0.95), samples=16,
        methods=(NO_COMPRESSION, "nestedkv", "nestedkv-paper", *PEERS),
    ),
}


def fitted_lengths(config: EvalConfig) -> tuple[int, ...]:
    """The context lengths (prompt and answer) the samples are built for: the local RULER lengths, or
    the length of kvpress's prebuilt RULER subset; none for the other hub benchmarks."""
    if config.benchmark in LOCAL_BENCHMARKS:
        return config.lengths
    return (int(config.subset),) if config.benchmark == "ruler" and config.subset else ()


def check_window(config: EvalConfig, window: int | None) -> None:
    """Refuse context lengths longer than the model's context window ``window`` (``None``: unknown),
    before any sample is built: the CLI checks this from the model's config before loading it."""
    for length in fitted_lengths(config):
        check_fits(length, window, f"context length {length}")


def load_samples(config: EvalConfig) -> list[Sample] | None:
    """The samples of a hub benchmark (``None`` for local RULER, which is built with the model's
    tokenizer), each requested task checked to be there. The CLI reads them before loading the
    model, so that a bad data file or an unreachable hub fails in seconds."""
    if config.benchmark in LOCAL_BENCHMARKS:
        return None
    samples = load_hub_samples(
        config.benchmark, config.subset, config.samples, data_files=config.data_files, seed=config.seed
    )
    found = {sample.task for sample in samples}
    missing = set(config.tasks or ()) - found
    if missing:
        source = config.data_files or f"{config.benchmark} {config.subset}"
        raise ValueError(f"no sample of task(s) {', '.join(sorted(missing))} in {source}; its tasks: {sorted(found)}")
    return samples


# --- nestedkv bench ----------------------------------------------------------------------------------

SCALING_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DECODE_LENGTHS = (8192, 32768)
LONG_DECODING_RATIO = 0.9
"""Compression ratio of the long-context decoding table: the small caches users compress for."""

RANDOM_SHAPES: dict[str, dict[str, object]] = {
    # The default model, SmolLM2-135M (30 layers, 3 KV heads of 64 dims), for machines without its file.
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000, tie_word_embeddings=True,
    ),
    # Llama-3.2-1B (16 layers, 8 KV heads of 64 dims).
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000, tie_word_embeddings=True,
    ),
    # A tiny Llama (2 layers, 4 heads over 2 KV heads of 16 dims) that the tests run the benchmark on.
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, max_position_embeddings=16384,
    ),
}
"""Llama shapes (``LlamaConfig`` arguments) that ``nestedkv bench --random-shape`` builds with random weights:
speed and memory do not depend on the weights, and nothing is downloaded."""


@dataclass(frozen=True)
class BenchSettings:
    """What ``nestedkv bench`` runs. Lengths are in tokens.

    length: the context of the memory and time table, for each of ``batch`` rows (random tokens,
    no padding). ratios: fractions of the KV removed.
    scaling_lengths: contexts of the scaling table; those up to ``verify_max_length`` are also
    prefilled for real to check the cache bytes. decode_lengths: contexts of the long-context decoding
    table (the scaling shape, caches replayed from random keys; empty: none). batched_rows: prompts of
    different lengths (from ``length`` down towards half of it, left-padded) generated together (0:
    none). decode_tokens: timed greedy steps (after
    ``warmup`` untimed ones). repeats / warmup: timed / untimed runs of each measurement.
    peak_memory: measure memory (on CPU in fresh processes: the slowest part). seed: of the token ids.
    compiled_score: also time ``NestedKVPress(compile_score=True)``'s score, and its first call (the compilation).
    """

    length: int = 2048
    batch: int = 1
    ratios: tuple[float, ...] = RATIOS
    scaling_lengths: tuple[int, ...] = SCALING_LENGTHS
    decode_lengths: tuple[int, ...] = DECODE_LENGTHS
    batched_rows: int = 8
    decode_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    verify_max_length: int = 4096
    peak_memory: bool = True
    seed: int = 0
    compiled_score: bool = False

    def __post_init__(self) -> None:
        if not self.ratios:
            raise ValueError("give at least one compression ratio")
        for ratio in self.ratios:
            check_ratio(ratio)
        config = NestedKVConfig()
        for length in (self.length, *self.scaling_lengths):
            check_context_length(length, config)
            for ratio in self.ratios:
                check_keeps_sinks(length, ratio, config.n_sink)
        for length in self.decode_lengths:
            check_context_length(length, config)
            check_keeps_sinks(length, LONG_DECODING_RATIO, config.n_sink)
        if len(set(self.scaling_lengths)) < 2:
            raise ValueError("give at least two different scaling lengths: the exponent is fitted across them")
        for name in ("batch", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.batched_rows < 0 or self.batched_rows > self.length // 2:
            raise ValueError(f"batched_rows must be between 0 and half the length, got {self.batched_rows}")


QUICK = BenchSettings(
    length=1024, ratios=(0.9,), scaling_lengths=(1024, 2048, 4096, 8192), decode_lengths=(), batched_rows=0,
    decode_tokens=8, repeats=1, verify_max_length=1024,
)
"""A short run: under two minutes on one CPU thread with the default model, loading included."""
