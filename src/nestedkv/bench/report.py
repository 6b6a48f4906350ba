"""Turn a results store into Markdown tables and PNG plots.

Scores are in [0, 100]. A method's score at a ratio is the unweighted mean over tasks of the
per-task mean (RULER's headline); its 95 % confidence interval is Student's
``t * sqrt(sum_t s_t^2 / n_t) / T`` from the per-task sample standard deviations ``s_t``, with the
Welch-Satterthwaite degrees of freedom (shown only when every task has at least two samples): with the
few samples a CPU affords, the normal approximation's 1.96 would claim more than the data hold
(8 samples: 2.36). Results recorded as errors are left out of
the tables and listed after them, per method and ratio with the first error message.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from statistics import mean, median, stdev

from nestedkv.bench.documents import CODE_COMPLETION, CONTINUATION, CONTINUATION_TOKENS, DOCUMENTS
from nestedkv.bench.methods import NO_COMPRESSION
from nestedkv.bench.store import KEY_FIELDS, is_error, result_key, sample_key

T_DF_CAP = 1000
"""Degrees of freedom beyond which :func:`t_quantile_95` uses this many (its quantile is 1.962, within
0.2 % of the normal's 1.960)."""


def _t_two_sided_probability(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's T with integer ``df`` >= 1, by the finite series of Abramowitz and
    Stegun 26.7.3 and 26.7.4 (exact, no special functions)."""
    theta = math.atan(t / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 3 in the last power
        for k in range(1, (df - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + series)
    for k in range(1, df // 2):  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df - 2 in the last power
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


@cache
def t_quantile_95(df: float) -> float:
    """The ``t`` of a two-sided 95 % interval with ``df`` degrees of freedom (rounded down to an integer,
    which widens the interval; at least 1): 12.71 at 1, 2.36 at 7, 2.04 at 30."""
    df = max(1, min(int(df), T_DF_CAP))
    low, high = 0.0, 64.0  # the quantile at df = 1 is 12.7
    for _ in range(60):  # bisection to well below float32 precision
        middle = (low + high) / 2
        low, high = (middle, high) if _t_two_sided_probability(middle, df) < 0.95 else (low, middle)
    return (low + high) / 2


def welch_degrees_of_freedom(variances: list[float], counts: list[int]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of independent means with sample ``variances``
    ``s_t^2`` of ``counts`` ``n_t`` (each >= 2) samples: ``(sum_t v_t)^2 / sum_t (v_t^2 / (n_t - 1))`` with
    ``v_t = s_t^2 / n_t``.
    Where no mean varies, the pooled ``sum (n_t - 1)``."""
    spreads = [variance / count for variance, count in zip(variances, counts, strict=True)]
    denominator = sum(spread**2 / (count - 1) for spread, count in zip(spreads, counts, strict=True))
    return sum(spreads) ** 2 / denominator if denominator > 0 else sum(count - 1 for count in counts)


@dataclass(frozen=True)
class Cell:
    """Scores of one (method, ratio) over tasks: per-task sample scores."""

    scores: dict[str, list[float]]

    @property
    def n(self) -> int:
        """Samples of the task with the fewest."""
        return min(len(values) for values in self.scores.values())

    @property
    def samples_per_task(self) -> str:
        """``"3"``, or ``"2-3"`` when an interrupted run measured some tasks once more than others."""
        counts = sorted(len(values) for values in self.scores.values())
        return str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"

    @property
    def total(self) -> int:
        return sum(len(values) for values in self.scores.values())

    def minus(self, other: Cell) -> Cell:
        """Per-sample differences ``self - other`` over the same samples: a paired comparison, whose
        CI is far tighter than two overlapping CIs suggest when both methods fail on the same samples."""
        pairs = {task: zip(values, other.scores[task], strict=True) for task, values in self.scores.items()}
        return Cell({task: [a - b for a, b in pair] for task, pair in pairs.items()})

    def task_mean(self, task: str) -> float:
        return mean(self.scores[task])

    @property
    def mean(self) -> float:
        return mean(self.task_mean(task) for task in self.scores)

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95 % interval of :attr:`mean` (Student's t, Welch-Satterthwaite degrees of
        freedom), from the per-task sample variances. With one sample per task there is no spread within
        a task: the tasks' scores are then taken as draws from the task mix, whose spread (between tasks
        too) gives a wider, conservative interval (``T - 1`` degrees of freedom). ``None`` when neither
        applies (one sample in all, or an interrupted run that measured some tasks once and others more)."""
        if self.n >= 2:
            variances = [stdev(values) ** 2 for values in self.scores.values()]
            counts = [len(values) for values in self.scores.values()]
            spread = math.sqrt(sum(v / n for v, n in zip(variances, counts, strict=True))) / len(self.scores)
            return t_quantile_95(welch_degrees_of_freedom(variances, counts)) * spread
        if len(self.scores) >= 2 and self.total == len(self.scores):
            spread = stdev(self.task_mean(task) for task in self.scores) / math.sqrt(len(self.scores))
            return t_quantile_95(len(self.scores) - 1) * spread
        return None


def collect(records: Iterable[dict], field: str = "score") -> tuple[dict[tuple[str, float], Cell], list[str]]:
    """Group records' ``field`` by (method, ratio). Only samples measured for *every* (method, ratio)
    are kept, so that every cell compares the same samples; returns the cells and the sorted task names.
    Records without ``field`` (measured before it existed) are left out as errors are."""
    records = list(records)
    by_job: dict[tuple[str, float], dict[tuple, float]] = defaultdict(dict)
    for record in records:
        if is_error(record) or record.get(field) is None:  # failed on this sample (see its "error"), or older
            continue
        by_job[record["method"], record["ratio"]][sample_key(record)] = record[field]
    if not by_job and records and all(is_error(record) for record in records):
        first = records[0].get("error") or "no score"
        raise ValueError(f"every result in the store is an error (the first: {first}); `nestedkv eval` retries them")
    if not by_job and records:
        raise ValueError(f"no result in the store has a {field}: it was measured before `nestedkv eval` recorded it")
    if not by_job:
        raise ValueError("the results store is empty: run `nestedkv eval` first")
    common = set.intersection(*(set(samples) for samples in by_job.values()))
    if not common:
        raise ValueError("no sample has been measured with every (method, ratio) yet")
    task_of = KEY_FIELDS.index("task")  # position of the task in a sample key (method and ratio come later)
    tasks = sorted({sample[task_of] for sample in common})
    cells = {}
    for job, samples in by_job.items():
        per_task: dict[str, list[float]] = {task: [] for task in tasks}
        for sample in sorted(common, key=repr):
            per_task[sample[task_of]].append(samples[sample])
        cells[job] = Cell(per_task)
    return cells, tasks


def _methods_and_ratios(cells: dict[tuple[str, float], Cell]) -> tuple[list[str], list[float]]:
    methods = list(dict.fromkeys(method for method, _ in cells))  # insertion order = run order
    ratios = sorted({ratio for method, ratio in cells if method != NO_COMPRESSION})
    return methods, ratios


def _cell_at(cells: dict[tuple[str, float], Cell], method: str, ratio: float) -> Cell | None:
    """``method``'s cell at ``ratio``; the baseline's (measured once, at ratio 0) at any ratio."""
    return cells.get((method, 0.0 if method == NO_COMPRESSION else ratio))


def errors(records: Iterable[dict]) -> dict[tuple[str, float], list[str]]:
    """The error messages of the results recorded only as errors (none measured successfully since),
    per (method, ratio), in file order."""
    records = list(records)
    done = {result_key(record) for record in records if not is_error(record)}
    failed: dict[tuple, str] = {}
    for record in records:
        if is_error(record) and result_key(record) not in done:
            failed.setdefault(result_key(record), record.get("error") or "no score recorded")
    by_job: dict[tuple[str, float], list[str]] = defaultdict(list)
    for key, message in failed.items():
        by_job[key[KEY_FIELDS.index("method")], key[KEY_FIELDS.index("ratio")]].append(message)
    return dict(by_job)


def errors_markdown(failed: dict[tuple[str, float], list[str]], cells: dict[tuple[str, float], Cell]) -> str:
    """A table of the errors per (method, ratio) with the first message; the methods that have nothing
    but errors are named, as they are absent from every other table."""
    if not failed:
        return ""
    lines = ["", "Errors, left out of the tables above (`nestedkv eval` measures them again on its next run):", ""]
    only_errors = sorted({method for method, _ in failed} - {method for method, _ in cells})
    if only_errors:
        lines += [f"No result yet for {', '.join(only_errors)}: every measurement of it failed.", ""]
    lines += ["| method | ratio | errors | first error |", "|---|---:|---:|---|"]
    for (method, ratio), messages in failed.items():
        first = " ".join(messages[0].split())[:200].replace("|", "\\|")
        lines.append(f"| {method} | {ratio} | {len(messages)} | {first} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Measure:
    """What a table shows: a record field, what it is (``{tasks}``: the number of tasks), its unit,
    its decimals, and which way is better."""

    field: str = "score"
    description: str = "score over {tasks} tasks"
    unit: str = "0-100"
    digits: int = 1
    higher_is_better: bool = True


SCORE = Measure()
_NEXT = f"on the next {CONTINUATION_TOKENS} tokens"
DOCUMENT_MEASURES = {
    CONTINUATION: (
        Measure("score", f"top-1 agreement with the uncompressed model {_NEXT}", "%"),
        Measure("delta_nll", f"NLL increase over the uncompressed cache {_NEXT}", "nats/token, lower is better",
                digits=3, higher_is_better=False),
    ),
    CODE_COMPLETION: (Measure("score", "next-line edit similarity, LongBench's LCC"),),
}
"""The documents benchmark's tasks measure different things: each gets its own tables."""

ANSWER_NLL = Measure(
    "answer_nll", "NLL of the reference answer, teacher-forced after the question, over {tasks} tasks",
    "nats/token, lower is better", digits=3, higher_is_better=False,
)
"""What a generated answer's record also carries since 2026-11-29 (``runner.answer_nll``): reported for the
records that have it."""


def answer_nll_cells(records: list[dict]) -> tuple[dict[tuple[str, float], Cell], list[str]] | None:
    """:func:`collect` of :data:`ANSWER_NLL` over the records that carry it; ``None`` when none does."""
    if all(record.get(ANSWER_NLL.field) is None for record in records):
        return None
    return collect(records, ANSWER_NLL.field)


def answer_nll_markdown(
    cells_and_tasks: tuple[dict[tuple[str, float], Cell], list[str]] | None, title: str, against: str | None = None
) -> str:
    """The :data:`ANSWER_NLL` tables (:func:`answer_nll_cells`) under ``title``; empty without them."""
    if cells_and_tasks is None:
        return ""
    return f"\n## {title}\n\n" + markdown_tables(*cells_and_tasks, ANSWER_NLL, against)


def _format(cell: Cell | None, sign: str = "", digits: int = 1) -> str:
    if cell is None:
        return "–"
    ci = cell.ci95
    return f"{cell.mean:{sign}.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def _format_difference(difference: Cell, digits: int) -> str:
    """A paired difference as :func:`_format` writes it, in bold where its interval excludes zero: decided on the
    unrounded values, since a difference and its interval often round to the same last digit."""
    text = _format(difference, "+", digits)
    ci = difference.ci95
    return f"**{text}**" if ci is not None and abs(difference.mean) > ci else text


REFERENCES = ("nestedkv", "nestedkv-paper")
"""The method every other is paired with and drawn against unless the report names one (``against``):
the shipped NestedKV, else the paper's."""


def _reference(cells: dict[tuple[str, float], Cell], against: str | None = None) -> str | None:
    if against is not None:
        return against
    return next((ref for ref in REFERENCES if any(method == ref for method, _ in cells)), None)


def markdown_tables(
    cells: dict[tuple[str, float], Cell], tasks: list[str], measure: Measure = SCORE, against: str | None = None
) -> str:
    """A mean table (method × ratio, with CI), the paired differences of NestedKV (or of ``against``) to
    every other method, and one per-task table per ratio (when there are several tasks)."""
    methods, ratios = _methods_and_ratios(cells)
    any_cell = next(iter(cells.values()))  # every cell holds the same samples (see collect)
    n = any_cell.samples_per_task
    digits = measure.digits
    format_cell = partial(_format, digits=digits)
    lines = [
        f"Mean {measure.description.format(tasks=len(tasks))} ({measure.unit}, ± 95 % CI, Student's t), "
        f"{n} sample(s) per task, {any_cell.total} samples per cell; the same samples in every cell.",
        "",
    ]
    if not ratios:  # nothing compressed has a score yet: the baseline alone, said so
        return "\n".join([
            *lines, "| method | score |", "|---|---:|", f"| {NO_COMPRESSION} (r=0) | {format_cell(any_cell)} |", "",
            "Only the uncompressed baseline has results so far: no compressed method to compare with yet.",
        ]) + "\n"
    lines += [
        "| method | " + " | ".join(f"r={r}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for method in methods:
        if method == NO_COMPRESSION:
            lines.append(f"| {method} (r=0) | " + " | ".join([format_cell(cells[method, 0.0])] * len(ratios)) + " |")
        else:
            lines.append(f"| {method} | " + " | ".join(format_cell(cells.get((method, r))) for r in ratios) + " |")
    reference = _reference(cells, against)
    if reference:
        better = "higher" if measure.higher_is_better else "higher, i.e. worse"
        lines += [
            "",
            f"{reference} minus each method, paired on the same samples (± 95 % CI of the paired differences, in "
            f"bold where it excludes zero; positive: {reference}'s is {better}):",
            "",
            "| method | " + " | ".join(f"r={r}" for r in ratios) + " |",
            "|---|" + "---:|" * len(ratios),
        ]
        for method in methods:
            if method == reference:
                continue
            row = []
            for ratio in ratios:
                ours, theirs = cells.get((reference, ratio)), _cell_at(cells, method, ratio)
                row.append(_format_difference(ours.minus(theirs), digits) if ours and theirs else "–")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    for ratio in ratios if len(tasks) > 1 else ():
        lines += ["", f"Per task at r={ratio} (mean of {n} sample(s) each):", ""]
        lines.append("| method | " + " | ".join(tasks) + " | mean |")
        lines.append("|---|" + "---:|" * (len(tasks) + 1))
        for method in methods:
            cell = _cell_at(cells, method, ratio)
            if cell is None:
                continue
            row = " | ".join(f"{cell.task_mean(task):.{max(digits - 1, 0)}f}" for task in tasks)
            lines.append(f"| {method} | {row} | {cell.mean:.{digits}f} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use so that the package
    does not pay for it at start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_vs_ratio(cells: dict[tuple[str, float], Cell], path: Path, against: str | None = None) -> None:
    """Mean score against compression ratio in two panels: NestedKV against the other methods, and
    against its own ablations (``nestedkv-*``). NestedKV is drawn in both with its 95 % CI band, the
    baseline as a dashed line."""
    plt = _pyplot()

    methods, ratios = _methods_and_ratios(cells)
    reference = _reference(cells, against)
    others = [m for m in methods if m not in (NO_COMPRESSION, reference)]
    panels = [
        ("NestedKV and its peers", [m for m in others if not m.startswith("nestedkv-")]),
        ("NestedKV and its ablations", [m for m in others if m.startswith("nestedkv-")]),
    ]
    panels = [panels[0]] + [panel for panel in panels[1:] if panel[1]]  # no empty ablation panel
    figure, all_axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True, squeeze=False)
    all_axes = all_axes[0]
    for axes, (title, compared) in zip(all_axes, panels, strict=True):
        if (NO_COMPRESSION, 0.0) in cells:
            axes.axhline(cells[NO_COMPRESSION, 0.0].mean, color="black", linestyle="--", label="no compression")
        measured = [r for r in ratios if (reference, r) in cells]
        if measured:
            means = [cells[reference, r].mean for r in measured]
            axes.plot(measured, means, marker="o", linewidth=2.5, color="crimson", label=reference, zorder=3)
            cis = [cells[reference, r].ci95 for r in measured]
            if None not in cis:
                low = [m - ci for m, ci in zip(means, cis, strict=True)]
                high = [m + ci for m, ci in zip(means, cis, strict=True)]
                axes.fill_between(measured, low, high, color="crimson", alpha=0.12, label=f"{reference} 95 % CI")
        for index, method in enumerate(compared, start=1):
            measured = [r for r in ratios if (method, r) in cells]
            color, marker = plt.get_cmap("tab10")(index % 10), "os^vD<>ph*"[index % 10]
            means = [cells[method, r].mean for r in measured]
            axes.plot(measured, means, marker=marker, linewidth=1, color=color, label=method)
        axes.set_title(title)
        axes.set_xlabel("compression ratio (fraction of KV removed)")
        axes.set_xticks(ratios)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    all_axes[0].set_ylabel("mean score over tasks")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_task_heatmap(
    cells: dict[tuple[str, float], Cell], tasks: list[str], ratio: float | None, path: Path
) -> None:
    """Per-task mean score of every method at one ratio (``None``: nothing compressed measured, the
    baseline alone), as a task × method heat map."""
    plt = _pyplot()

    methods = [m for m in _methods_and_ratios(cells)[0] if _cell_at(cells, m, ratio) is not None]
    grid = [[_cell_at(cells, m, ratio).task_mean(t) for m in methods] for t in tasks]
    figure, axes = plt.subplots(figsize=(1 + 0.6 * len(methods), 1 + 0.4 * len(tasks)))
    image = axes.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(tasks)), tasks, fontsize=8)
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            axes.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=6,
                      color="white" if value < 50 else "black")
    title = "baseline only" if ratio is None else f"score per task at r={ratio} (baseline at r=0)"
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    records: Iterable[dict], out: Path, heatmap_ratio: float | None = None, against: str | None = None,
    methods: Sequence[str] | None = None,
) -> str:
    """Write ``report.md``, ``score_vs_ratio.png``, ``score_vs_cost.png`` (when the records carry
    times; ``answer_nll_vs_cost.png`` too when they carry the answer NLL) and ``task_heatmap.png`` into
    ``out``; return the Markdown. ``against``: the method every other is paired with and drawn against
    (default: :data:`REFERENCES`). ``methods``: report only these (and the uncompressed baseline), so
    that the samples they all have count even where other methods of the store were not measured."""
    records = list(records)
    measured = sorted({record["method"] for record in records} - {NO_COMPRESSION})
    if against is not None and against not in measured:
        raise ValueError(f"--against {against}: no results for it in this store; measured: {', '.join(measured)}")
    if methods is not None:
        missing = [method for method in methods if method not in {*measured, NO_COMPRESSION}]
        if missing:
            raise ValueError(
                f"--methods {','.join(missing)}: no results in this store; measured: {', '.join(measured)}"
            )
        if against is not None and against not in methods:
            raise ValueError(f"--against {against} is not among --methods; add it there")
        records = [record for record in records if record["method"] in {*methods, NO_COMPRESSION}]
    if records and all(record.get("benchmark") == DOCUMENTS for record in records):
        return _write_documents_report(records, out, against)
    cells, tasks = collect(records)
    _, ratios = _methods_and_ratios(cells)
    if heatmap_ratio is None:
        heatmap_ratio = 0.9 if 0.9 in ratios else ratios[-1] if ratios else None
    elif heatmap_ratio not in ratios:
        raise ValueError(f"no results at ratio {heatmap_ratio}; measured ratios: {ratios}")
    out.mkdir(parents=True, exist_ok=True)
    costs = prefill_costs(records)
    nll = answer_nll_cells(records)
    text = markdown_tables(cells, tasks, against=against) + answer_nll_markdown(nll, ANSWER_NLL.field, against)
    text += cost_markdown(costs)
    text += errors_markdown(errors(records), cells)
    (out / "report.md").write_text(text, encoding="utf-8")
    plot_score_vs_ratio(cells, out / "score_vs_ratio.png", against)
    plot_quality_vs_cost(cells, costs, SCORE, out / "score_vs_cost.png", against)
    if nll is not None:
        plot_quality_vs_cost(nll[0], costs, ANSWER_NLL, out / "answer_nll_vs_cost.png", against)
    plot_task_heatmap(cells, tasks, heatmap_ratio, out / "task_heatmap.png")
    return text


