"""Loaders for the hub benchmarks of the paper: kvpress's prebuilt RULER data, LongBench,
LongBench-E, LooGLE and InfiniteBench, turned into the project's ``Sample`` records.

The data are kvpress's prebuilt Hugging Face datasets (the ``DATASET_REGISTRY`` of kvpress's
``evaluation/evaluate_registry.py``), which already split every prompt into ``context`` /
``question`` / ``answer_prefix`` and carry the reference answers and ``max_new_tokens`` (kvpress's
``create_huggingface_dataset.py`` of each benchmark builds them):

============== ======================== ======================================================
benchmark      dataset                  subset (the dataset's ``data_dir``)
============== ======================== ======================================================
ruler          simonjegou/ruler         the context length: 4096, 8192, 16384 (13 tasks each)
longbench      Xnhyacinth/LongBench     one of LongBench's 21 tasks
longbench-e    Xnhyacinth/LongBench     ``<task>_e``, one of LongBench-E's 13 English tasks
loogle         simonjegou/loogle        shortdep_qa, longdep_qa, shortdep_cloze, longdep_summarization
infinitebench  MaxJeblick/InfiniteBench one of 11 tasks (longbook_sum_eng is left out, as kvpress
                                        does not score it)
============== ======================== ======================================================

The hub is reached only when ``load_hub_samples`` is called without ``data_files``; with
``data_files`` a local parquet / jsonl / json file with the same columns is read instead (through
``datasets`` as well). Nothing is fetched at import time.

Scores follow each benchmark's own scorer (see ``nestedkv.bench.metrics``): RULER's string match,
LongBench's per-task metric, ROUGE-L recall or cloze exact match for LooGLE, InfiniteBench's
per-task scorers.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nestedkv.bench.ruler import Sample
from nestedkv.files import check_readable
from nestedkv.validation import check_choice

HUB_DATASETS: dict[str, str] = {
    "ruler": "simonjegou/ruler",
    "longbench": "Xnhyacinth/LongBench",
    "longbench-e": "Xnhyacinth/LongBench",
    "loogle": "simonjegou/loogle",
    "infinitebench": "MaxJeblick/InfiniteBench",
}
"""The Hugging Face dataset of each benchmark, as kvpress's evaluation registry names it."""

BENCHMARKS: tuple[str, ...] = tuple(HUB_DATASETS)

RULER_LENGTHS: tuple[str, ...] = ("4096", "8192", "16384")
"""The context lengths (configurations) of simonjegou/ruler."""

LONGBENCH_METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1_score",
    "qasper": "qa_f1_score",
    "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score",
    "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score",
    "dureader": "rouge_zh_score",
    "gov_report": "rouge_score",
    "qmsum": "rouge_score",
    "multi_news": "rouge_score",
    "vcsum": "rouge_zh_score",
    "trec": "classification_score_first_line",
    "triviaqa": "qa_f1_score_first_line",
    "samsum": "rouge_score_first_line",
    "lsht": "classification_score_first_line",
    "passage_count": "count_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_retrieval_zh": "retrieval_zh_score",
    "lcc": "code_sim_score",
    "repobench-p": "code_sim_score",
}
"""LongBench's ``dataset2metric``; trec, triviaqa, samsum and lsht score the first line only."""

LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
"""The tasks of LongBench-E (uniformly spread lengths); their subsets are ``<task>_e``."""

LOOGLE_METRICS: dict[str, str] = {
    "shortdep_qa": "rouge_l_recall",
    "longdep_qa": "rouge_l_recall",
    "shortdep_cloze": "cloze_exact_match",
    "longdep_summarization": "rouge_l_recall",
}

INFINITEBENCH_METRICS: dict[str, str] = {
    "passkey": "infinitebench_first_int",
    "kv_retrieval": "infinitebench_kv_retrieval",
    "number_string": "infinitebench_first_int",
    "code_run": "infinitebench_code_run",
    "code_debug": "infinitebench_code_debug",
    "math_find": "infinitebench_math_find",
    "math_calc": "infinitebench_math_calc",
    "longbook_qa_eng": "qa_f1_score",
    "longdialogue_qa_eng": "infinitebench_longdialogue_qa",
    "longbook_choice_eng": "infinitebench_choice",
    "longbook_qa_chn": "qa_f1_zh_char_score",
}

_E_SUFFIX = re.compile(r"[_-]e$")
# The four options that end InfiniteBench's multiple-choice questions, as kvpress's prompt writes them.
_OPTIONS = re.compile(r"\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\Z")
_CHOICE_TASKS = ("code_debug", "longbook_choice_eng")
_PROMPT_COLUMNS = ("context", "question", "answer_prefix", "max_new_tokens")


