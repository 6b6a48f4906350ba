"""The benchmark runner: methods × ratios × context lengths × tasks, on the same samples.

The runner prefills each sample once and replays every (method, ratio) on that prefill
(:mod:`nestedkv.bench.replay`), then decodes with kvpress's own greedy loop. A test checks that
this gives exactly the answers of kvpress's pipeline for the same press. Each answer's record also holds
the reference answer's likelihood through the same cache (:func:`answer_nll`).
"""

from __future__ import annotations

import copy
import time
from collections import Counter, defaultdict

import torch
from kvpress import KVPressTextGenerationPipeline
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nestedkv.bench.documents import (
    DOCUMENT_TASKS,
    DOCUMENTS,
    ContinuationSample,
    build_document_samples,
    greedy_agreement_and_nll,
)
from nestedkv.bench.methods import EAGER_PREFILL, REPLAY, make_press, method_spec
from nestedkv.bench.metrics import reference_answer, score_sample
from nestedkv.bench.plan import LOCAL_RULER, SPLIT_SEEDS, EvalConfig, check_window, fitted_lengths, load_samples
from nestedkv.bench.replay import (
    Prefill,
    compress_replay,
    feed,
    greedy_answers,
    prefill_compressed,
    prefill_once,
    ragged_rows,
    reuse_scores,
)
from nestedkv.bench.ruler import TASKS, Sample, build_samples
from nestedkv.bench.store import KEY_FIELDS, ResultStore
from nestedkv.models import config_window
from nestedkv.prompts import encode_prompt


def plan_samples(
    config: EvalConfig, tokenizer: PreTrainedTokenizerBase, samples: list[Sample] | None = None
) -> list[tuple[int | None, Sample]]:
    """(length, sample) pairs of this shard, sample index outermost: an interrupted run covers every
    task evenly, and so does every shard (they take the planned samples in turn).

    ``length`` is the target context length of locally built RULER samples, the subset's length for
    kvpress's prebuilt RULER, and ``None`` for the other hub benchmarks (their samples are not fitted).
    ``samples``: the hub benchmark's samples if already loaded (:func:`load_samples`).
    """
    if config.benchmark == LOCAL_RULER:
        planned = [
            (length, sample)
            for length in config.lengths
            for task in config.tasks or TASKS
            for sample in build_samples(
                task,
                config.samples,
                tokenizer,
                length,
                config.seed,
                squad_path=config.squad_path,
                hotpot_path=config.hotpot_path,
            )
        ]
    elif config.benchmark == DOCUMENTS:
        split = next(name for name, seed in SPLIT_SEEDS.items() if seed == config.seed)
        planned = [
            (length, sample)
            for length in config.lengths
            for task in config.tasks or DOCUMENT_TASKS
            for sample in build_document_samples(task, config.samples, tokenizer, length, split)
        ]
    else:
        length = next(iter(fitted_lengths(config)), None)
        loaded = samples if samples is not None else load_samples(config)
        planned = [(length, sample) for sample in loaded if config.tasks is None or sample.task in config.tasks]
    # Sample-major order: every task's first sample, then every task's second, ... (a stable sort keeps
    # lengths and tasks in their order within each rank).
    nth: Counter = Counter()
    ranked = []
    for length, sample in planned:
        ranked.append((nth[length, sample.task], length, sample))
        nth[length, sample.task] += 1
    ranked.sort(key=lambda item: item[0])
    index, count = config.shard
    return [(length, sample) for _, length, sample in ranked[index::count]]