def prefill_costs(records: list[dict]) -> dict[str, tuple[float, int]]:
    """What each method's cache costs to build from the context, as a multiple of the uncompressed
    prefill of the same sample: ``(median over samples of the most expensive ratio, samples)``
    (ratio-free scorers pay their scoring at the first ratio only). Empty when no record has times.

    The uncompressed prefill is the one timed in the same run as the record
    (``uncompressed_prefill_seconds``), so that methods added to a store later, on a machine that is
    faster or busier that day, are not compared with another day's baseline; records written before
    that field existed fall back on the uncompressed record's time."""
    timed = [r for r in records if not is_error(r) and r.get("prefill_seconds")]
    baseline = {sample_key(r): r["prefill_seconds"] for r in timed if r["method"] == NO_COMPRESSION}
    worst: dict[str, dict[tuple, float]] = defaultdict(dict)
    for record in timed:
        sample = sample_key(record)
        uncompressed = record.get("uncompressed_prefill_seconds") or baseline.get(sample)
        if record["method"] != NO_COMPRESSION and uncompressed:
            cost = record["prefill_seconds"] / uncompressed
            worst[record["method"]][sample] = max(cost, worst[record["method"]].get(sample, 0.0))
    return {method: (median(costs.values()), len(costs)) for method, costs in worst.items()}


