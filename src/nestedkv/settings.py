"""Every setting of nestedkv's presses, checked at construction, without torch.

The presses (:mod:`nestedkv.press`, :mod:`nestedkv.streaming`) inherit these dataclasses; the command
line builds them from its options before it imports torch, so that bad settings are refused in
milliseconds, with the same message the library gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nestedkv.validation import check_choice, check_number, check_ratio

SCALES = ("global", "block", "window")
"""The three anchors, slowest first: stable (global), episodic (block), current (sliding window)."""

MIXINGS = ("adaptive", "fixed", "uniform")
GATES = ("soft", "off", "max")
NORMALISATIONS = ("minmax", "rank")
POOLS = ("max", "mean")
SCORED_KEYS = ("cached", "pre-rope")
"""Which keys the press scores: as the cache holds them (rotated by RoPE, the paper's), or turned back to
before the rotation (:func:`nestedkv.press.rotary_of`, :func:`nestedkv.scoring.undo_rotary`)."""

PAPER_SETTINGS: dict[str, object] = {
    "n_recent": 0, "recency": 0.0, "value_weight": 0.0, "block_size": None, "scored_keys": "cached",
}
"""The switches whose shipped defaults differ from the paper's: ``NestedKVConfig(**PAPER_SETTINGS)``
scores exactly as the paper does. Why the shipped defaults differ: ``docs/tuning.md``."""


@dataclass
class NestedKVConfig:
    """Hyperparameters and switches of the NestedKV score. The defaults are the paper's except five,
    chosen on the benchmark's dev split (``docs/tuning.md``): the newest ``n_recent = 64`` positions
    are protected, a ``recency`` ramp favours later positions, the values' norms weigh in
    (``value_weight = 0.25``), blocks are of 64 positions at every length, and the keys are scored as
    they were before RoPE (``scored_keys = 'pre-rope'``); :data:`PAPER_SETTINGS` restores the paper's.

    scales: any non-empty subset of ``SCALES``. mixing: ``adaptive`` (the paper's
    ``softmax(log w0 + beta * gap)``), ``fixed`` (the prior ``w0``) or ``uniform``. gate: ``soft``
    (the paper's sigmoid gate), ``off`` (blend only) or ``max`` (always the winning scale).
    normalisation: ``minmax`` (the paper's) or ``rank``. block_size ``None`` is the paper's
    ``clip(N // 32, 128, 256)``. n_recent protects the last positions too (0 in the paper).
    recency: weight of a ramp that favours later positions,
    ``score = (a* + recency * i / (N - 1)) / (1 + recency)`` (0 in the paper). pool_size: each
    position's score becomes the ``pool`` (max or mean) of the scores of the ``pool_size`` positions
    centred on it (1 in the paper: no pooling), so that the neighbours of a salient key are kept with it.
    value_weight: weight of the min-max normalised value norms, blended in as the ramp is,
    ``score = (s + value_weight * v) / (1 + value_weight)`` (0 in the paper: keys only).
    scored_keys: one of :data:`SCORED_KEYS`; ``pre-rope`` scores each key as it was before the rotary
    position embedding, so that its cosines to the anchors compare content, not content and position
    (``cached`` in the paper). The press turns the keys back; :func:`~nestedkv.scoring.nestedkv_score`
    scores the keys it is given.
    """

    scales: tuple[str, ...] = SCALES
    mixing: str = "adaptive"
    gate: str = "soft"
    normalisation: str = "minmax"
    n_sink: int = 4
    n_recent: int = 64
    window: int = 64
    block_size: int | None = 64
    prior: tuple[float, float, float] = (0.4, 0.4, 0.2)
    beta: float = 3.0
    tau: float = 0.60
    kappa: float = 10.0
    gap_fraction: float = 0.10
    recency: float = 0.5
    pool_size: int = 1
    pool: str = "max"
    value_weight: float = 0.25
    scored_keys: str = "pre-rope"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.scales, str):
            self.scales = (self.scales,)
        self.scales = tuple(self.scales)
        if not self.scales:
            raise ValueError(f"scales must name at least one of {', '.join(SCALES)}")
        for scale in self.scales:
            check_choice("scale", scale, SCALES)
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales {self.scales} names a scale twice")
        # Canonical order keeps the prior aligned with the scales whatever order the user typed.
        self.scales = tuple(s for s in SCALES if s in self.scales)
        check_choice("mixing", self.mixing, MIXINGS)
        check_choice("gate", self.gate, GATES)
        check_choice("normalisation", self.normalisation, NORMALISATIONS)
        check_number("n_sink", self.n_sink, low=0, integer=True)
        check_number("n_recent", self.n_recent, low=0, integer=True)
        check_number("window", self.window, low=1, integer=True)
        if self.block_size is not None:
            check_number("block_size", self.block_size, low=1, integer=True)
        self.prior = tuple(self.prior)
        if len(self.prior) != len(SCALES):
            raise ValueError(f"prior must be three positive weights for {SCALES}, got {self.prior}")
        for weight in self.prior:
            check_number("prior", weight, low=0, low_open=True)
        check_number("beta", self.beta)
        check_number("tau", self.tau)
        check_number("kappa", self.kappa)
        check_number("gap_fraction", self.gap_fraction, low=0, high=0.5, low_open=True)
        check_number("recency", self.recency, low=0)
        check_number("pool_size", self.pool_size, low=1, integer=True)
        if self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd (a window centred on each position), got {self.pool_size}")
        check_choice("pool", self.pool, POOLS)
        check_number("value_weight", self.value_weight, low=0)
        check_choice("scored_keys", self.scored_keys, SCORED_KEYS)
        check_number("eps", self.eps, low=0, low_open=True)


def check_context_length(n: int, config: NestedKVConfig) -> None:
    """Raise a clear ``ValueError`` when N positions are too few for the configured score."""
    if n <= config.n_sink:
        raise ValueError(f"context of {n} tokens is not longer than the {config.n_sink} sink tokens")


# --- budgets --------------------------------------------------------------------------------------

BUDGETS = ("head-adaptive", "uniform")
"""How a layer's budget is shared: ``head-adaptive`` (AdaKV: heads compete for the layer's positions)
or ``uniform`` (the same count in every head)."""

STORAGES = ("ragged", "masked")
"""How unequal per-head budgets are held. ``ragged``: each head's kept positions are packed into
one buffer per layer (:class:`~nestedkv.cache.RaggedLayer`), so evicted memory is freed.
``masked``: kvpress's mechanism, every key is kept and evicted ones are hidden from attention by
fake keys during decoding (nothing is freed)."""


def compute_n_kept(n: int, compression_ratio: float) -> int:
    """Positions each head keeps on average out of ``n`` at ``compression_ratio``: ``int(n * (1 - r))``,
    at least 1 (kvpress's rule, so that every method of a comparison keeps the same count)."""
    return max(1, int(n * (1 - compression_ratio)))


def check_keeps_sinks(n: int, compression_ratio: float, n_sink: int) -> None:
    """Refuse a ratio that keeps fewer of ``n`` positions per head than the ``n_sink`` sinks, which are
    always kept (a recent window larger than the budget keeps its newest positions instead:
    :func:`~nestedkv.scoring.pin_protected`). A ratio set after construction (kvpress's
    ``PerLayerCompressionPress`` sets one per layer) is checked here too."""
    check_ratio(compression_ratio)
    n_kept = compute_n_kept(n, compression_ratio)
    if n_kept < n_sink:
        raise ValueError(
            f"compression_ratio {compression_ratio} keeps {n_kept} of {n} positions per head, "
            f"fewer than the {n_sink} sink positions that are always kept; lower the ratio or n_sink"
        )


@dataclass
class NestedKVSettings(NestedKVConfig):
    """What :class:`~nestedkv.press.NestedKVPress` takes beyond the ratio: the score's switches, the
    budget (one of :data:`BUDGETS`) with its safeguard, the storage (one of :data:`STORAGES`), how
    budgets differ across layers (``layer_budget``, :func:`layer_compression_ratio`; 0: they do not),
    and a recency ramp tied to the budget (``recency_over_kept``, :func:`ramp_weight`; 0: the ramp's
    weight is ``recency`` at every ratio)."""

    budget: str = "head-adaptive"
    alpha_safeguard: float = 0.20
    storage: str = "ragged"
    layer_budget: float = 0.0
    recency_over_kept: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("budget", self.budget, BUDGETS)
        check_number("alpha_safeguard", self.alpha_safeguard, low=0, high=1)
        check_choice("storage", self.storage, STORAGES)
        check_number("layer_budget", self.layer_budget, low=-1, high=1, low_open=True, high_open=True)
        check_number("recency_over_kept", self.recency_over_kept, low=0)

    @property
    def ratio_free_scores(self) -> bool:
        """Whether the scores are the same at every ratio (a benchmark may then score a sample once for all
        ratios): true unless the ramp is tied to the budget (``recency_over_kept``)."""
        return self.recency_over_kept == 0


def ramp_weight(recency: float, recency_over_kept: float, compression_ratio: float) -> float:
    """The recency ramp's weight at ``compression_ratio``: ``recency``, raised to
    ``recency_over_kept / (1 - r)`` where that is larger, so that the ramp grows as the kept share
    shrinks (``recency_over_kept = 0``: ``recency`` at every ratio).

    Why: on the dev split the continuation loss is U-shaped in the ramp's weight, with its bottom at
    about 0.5 while a head keeps an eighth or more and at about 2 when it keeps a twentieth
    (``docs/tuning.md``): the smaller the cache, the more of it the next tokens' nearby context should fill.
    """
    return max(recency, recency_over_kept / (1 - compression_ratio))


def layer_compression_ratio(compression_ratio: float, layer: int, layers: int, layer_budget: float) -> float:
    """The ratio of layer ``layer`` of ``layers`` when budgets differ across layers along a line.

    Layer ``l`` keeps ``1 + layer_budget * (1 - 2 l / (layers - 1))`` times the average share ``1 - r``:
    ``layer_budget`` > 0 gives the first layers more and the last ones less (PyramidKV's shape,
    arXiv 2406.02069), < 0 the reverse, 0 the same everywhere (the paper's). The shares average to
    ``1 - r`` unless a layer's would exceed the whole context, which it then keeps.
    """
    if layer_budget == 0 or layers == 1 or compression_ratio == 0:
        return compression_ratio
    kept = (1 - compression_ratio) * (1 + layer_budget * (1 - 2 * layer / (layers - 1)))
    return max(1 - kept, 0.0)


STREAM_RECENT = 64
"""Positions a stream keeps whatever their score (``NestedKVConfig.n_recent``): the paper compresses once,
before a question, with none protected; a stream that goes on generating needs its newest tokens. 64
(the window anchor's length) lowered the continuation loss at a budget of 256 from +0.144 to +0.031 nats
over the uncompressed cache on a development text (16: +0.082), measured apart from the reported one."""


STREAM_POOL = 9
"""Positions a stream's score is max-pooled over (``NestedKVConfig.pool_size``; among held keys, by position):
under the near-uniform per-head cap a stream keeps, a needle is a run of tokens whose key and value
must survive together. On development conversations (budget 512) 9 answered 19 of 96 multi-turn
questions (seeds 2000-2023) against 14 without pooling, 10 gained and 5 lost counting 24 single
needles (seeds 3000-3023), and left the development text's continuation loss unchanged
(docs/budgeted_cache.md, section 4)."""


DEFAULT_BUDGET = 512
"""Positions per KV head a budgeted cache keeps when given neither a budget nor a ratio."""


@dataclass
class BudgetedSettings:
    """What :class:`~nestedkv.streaming.BudgetedPress` takes.

    budget: positions per KV head (on average over a layer's heads) after each compression
    (:data:`DEFAULT_BUDGET` when neither it nor ``compression_ratio`` is given).
    compression_ratio: instead of a fixed budget, keep ``1 - compression_ratio`` of the tokens seen so
    far (kvpress's ``compute_n_kept`` rule, never fewer than the protected positions plus one): the
    cache then grows with the conversation, ``1 - r`` times as fast. Give one of the two.
    interval: decoding steps between compressions, the slack the cache may grow by.
    head_slack: how many more than ``budget`` one head may keep (head-adaptive budgets).
    config: NestedKV's switches; the default protects the newest :data:`STREAM_RECENT` positions and
    max-pools scores over :data:`STREAM_POOL` positions, with no recency ramp and the paper's block sizes
    (chosen for streams apart from the one-shot press: ``docs/budgeted_cache.md``), keys only, as cached.
    """

    budget: int | None = None
    compression_ratio: float | None = None
    interval: int = 16
    head_slack: int = 16
    alpha_safeguard: float = 0.20
    config: NestedKVConfig = field(default_factory=lambda: NestedKVConfig(
        n_recent=STREAM_RECENT, recency=0.0, pool_size=STREAM_POOL, block_size=None, value_weight=0.0,
        scored_keys="cached"))

    def __post_init__(self) -> None:
        if self.compression_ratio is None:
            self.budget = DEFAULT_BUDGET if self.budget is None else self.budget
            check_number("budget", self.budget, low=1, integer=True)
        elif self.budget is not None:
            raise ValueError("give a budget or a compression_ratio, not both")
        else:
            check_ratio(self.compression_ratio)
        check_number("interval", self.interval, low=1, integer=True)
        check_number("head_slack", self.head_slack, low=0, integer=True)
        check_number("alpha_safeguard", self.alpha_safeguard, low=0, high=1)
        if self.config.value_weight:
            raise ValueError("BudgetedPress scores keys only: value_weight must be 0 (NestedKVPress takes it)")
        if self.config.scored_keys != "cached":
            raise ValueError("BudgetedPress scores the keys as cached: scored_keys must be 'cached' (NestedKVPress "
                             "takes 'pre-rope')")
        protected = self.protected
        if self.budget is not None and self.budget <= protected:
            raise ValueError(f"budget {self.budget} must be above the {protected} sink + recent positions always kept")

    @property
    def protected(self) -> int:
        """Positions per head kept whatever their score: the sinks and the recent window."""
        return self.config.n_sink + self.config.n_recent

    def target(self, seen: int) -> int:
        """Positions per KV head a compression keeps after ``seen`` tokens: the budget, or ``1 - r`` of them."""
        if self.compression_ratio is None:
            return self.budget
        return max(compute_n_kept(seen, self.compression_ratio), self.protected + 1)