def run(
    config: EvalConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    store: ResultStore,
    *,
    samples: list[Sample] | None = None,
    progress: bool = True,
    together: bool = True,
) -> int:
    """Measure every (sample, method, ratio) of ``config`` not yet in ``store`` (a result recorded as an
    error is measured again); return how many were added. ``samples``: the hub benchmark's samples
    if already loaded (:func:`load_samples`).

    ``together``: the answers of every method and ratio of a sample are decoded as one batch, each
    compressed cache a row of one ragged cache (:func:`~nestedkv.bench.replay.greedy_answers`), or as
    several when the waiting caches hold more than :data:`DECODE_BATCH_BYTES`; a
    cache that cannot be a ragged row is answered alone by kvpress's pipeline, as every cache is
    with ``together=False``. A sample's batched results are stored when its batch is decoded.

    A sample whose prompt and answer do not fit the model's context window is refused with a
    ``ValueError`` before anything is prefilled.
    """
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    jobs = config.jobs()
    window = config_window(model.config)
    check_window(config, window)
    planned = plan_samples(config, tokenizer, samples)

    def key(length: int | None, sample: Sample, method: str, ratio: float) -> tuple:
        return (
            config.model,
            config.benchmark,
            length,
            sample.task,
            sample.index,
            config.seed,
            method,
            ratio,
            config.query_aware,
        )

    def record(length: int | None, sample: Sample, method: str, ratio: float, outcome: dict, seconds: float) -> dict:
        return {
            **dict(zip(KEY_FIELDS, key(length, sample, method, ratio), strict=True)),
            "metric": sample.metric,
            "answers": list(sample.answers),
            **outcome,
            "seconds": round(seconds, 3),
        }

    todo = []
    for length, sample in planned:
        pending = [job for job in jobs if key(length, sample, *job) not in store]
        if pending:
            todo.append((length, sample, pending, *_encode(sample, tokenizer, config.query_aware)))
    _check_prompts_fit(todo, window)
    total = len(planned) * len(jobs)
    remaining = sum(len(pending) for _, _, pending, *_ in todo)
    bar = tqdm(total=total, initial=total - remaining, disable=not progress, unit="answer", dynamic_ncols=True)
    added = 0

    def answer_together(length: int | None, sample: Sample, waiting: list, question_ids: torch.Tensor,
                        context_length: int) -> None:
        """Decode the ``waiting`` answers of ``sample`` as one batch (each step reads the weights once for
        all of them), store them, and empty ``waiting``."""
        nonlocal added
        bar.set_postfix_str(f"{length} {sample.task}#{sample.index} {len(waiting)} answers together")
        start = time.perf_counter()
        try:
            answers = greedy_answers(model, [rows for *_, rows in waiting], question_ids, context_length,
                                     sample.max_new_tokens)
            outcomes = [_answered(sample, tokenizer.decode(answer, skip_special_tokens=True)) for answer in answers]
        except (RuntimeError, ValueError, AssertionError) as error:
            outcomes = [_failed(error)] * len(waiting)
        share = (time.perf_counter() - start) / len(waiting)  # each answer's share of the batch
        for (method, ratio, outcome, seconds, _), answered in zip(waiting, outcomes, strict=True):
            outcome |= answered | {"decoded_together": len(waiting)}
            store.add(record(length, sample, method, ratio, outcome, seconds + share))
            added += 1
            bar.update()
        waiting.clear()

    try:
        for length, sample, pending, context_ids, question_ids in todo:
            bar.set_postfix_str(f"{length} {sample.task}#{sample.index} prefill")
            start = time.perf_counter()
            prefill = prefill_once(model, context_ids)
            prefill_seconds = time.perf_counter() - start
            score_memos: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
            if isinstance(sample, ContinuationSample):
                # The uncompressed continuation, once per sample and before any compressed cache: rebuilding the
                # uncompressed cache resets kvpress's head-wise masks (``masked_key_indices``), by which a masked
                # cache built before it would then be read whole.
                with torch.no_grad():
                    full = compress_replay(model, prefill, None)
                    reference_logits = teacher_forced_logits(model, full, question_ids, prefill)
                del full
                answer_ids = None
            else:
                answer_ids = reference_answer_ids(sample, tokenizer)
            waiting: list[tuple[str, float, dict, float, list]] = []  # answers to decode together
            for method, ratio in pending:
                bar.set_postfix_str(f"{length} {sample.task}#{sample.index} {method} r={ratio}")
                start = time.perf_counter()
                outcome: dict = {"context_tokens": prefill.context_length}
                try:
                    with torch.no_grad():
                        cache, cache_seconds = _compressed_cache(
                            model, prefill, prefill_seconds, context_ids, method, ratio, score_memos[method]
                        )
                        # The sample's uncompressed prefill in this same run: the cost ratio's denominator
                        # (a store's uncompressed record may come from an earlier run on a faster machine).
                        outcome["prefill_seconds"] = round(cache_seconds, 3)
                        outcome["uncompressed_prefill_seconds"] = round(prefill_seconds, 3)
                        if isinstance(sample, ContinuationSample):
                            logits = teacher_forced_logits(model, cache, question_ids, prefill)
                            outcome |= {"prediction": None} | greedy_agreement_and_nll(
                                logits, reference_logits, question_ids[0, 1:].to(model.device)
                            )
                        else:
                            outcome["answer_nll"] = answer_nll(model, cache, question_ids, answer_ids, prefill)
                            rows = ragged_rows(model, cache, prefill.context_length) if together else None
                            if rows is not None:
                                waiting.append((method, ratio, outcome, time.perf_counter() - start, rows))
                                if sum(layer.nbytes for *_, held in waiting for layer in held) > DECODE_BATCH_BYTES:
                                    answer_together(length, sample, waiting, question_ids, prefill.context_length)
                                continue
                            prediction = pipe.generate_answer(
                                question_ids.to(model.device), cache, prefill.context_length, sample.max_new_tokens
                            )
                            outcome |= _answered(sample, prediction)
                except OSError as error:
                    _refuse_missing_hub_files(method, error)
                    raise
                except (RuntimeError, ValueError, AssertionError) as error:  # a failing method must not stop the run
                    outcome |= _failed(error)
                store.add(record(length, sample, method, ratio, outcome, time.perf_counter() - start))
                added += 1
                bar.update()
            if waiting:
                answer_together(length, sample, waiting, question_ids, prefill.context_length)
    finally:
        bar.close()  # an interrupted run's message starts on a line of its own
    return added