def cost_markdown(costs: dict[str, tuple[float, int]]) -> str:
    """The table of :func:`prefill_costs`; empty when there is none."""
    if not costs:
        return ""
    lines = [
        "", "Cost of the compressed cache, × the uncompressed prefill of the same sample (median over samples "
        "of the most expensive ratio; prefill plus scoring, or the method's own prefill):", "",
        "| method | prefill cost | samples |", "|---|---:|---:|",
    ]
    lines += [f"| {method} | {cost:.2f}× | {samples} |" for method, (cost, samples) in costs.items()]
    return "\n".join(lines) + "\n"


def plot_quality_vs_cost(
    cells: dict[tuple[str, float], Cell], costs: dict[str, tuple[float, int]], measure: Measure, path: Path,
    against: str | None = None,
) -> None:
    """One panel per ratio: each method's mean ``measure`` against what building its cache cost
    (:func:`prefill_costs`, log scale), so that a method that re-reads the context is seen next to
    what its extra compute buys. Nothing is drawn without costs."""
    methods, ratios = _methods_and_ratios(cells)
    drawn = [m for m in methods if m in costs]
    if not drawn or not ratios:
        return
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plt = _pyplot()

    reference = _reference(cells, against)
    figure, axes = plt.subplots(1, len(ratios), figsize=(4.5 * len(ratios), 4.5), squeeze=False)
    for panel, ratio in zip(axes[0], ratios, strict=True):
        here = {m: cells[m, ratio].mean for m in drawn if (m, ratio) in cells}
        # names only where they can be read: ours, the costly, and the three best at this ratio
        best = sorted(here, key=here.get, reverse=measure.higher_is_better)[:3]
        for method, value in here.items():
            ours = method == reference
            panel.scatter(costs[method][0], value, s=40 if ours else 14, color="crimson" if ours else "tab:blue",
                          zorder=3 if ours else 2)
            if ours or method in best or costs[method][0] > 1.5:
                panel.annotate(method, (costs[method][0], value), fontsize=7, xytext=(3, 2), textcoords="offset points")
        panel.set_xscale("log")
        panel.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        panel.xaxis.set_minor_formatter(NullFormatter())
        panel.set_title(f"r = {ratio}")
        panel.set_xlabel("cost of the cache (× uncompressed prefill)")
        panel.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{measure.field} ({measure.unit})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_documents_report(records: list[dict], out: Path, against: str | None = None) -> str:
    """The documents benchmark's ``report.md``: per task, one table per measure; per task a
    score-vs-ratio plot (``score_vs_ratio_<task>.png``) and its headline measure against the cost
    of the cache (``<measure>_vs_cost_<task>.png``)."""
    out.mkdir(parents=True, exist_ok=True)
    sections, costs = [], prefill_costs(records)
    for task, measures in DOCUMENT_MEASURES.items():
        task_records = [record for record in records if record["task"] == task]
        if not task_records:
            continue
        cells_of = {measure.field: collect(task_records, measure.field) for measure in measures}
        for measure in measures:
            cells, tasks = cells_of[measure.field]
            sections.append(f"## {task}: {measure.field}\n\n" + markdown_tables(cells, tasks, measure, against))
        plot_score_vs_ratio(cells_of["score"][0], out / f"score_vs_ratio_{task}.png", against)
        headline = measures[-1]  # delta_nll for continuation, the score otherwise
        plot_quality_vs_cost(cells_of[headline.field][0], costs, headline,
                             out / f"{headline.field}_vs_cost_{task}.png", against)
        nll_tables = answer_nll_markdown(answer_nll_cells(task_records), f"{task}: {ANSWER_NLL.field}", against)
        if nll_tables:
            sections.append(nll_tables)
    text = "\n".join(sections) + cost_markdown(costs) + errors_markdown(errors(records), collect(records)[0])
    (out / "report.md").write_text(text, encoding="utf-8")
    return text