@dataclass(frozen=True)
class HubSample(Sample):
    """A ``Sample`` with what LongBench's scores need besides the answers.

    ``all_classes`` are the classes of LongBench's classification tasks (trec, lsht), to pass to
    ``score_sample(..., all_classes=sample.all_classes)``; ``length`` is LongBench's word count of
    the context, which LongBench-E's score splits into ``longbench_e_bucket`` groups.
    """

    all_classes: tuple[str, ...] = ()
    length: int | None = None


def subsets(benchmark: str) -> tuple[str, ...]:
    """The subsets of ``benchmark``: RULER's context lengths, or the tasks of the others."""
    tables = {
        "ruler": RULER_LENGTHS,
        "longbench": tuple(LONGBENCH_METRICS),
        "longbench-e": tuple(f"{task}_e" for task in LONGBENCH_E_TASKS),
        "loogle": tuple(LOOGLE_METRICS),
        "infinitebench": tuple(INFINITEBENCH_METRICS),
    }
    return tables[check_choice("benchmark", benchmark, BENCHMARKS)]


def resolve_subset(benchmark: str, name: str) -> str:
    """The subset ``name`` (a subset argument or a row's ``task``) stands for, checked;
    LongBench-E accepts ``qasper``, ``qasper_e`` or ``qasper-e`` for ``qasper_e``."""
    if benchmark == "longbench-e":
        name = _E_SUFFIX.sub("", name) + "_e"
    choices = subsets(benchmark)
    return check_choice(f"{benchmark} subset", name, choices)


def metric_for(benchmark: str, task: str) -> str:
    """The metric (a ``nestedkv.bench.metrics.METRICS`` name) that scores ``task`` of ``benchmark``."""
    if benchmark == "ruler":
        return "string_match_part" if task.split("_")[0] == "qa" else "string_match_all"
    if benchmark in ("longbench", "longbench-e"):
        return LONGBENCH_METRICS[_E_SUFFIX.sub("", task)]
    return (LOOGLE_METRICS if benchmark == "loogle" else INFINITEBENCH_METRICS)[task]


def longbench_e_bucket(length: int) -> str:
    """LongBench-E's length group of a sample: ``0-4k``, ``4-8k`` or ``8k+`` (words)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


@contextlib.contextmanager
def _quiet_loading(progress_bars: bool) -> Iterator[None]:
    """``datasets`` logs a parse error before raising it, and ``huggingface_hub`` logs every retry:
    the error this module raises says it all, in one line."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    levels = datasets.logging.get_verbosity(), hub_logging.get_verbosity()
    bars = datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    hub_logging.set_verbosity(logging.CRITICAL)
    if not progress_bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        if bars:
            datasets.enable_progress_bars()


def _read_rows(benchmark: str, subset: str | None, data_files: str | None) -> list[dict[str, Any]]:
    """The rows of the local file, or of the hub dataset's ``subset`` (``data_dir``) test split."""
    import datasets
    import httpx

    if data_files is not None:
        return _read_local_rows(data_files)
    repository = HUB_DATASETS[benchmark]
    try:
        with _quiet_loading(progress_bars=True):
            return list(datasets.load_dataset(repository, data_dir=subset, split="test"))
    except (ConnectionError, TimeoutError, httpx.TransportError) as error:
        raise ConnectionError(
            f"cannot reach the Hugging Face hub to load {repository} ({subset}); "
            f"pass data_files=... (--data-files at the command line: a local parquet/jsonl file with the same "
            f"columns) or connect"
        ) from error


def _read_local_rows(path: str) -> list[dict[str, Any]]:
    import datasets

    if check_readable(path, "data file").stat().st_size == 0:
        raise ValueError(f"data file {path} is empty")
    builder = "parquet" if path.endswith(".parquet") else "json"
    try:
        with _quiet_loading(progress_bars=False):
            rows = list(datasets.load_dataset(builder, data_files=path, split="train"))
    except Exception as error:  # a parser's error on the user's file (pyarrow's, datasets' own): name the file
        reason = " ".join(str(error.__cause__ or error).split()) or type(error).__name__
        kind = "parquet" if builder == "parquet" else "JSON / JSON lines"
        raise ValueError(f"cannot read data file {path} as {kind}: {reason}") from error
    if not rows:
        raise ValueError(f"data file {path} holds no rows")
    return rows