DECODE_BATCH_BYTES = 2 * 2**30
"""The compressed caches waiting to be decoded together are decoded once they hold more than this:
stacking them into one batch copies them, and the 187 caches of one 4k sample of the leaderboard
preset hold about 11 GB (that run was killed for memory on this 24 GiB machine before the cap)."""


def _answered(sample: Sample, prediction: str) -> dict:
    """A result's prediction and its score."""
    all_classes = getattr(sample, "all_classes", ())
    return {"prediction": prediction, "score": score_sample(sample.metric, prediction, sample.answers,
                                                            all_classes=all_classes)}


def _failed(error: Exception) -> dict:
    """A result recorded as an error: measured again by the next run."""
    return {"prediction": None, "score": None, "error": f"{type(error).__name__}: {error}"}


def _compressed_cache(
    model: PreTrainedModel,
    prefill: Prefill,
    prefill_seconds: float,
    context_ids: torch.Tensor,
    method: str,
    ratio: float,
    score_memo: dict[int, torch.Tensor],
) -> tuple[DynamicCache, float]:
    """``method``'s cache of the sample at ``ratio``, and what it costs a user to get it from the
    context: the shared prefill plus the replayed compression, or the method's own prefill.

    For ratio-free scorers the scores are computed at the first ratio and reused (``score_memo``),
    so the first ratio's cost is the one to quote."""
    start = time.perf_counter()
    press = make_press(method, ratio)
    # Randomised presses (Random, the sketches of LeverageScore and Compactor) draw the same numbers
    # for every cache and every run: a run is reproducible, and comparable with kvpress's pipeline.
    torch.manual_seed(0)
    spec = method_spec(method)  # None: the uncompressed baseline
    mode = spec.prefill if spec else REPLAY
    if spec and spec.ratio_free_scores:
        if mode != REPLAY and not score_memo:
            # What it scores comes from a prefill of its own (eager attention weights, KVzip's re-reading
            # of the context): run it once per sample to score every layer, then replay the scores on
            # the shared prefill, at this ratio and the next ones.
            prefill_compressed(model, context_ids, reuse_scores(press, score_memo), eager=mode == EAGER_PREFILL)
            press = make_press(method, ratio)
            prefill_seconds = 0.0  # this method's own prefill is its cost, timed since ``start``
        press = reuse_scores(press, score_memo)
        mode = REPLAY
    if mode == REPLAY:
        cache = compress_replay(model, prefill, press)
        return cache, prefill_seconds + time.perf_counter() - start
    cache = prefill_compressed(model, context_ids, press, eager=mode == EAGER_PREFILL)
    return cache, time.perf_counter() - start


def _refuse_missing_hub_files(method: str, error: OSError) -> None:
    """A method whose press downloads from the Hugging Face hub (``Method.download``) that cannot reach
    it nor find its files in the local cache would fail on every sample alike: stop the run with one line
    (``ConnectionError``); the results already stored stay."""
    spec = method_spec(method)
    if spec is not None and spec.download:
        raise ConnectionError(
            f"method {method} needs files from the Hugging Face hub that can neither be downloaded nor found in "
            f"the local cache ({type(error).__name__}); run it once with network access, or leave it out of "
            "--methods (the results already measured are kept)"
        ) from error


def teacher_forced_logits(
    model: PreTrainedModel, cache: DynamicCache, target_ids: torch.Tensor, prefill: Prefill, last: int = 0
) -> torch.Tensor:
    """Feed ``target_ids (1, T + 1)`` but the last after the context held (compressed) in ``cache``;
    the logits ``(T, vocab)`` that predict ``target_ids[0, 1:]``, or only the ``last`` of them (0: all)."""
    return feed(model, cache, target_ids[:, :-1].to(model.device), prefill.context_length, logits_to_keep=last)[0]


def answer_nll(
    model: PreTrainedModel, cache: DynamicCache, question_ids: torch.Tensor, answer_ids: torch.Tensor, prefill: Prefill
) -> float | None:
    """Mean NLL (nats/token) of the reference answer ``answer_ids (1, A)`` teacher-forced after ``question_ids
    (1, Q)`` from the context held (compressed) in ``cache``, which is left as it is (a copy is fed): a measure of
    retrieval that moves with every token's probability, where a greedy answer's score moves only when a
    substring appears. ``None`` for an empty reference."""
    if answer_ids.shape[1] == 0:
        return None
    target = torch.cat([question_ids, answer_ids], dim=1)
    logits = teacher_forced_logits(model, copy.deepcopy(cache), target, prefill, last=answer_ids.shape[1])
    return torch.nn.functional.cross_entropy(logits.float(), answer_ids[0].to(logits.device)).item()


def reference_answer_ids(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The token ids ``(1, A)`` of ``sample``'s reference answer (:func:`~nestedkv.bench.metrics.reference_answer`),
    at most ``max_new_tokens`` of them: what the greedy answer may write, so that prompt and answer stay inside the
    model's window as the prompt check guaranteed."""
    text = reference_answer(sample.metric, sample.answers, sample.answer_prefix)
    return tokenizer.encode(text, return_tensors="pt", add_special_tokens=False)[:, : sample.max_new_tokens]


def _encode(sample: Sample, tokenizer: PreTrainedTokenizerBase, query_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids, question ids) of ``sample``; query-aware, the question is compressed with the context.
    A continuation sample's "question" is the text that follows the context, teacher-forced."""
    if isinstance(sample, ContinuationSample):
        return sample.context_ids, sample.target_ids
    context, question = sample.context, sample.question
    if query_aware:
        context, question = context + question, ""
    return encode_prompt(tokenizer, context, question, sample.answer_prefix)


def _check_prompts_fit(todo: list[tuple], window: int | None) -> None:
    """Refuse the run, before any prefill, if a sample's prompt and answer exceed the model's window
    (a hub benchmark's samples are not fitted to the model)."""
    needs = [(ids.shape[1] + question.shape[1] + sample.max_new_tokens, sample) for _, sample, _, ids, question in todo]
    too_long = [(tokens, sample) for tokens, sample in needs if window is not None and tokens > window]
    if too_long:
        tokens, sample = max(too_long, key=lambda item: item[0])
        raise ValueError(
            f"{len(too_long)} of {len(needs)} samples do not fit the model's context window of {window} tokens "
            f"(max_position_embeddings), the longest {sample.task}#{sample.index} with {tokens} tokens (prompt and "
            "answer): choose shorter samples or a model with a longer window"
        )