def _check_rows(rows: list[dict[str, Any]], source: str, needs_task: bool) -> None:
    """Refuse rows that lack a field a sample needs, naming the row (1-based) and the field, before
    any is measured. In a JSON-lines file a row without a field reads as that field null."""
    answer = "answers" if "answers" in rows[0] else "answer"
    required = (*_PROMPT_COLUMNS, answer, *(("task",) if needs_task else ()))
    missing = [column for column in required if column not in rows[0]]
    if missing:
        raise ValueError(f"{source} lacks columns {missing}; its columns are {sorted(rows[0])}")
    for number, row in enumerate(rows, start=1):
        for column in required:
            if row[column] is None:
                raise ValueError(f"{source}: row {number} has no value for {column!r}")
        tokens = row["max_new_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{source}: row {number}: max_new_tokens must be a positive integer, got {tokens!r}")


def _answers(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The reference answers of a row (``answers`` in LongBench, ``answer`` elsewhere)."""
    value = row.get("answers", row.get("answer"))
    return (value,) if isinstance(value, str) else tuple(str(answer) for answer in value)


def _choice_answers(task: str, row: Mapping[str, Any], letters: tuple[str, ...]) -> tuple[str, ...]:
    """InfiniteBench's label of a multiple-choice row: (the right option's text, its letter). The
    hub keeps only the letter; the option is read back from the A-D list ending the question."""
    match = _OPTIONS.search(row["question"] or row["context"])
    if match is None or len(letters) != 1 or letters[0] not in ("A", "B", "C", "D"):
        raise ValueError(f"{task} row needs one answer letter A-D and the A-D options ending its question")
    return match.group("ABCD".index(letters[0]) + 1), letters[0]


def _row_task(benchmark: str, subset: str | None, row: Mapping[str, Any]) -> str:
    """The task of a row: RULER's ``task`` column, else the subset, else the (resolved) ``task`` column."""
    if benchmark == "ruler":
        return str(row["task"])
    return subset if subset is not None else resolve_subset(benchmark, str(row["task"]))


def _to_sample(benchmark: str, task: str, index: int, row: Mapping[str, Any]) -> HubSample:
    answers = _answers(row)
    if benchmark == "infinitebench" and task in _CHOICE_TASKS:
        answers = _choice_answers(task, row, answers)
    length = row.get("length")
    return HubSample(
        task=task,
        index=index,
        context=row["context"],
        question=row["question"],
        answer_prefix=row["answer_prefix"],
        answers=answers,
        max_new_tokens=row["max_new_tokens"],
        metric=metric_for(benchmark, task),
        all_classes=tuple(row.get("all_classes") or ()),
        length=None if length is None else int(length),
    )


def load_hub_samples(
    benchmark: str,
    subset: str | None,
    n: int | None = None,
    *,
    data_files: str | None = None,
    seed: int = 0,
) -> list[HubSample]:
    """Samples of one hub benchmark subset, in dataset order, grouped by task.

    ``benchmark`` is one of ``BENCHMARKS``; ``subset`` one of ``subsets(benchmark)`` (RULER's
    context length, or the task). ``n`` keeps at most ``n`` samples per task, drawn with ``seed``
    (the samples kept for a smaller ``n`` are among those kept for a larger one); ``None`` keeps
    all. ``Sample.index`` is the row's position among its task's rows.

    Without ``data_files`` the subset is loaded from the Hugging Face hub (``HUB_DATASETS``);
    ``data_files`` names a local parquet / jsonl / json file with the hub dataset's columns
    (``context``, ``question``, ``answer_prefix``, ``answer`` or ``answers``, ``max_new_tokens``,
    and ``task`` for RULER), and then ``subset`` may be None if the rows have a ``task`` column.

    Raises ``ValueError`` for an unknown benchmark or subset, a data file that cannot be read or a row
    without a needed field (naming the file, row and field), and ``ConnectionError`` when the hub
    cannot be reached.
    """
    choices = subsets(benchmark)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if subset is not None:
        subset = resolve_subset(benchmark, subset)
    elif data_files is None:
        raise ValueError(f"choose a {benchmark} subset to load from the hub: one of {choices}")
    rows = _read_rows(benchmark, subset, data_files)
    source = f"data file {data_files}" if data_files is not None else f"{HUB_DATASETS[benchmark]} ({subset})"
    _check_rows(rows, source, needs_task=benchmark == "ruler" or subset is None)
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(_row_task(benchmark, subset, row), []).append(row)
    samples = []
    for task, rows in by_task.items():
        order = list(range(len(rows)))
        random.Random(f"{benchmark}:{task}:{seed}").shuffle(order)
        kept = sorted(order if n is None else order[:n])
        samples += [_to_sample(benchmark, task, index, rows[index]) for index in kept]
    return samples
