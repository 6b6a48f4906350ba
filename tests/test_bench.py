"""The benchmark: prefill-once replay against kvpress's pipeline, the resumable store, the report."""

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline, KVzipPress, SnapKVPress
from transformers import DynamicCache

from nestedkv.bench import runner
from nestedkv.bench.methods import EAGER_PREFILL, METHODS, PEERS, make_press
from nestedkv.bench.metrics import reference_answer
from nestedkv.bench.plan import EvalConfig
from nestedkv.bench.replay import compress_replay, prefill_once, reuse_scores
from nestedkv.bench.report import Cell, collect, prefill_costs, t_quantile_95, welch_degrees_of_freedom, write_report
from nestedkv.bench.ruler import build_samples
from nestedkv.bench.runner import plan_samples, run
from nestedkv.bench.store import ResultStore, result_key
from nestedkv.models import attention_modules, eager_attention
from nestedkv.press import NestedKVPress
from nestedkv.prompts import encode_prompt


def test_prefill_once_gives_exactly_the_pipeline_answers(model, tokenizer):
    sample = build_samples("niah_single_2", 1, tokenizer, 640, seed=7)[0]
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    context_ids, question_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    prefill = prefill_once(model, context_ids)
    # a masked (head-wise) method first: its masks must not leak into the methods replayed after it
    methods = ["adakv-expected-attention", "keydiff", "nestedkv", "snapkv", "block-keydiff", "none"]
    for method in methods:
        cache = compress_replay(model, prefill, make_press(method, 0.75))
        replayed = pipe.generate_answer(question_ids, cache, prefill.context_length, max_new_tokens=12)
        expected = pipe(
            sample.context,
            question=sample.question,
            answer_prefix=sample.answer_prefix,
            press=make_press(method, 0.75),
            max_new_tokens=12,
        )["answer"]
        assert replayed == expected, method
    # scores reused across ratios (expensive ratio-free scorers) give the answers of fresh presses
    memo = {}
    for ratio in (0.5, 0.9):
        press = reuse_scores(make_press("adakv-expected-attention", ratio), memo)
        replayed = pipe.generate_answer(
            question_ids, compress_replay(model, prefill, press), prefill.context_length, 12
        )
        expected = pipe(
            sample.context,
            question=sample.question,
            answer_prefix=sample.answer_prefix,
            press=make_press("adakv-expected-attention", ratio),
            max_new_tokens=12,
        )["answer"]
        assert replayed == expected, ratio
    assert sorted(memo) == list(range(model.config.num_hidden_layers))


def test_every_offline_peer_runs_through_the_runner_as_in_kvpresss_pipeline(model, tokenizer, tmp_path, monkeypatch):
    """Each peer of the registry (and NestedKV, ragged and masked), at one ratio on a short context, gives
    through the benchmark's runner (shared-prefill replay; KVzip, KVCompose and the eager ObservedAttention
    score in a prefill of their own, then replay; every answer decoded in one batch with the others) the answer
    kvpress's pipeline gives for the same press, decoding that cache alone."""
    # 12 answer tokens tell the presses apart; a collapsed one would otherwise babble for 128
    short_answers = lambda *args, **kwargs: [  # noqa: E731
        dataclasses.replace(sample, max_new_tokens=12) for sample in build_samples(*args, **kwargs)
    ]
    monkeypatch.setattr("nestedkv.bench.runner.build_samples", short_answers)
    methods = (*PEERS, "nestedkv", "nestedkv-masked")
    config = EvalConfig(
        model="m", tasks=("niah_single_2",), lengths=(448,), ratios=(0.75,), methods=methods, samples=1, seed=7
    )
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == len(methods)
    sample = plan_samples(config, tokenizer)[0][1]
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    records = {r["method"]: r for r in ResultStore(tmp_path)}
    assert {r["decoded_together"] for r in records.values()} == {len(methods)}  # one batch: every cache a row
    for method in methods:
        assert "error" not in records[method], (method, records[method].get("error"))
        torch.manual_seed(0)  # as the runner seeds randomised presses
        with eager_attention(model) if METHODS[method].prefill == EAGER_PREFILL else nullcontext():
            expected = pipe(
                sample.context,
                question=sample.question,
                answer_prefix=sample.answer_prefix,
                press=make_press(method, 0.75),
                max_new_tokens=sample.max_new_tokens,
            )["answer"]
        assert records[method]["prediction"] == expected, method
        assert records[method]["prefill_seconds"] > 0
        assert records[method]["uncompressed_prefill_seconds"] > 0
    # our HeadAdaptivePress with ragged storage keeps what kvpress's masked AdaKV keeps
    assert records["ragged-adakv-snapkv"]["prediction"] == records["adakv-snapkv"]["prediction"]


def test_expensive_ratio_free_peers_score_once_for_every_ratio(model, tokenizer, tmp_path, monkeypatch):
    """ObservedAttention and KVCompose score the attention weights of an eager prefill, KVzip makes the
    model re-read the context: the runner does each once per sample and reuses the scores at every
    ratio, giving at each the answer kvpress's pipeline gives with a fresh press."""
    passes = []

    def counting(name, function):
        def counted(*args, **kwargs):
            passes.append(name)
            return function(*args, **kwargs)

        return counted

    monkeypatch.setattr(runner, "prefill_compressed", counting("own prefill", runner.prefill_compressed))
    monkeypatch.setattr(KVzipPress, "prepare", counting("re-reading", KVzipPress.prepare))
    methods = ("observed-attention", "kvcompose", "kvzip")
    config = EvalConfig(
        model="m", tasks=("niah_single_2",), lengths=(640,), ratios=(0.5, 0.9), methods=methods, samples=1, seed=7
    )
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 6
    # one prefill of its own per method (eager for ObservedAttention, re-reading the context for KVzip)
    assert Counter(passes) == {"own prefill": 3, "re-reading": 1}
    sample = plan_samples(config, tokenizer)[0][1]
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    monkeypatch.undo()
    for result in ResultStore(tmp_path):
        method = result["method"]
        with eager_attention(model) if METHODS[method].prefill == EAGER_PREFILL else nullcontext():
            expected = pipe(
                sample.context, question=sample.question, answer_prefix=sample.answer_prefix,
                press=make_press(method, result["ratio"]), max_new_tokens=sample.max_new_tokens,
            )["answer"]
        assert result["prediction"] == expected, (method, result["ratio"])


def test_a_ramp_tied_to_the_budget_is_scored_again_at_every_ratio(model, tokenizer, tmp_path, monkeypatch):
    """``recency_over_kept`` makes NestedKV's scores depend on the ratio: the runner must not reuse the first
    ratio's scores at the next ones (it did, scoring r = 0.95 with r = 0.875's ramp)."""
    weights = []
    score_config = NestedKVPress.score_config

    def recording(press):
        config = score_config(press)
        weights.append(round(config.recency, 9))
        return config

    monkeypatch.setattr(NestedKVPress, "score_config", recording)
    config = EvalConfig(model="m", tasks=("niah_single_2",), lengths=(640,), ratios=(0.875, 0.95),
                        methods=("nestedkv:recency_over_kept=0.1",), samples=1, seed=7)
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 2
    assert Counter(weights) == {0.8: model.config.num_hidden_layers, 2.0: model.config.num_hidden_layers}


def test_query_based_peers_see_the_models_own_attention(model):
    """SnapKV (and PyramidKV, which scores as it does) recompute the last window's attention from the
    hidden states; on the GGUF-loaded default model that must equal the model's own attention weights,
    or the peers would be measured on a broken reimplementation."""
    input_ids = torch.randint(100, 40000, (1, 200), generator=torch.Generator().manual_seed(0))
    captured = {}

    def capture(module, args, kwargs, output):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[1])

    hooks = [module.register_forward_hook(capture, with_kwargs=True) for module in attention_modules(model)]
    try:
        cache = DynamicCache()
        with torch.no_grad(), eager_attention(model):
            model.model(input_ids=input_ids, past_key_values=cache, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    for module in attention_modules(model):
        hidden_states, position_embeddings, attentions = captured[module.layer_idx]
        keys = cache.layers[module.layer_idx].keys
        window = SnapKVPress.compute_window_attention(module, hidden_states, keys, 64, position_embeddings)
        torch.testing.assert_close(window, attentions[..., -64:, :-64], atol=1e-5, rtol=1e-4)


SMALL = dict(
    tasks=("niah_single_1", "niah_single_2"),
    lengths=(512,),
    ratios=(0.5, 0.9),
    methods=("none", "nestedkv", "knorm"),
    samples=1,
)


class Interrupted(Exception):
    pass


def test_run_is_resumable_and_loses_no_finished_result(model, tokenizer, tmp_path):
    config = EvalConfig(model="smollm2-test", **SMALL)
    expected_total = 2 * (1 + 2 * 2)  # 2 samples x (baseline + 2 methods x 2 ratios)

    class FailingStore(ResultStore):
        def add(self, record):
            if len(self) == 3:
                raise Interrupted  # as if the user pressed Ctrl-C after three results
            super().add(record)

    with pytest.raises(Interrupted):
        run(config, model, tokenizer, FailingStore(tmp_path), progress=False)
    assert len(ResultStore(tmp_path)) == 3
    # a torn half line, as a kill during a write would leave
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write('{"model": "smollm2-te')
    with pytest.warns(UserWarning, match="skipping an unreadable line"):
        store = ResultStore(tmp_path)
    assert run(config, model, tokenizer, store, progress=False) == expected_total - 3
    with pytest.warns(UserWarning):
        records = list(ResultStore(tmp_path))
    assert len(records) == expected_total
    assert len({(r["task"], r["method"], r["ratio"]) for r in records}) == expected_total
    assert all(0 <= r["score"] <= 100 and r["context_tokens"] <= 512 for r in records)
    with pytest.warns(UserWarning):
        assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 0


def test_answers_decoded_together_equal_answers_decoded_one_by_one(model, tokenizer, tmp_path, monkeypatch):
    methods = ("none", "nestedkv", "knorm", "adakv-snapkv")
    config = EvalConfig(model="smollm2-test", **{**SMALL, "tasks": ("niah_single_1",), "methods": methods})
    predictions = {}
    for together, batch_bytes in ((True, runner.DECODE_BATCH_BYTES), (False, None), ("capped", 0)):
        monkeypatch.setattr(runner, "DECODE_BATCH_BYTES", batch_bytes)
        store = ResultStore(tmp_path / str(together))
        run(config, model, tokenizer, store, progress=False, together=bool(together))
        predictions[together] = {result_key(r): (r["prediction"], r.get("decoded_together")) for r in store}
    answers = {way: {key: answer for key, (answer, _) in found.items()} for way, found in predictions.items()}
    assert answers[True] == answers[False] == answers["capped"]
    assert sorted(together for _, together in predictions[True].values()) == [7] * 7  # every ratio in one batch
    assert {together for _, together in predictions[False].values()} == {None}
    # waiting caches over the byte cap are decoded at once: with a cap of 0, each answer alone
    assert {together for _, together in predictions["capped"].values()} == {1}


def test_answer_nll_is_the_reference_answers_likelihood_after_the_prompt(model, tokenizer, tmp_path):
    """The uncompressed answer NLL equals one forward pass over context + question + reference answer;
    a compressed cache's answers are unchanged by measuring it (the runner feeds a copy), and lose
    likelihood; the report has its tables."""
    config = EvalConfig(model="smollm2-test", **{**SMALL, "tasks": ("niah_single_1",), "ratios": (0.9,)})
    run(config, model, tokenizer, ResultStore(tmp_path), progress=False)
    records = {r["method"]: r for r in ResultStore(tmp_path)}
    [(_, sample)] = plan_samples(config, tokenizer)
    answer = reference_answer(sample.metric, sample.answers, sample.answer_prefix)
    assert answer == " " + sample.answers[0]  # after "... mentioned in the provided text is"
    answer_ids = tokenizer.encode(answer, return_tensors="pt", add_special_tokens=False)
    expected = answer_nll_in_one_pass(model, tokenizer, sample, answer_ids)
    assert records["none"]["answer_nll"] == pytest.approx(expected, abs=1e-4)
    assert records["none"]["score"] == 100 and records["none"]["answer_nll"] < 0.1  # the model finds this needle
    assert min(records[method]["answer_nll"] for method in ("nestedkv", "knorm")) > records["none"]["answer_nll"]
    one_by_one = ResultStore(tmp_path / "one-by-one")  # kvpress's pipeline decodes the very cache that was fed
    run(config, model, tokenizer, one_by_one, progress=False, together=False)
    assert {r["method"]: r["prediction"] for r in one_by_one} == {m: r["prediction"] for m, r in records.items()}
    assert {r["method"]: r["answer_nll"] for r in one_by_one} == pytest.approx(
        {m: r["answer_nll"] for m, r in records.items()}, abs=1e-5)
    text = write_report(list(records.values()), tmp_path / "report")
    assert "## answer_nll" in text and "NLL of the reference answer" in text
    assert f"| none (r=0) | {records['none']['answer_nll']:.3f} |" in text
    assert (tmp_path / "report" / "answer_nll_vs_cost.png").stat().st_size > 1000


def test_reference_answers_join_what_the_metric_needs():
    assert reference_answer("string_match_all", ("1", "2"), "The numbers are") == " 1, 2"
    assert reference_answer("string_match_part", ("Paris", "paris"), "Answer:") == " Paris"
    assert reference_answer("qa_f1_score", ("yes",), "") == "yes"
    assert reference_answer("string_match_all", ("a",), "Answer: ") == "a"
    with pytest.raises(ValueError, match="at least one reference answer"):
        reference_answer("string_match_all", (), "")


def record(task, method, ratio, index, score):
    return dict(
        model="m",
        benchmark="ruler-local",
        length=4096,
        task=task,
        index=index,
        seed=0,
        method=method,
        ratio=ratio,
        query_aware=False,
        score=score,
    )


def test_report_tables_confidence_intervals_and_plots(tmp_path):
    records = [record("a", "none", 0.0, i, s) for i, s in enumerate([100, 100])]
    records += [record("b", "none", 0.0, i, s) for i, s in enumerate([100, 0])]
    records += [record("a", "nestedkv", 0.5, i, s) for i, s in enumerate([100, 0])]
    records += [record("b", "nestedkv", 0.5, i, s) for i, s in enumerate([0, 0])]
    records.append(record("a", "nestedkv", 0.5, 2, 100))  # sample 2 has no baseline: not counted
    cells, tasks = collect(records)
    assert tasks == ["a", "b"]
    assert cells["none", 0.0].mean == 75.0
    assert cells["nestedkv", 0.5].mean == 25.0
    # t * sqrt(s_a^2 / 2 + s_b^2 / 2) / 2 with s_a = 70.71, s_b = 0: all the spread is task a's, 1 degree of freedom
    assert cells["nestedkv", 0.5].ci95 == pytest.approx(12.706 * 50 / 2, rel=1e-4)
    # paired: differences per sample are a (0, -100), b (-100, 0), so s_a = s_b = 70.71 and 2 degrees of freedom
    paired = cells["nestedkv", 0.5].minus(cells["none", 0.0])
    assert paired.mean == -50.0 and paired.ci95 == pytest.approx(4.3027 * math.sqrt(5000) / 2, rel=1e-4)
    text = write_report(records, tmp_path)
    assert "| nestedkv | 25.0 ± 317.7 |" in text
    assert "| none | -50.0 ± 152.1 |" in text
    assert "2 sample(s) per task" in text
    assert (tmp_path / "score_vs_ratio.png").stat().st_size > 1000
    assert (tmp_path / "task_heatmap.png").stat().st_size > 1000
    # another method as the reference: every other is paired with it, NestedKV included
    records += [record(task, "knorm", 0.5, i, 100) for task in "ab" for i in range(2)]
    text = write_report(records, tmp_path / "against", against="knorm")
    assert "knorm minus each method" in text and "| nestedkv | +75.0 ± 317.7 |" in text
    with pytest.raises(ValueError, match="--against tova: no results for it in this store; measured: knorm, nestedkv"):
        write_report(records, tmp_path / "against", against="tova")


def test_report_marks_the_paired_differences_whose_interval_excludes_zero(tmp_path):
    """Bold where the paired interval excludes zero, decided before rounding: +0.04 ± 0.01 prints as +0.0 ± 0.0."""
    records = [record(task, "none", 0.0, i, 50.0) for task in "ab" for i in range(3)]
    records += [record(task, "nestedkv", 0.5, i, 40.0 + 0.04 * i) for task in "ab" for i in range(3)]
    records += [record(task, "tova", 0.5, i, 39.97 + 0.03 * i) for task in "ab" for i in range(3)]
    records += [record(task, "keydiff", 0.5, i, 40.0 + (1 - 2 * (i % 2)) + 0.02 * i) for task in "ab" for i in range(3)]
    text = write_report(records, tmp_path)
    assert "in bold where it excludes zero" in text
    assert "| tova | **+0.0 ± 0.0** |" in text  # differences 0.03, 0.04, 0.05 in each task
    assert "| keydiff | -0.3 ± 1.3 |" in text  # alternating signs: not clear
    assert "| none | **-10.0 ± 0.0** |" in text


def test_report_of_some_methods_counts_the_samples_they_have_in_common(tmp_path):
    """A store where one peer was measured on fewer samples: the whole report counts those, a report of
    the others counts every sample they share."""
    scores = {"none": [100, 100, 0], "nestedkv": [100, 0, 0], "knorm": [0, 0]}
    records = [record(task, method, 0.0 if method == "none" else 0.5, i, score)
               for task in "ab" for method, values in scores.items() for i, score in enumerate(values)]
    assert "2 sample(s) per task, 4 samples per cell" in write_report(records, tmp_path / "all")
    text = write_report(records, tmp_path / "some", methods=["nestedkv"])
    assert "3 sample(s) per task, 6 samples per cell" in text and "knorm" not in text
    assert "| nestedkv | 33.3 ± " in text and (tmp_path / "some" / "report.md").read_text() == text
    with pytest.raises(ValueError, match="--methods tova: no results in this store; measured: knorm, nestedkv"):
        write_report(records, tmp_path / "some", methods=["nestedkv", "tova"])
    with pytest.raises(ValueError, match="--against knorm is not among --methods; add it there"):
        write_report(records, tmp_path / "some", against="knorm", methods=["nestedkv"])


def test_one_sample_per_task_takes_the_interval_from_the_spread_across_tasks():
    one_each = Cell({"a": [100.0], "b": [0.0], "c": [50.0]})
    # no within-task spread: the three scores as draws from the task mix, t(2) * s / sqrt(3) with s = 50
    assert one_each.mean == 50.0 and one_each.ci95 == pytest.approx(4.3027 * 50 / math.sqrt(3), rel=1e-4)
    assert Cell({"a": [100.0, 0.0], "b": [50.0]}).ci95 is None  # some tasks once, others more: no interval
    assert Cell({"a": [100.0]}).ci95 is None


def test_intervals_use_students_t_with_welch_satterthwaite_degrees_of_freedom():
    # two-sided 95 % quantiles from the printed tables
    for df, quantile in [(1, 12.706), (2, 4.303), (3, 3.182), (7, 2.365), (10, 2.228), (30, 2.042), (120, 1.980)]:
        assert t_quantile_95(df) == pytest.approx(quantile, abs=6e-4)
    assert t_quantile_95(7.9) == t_quantile_95(7) and t_quantile_95(0.3) == t_quantile_95(1)  # rounded down
    assert t_quantile_95(10**6) == pytest.approx(1.962, abs=1e-3)
    # equal spreads and counts: the pooled sum of (n_t - 1); one task holding all the spread: its own n - 1
    assert welch_degrees_of_freedom([4.0, 4.0], [5, 5]) == pytest.approx(8.0)
    assert welch_degrees_of_freedom([4.0, 0.0], [5, 9]) == pytest.approx(4.0)
    assert welch_degrees_of_freedom([0.0, 0.0], [5, 9]) == 12
    # one task of 8 paired differences (the continuation benchmark): t(7), not the normal 1.96
    differences = [0.01, -0.03, 0.02, -0.05, -0.01, -0.04, 0.00, -0.02]
    expected = 2.3646 * statistics.stdev(differences) / math.sqrt(8)
    assert Cell({"continuation": differences}).ci95 == pytest.approx(expected, rel=1e-4)


def test_shards_split_the_plan_evenly_and_share_one_store(model, tokenizer, tmp_path):
    def planned(shard, **options):
        config = EvalConfig(model="smollm2-test", **{**SMALL, **options}, shard=shard)
        return [(sample.task, sample.index) for _, sample in plan_samples(config, tokenizer)]

    whole = planned((0, 1), samples=2)
    shards = [planned((k, 3), samples=2) for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(whole) and len(set(whole)) == 4
    assert [len(shard) for shard in shards] == [2, 1, 1]
    assert [index for _, index in shards[0]] == [0, 1]  # each shard is sample-major too
    # two shards written one after the other into one store hold the whole run, once
    for k in range(2):
        config = EvalConfig(model="smollm2-test", **{**SMALL, "methods": ("none",)}, shard=(k, 2))
        assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 1
    measured = sorted((r["task"], r["index"]) for r in ResultStore(tmp_path))
    assert measured == [("niah_single_1", 0), ("niah_single_2", 0)]
    with pytest.raises(ValueError, match="shard 2/2"):
        EvalConfig(model="m", shard=(2, 2))


def test_concurrent_writers_never_interleave_lines(tmp_path):
    writer = (
        "import sys; from nestedkv.bench.store import ResultStore; store = ResultStore(sys.argv[1]); "
        "[store.add(dict(model='m', benchmark='b', length=1, task=sys.argv[2], index=i, seed=0, method='none', "
        "ratio=0.0, query_aware=False, prediction='x' * 20000)) for i in range(150)]"
    )
    processes = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path), task]) for task in ("a", "b")]
    assert [process.wait() for process in processes] == [0, 0]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 300
    assert sorted((r["task"], r["index"]) for r in map(json.loads, lines)) == sorted(
        (task, i) for task in "ab" for i in range(150)
    )


def test_prefill_cost_table_and_the_quality_vs_cost_plot(tmp_path):
    timed = [
        # (method, ratio, index, score, prefill seconds): "kvzip" pays 8x, "nestedkv" 1.1x at its first ratio only
        ("none", 0.0, 0, 100, 1.0), ("none", 0.0, 1, 100, 2.0),
        ("nestedkv", 0.5, 0, 100, 1.1), ("nestedkv", 0.9, 0, 0, 1.0), ("nestedkv", 0.5, 1, 100, 2.2),
        ("nestedkv", 0.9, 1, 100, 2.0),
        ("kvzip", 0.5, 0, 100, 8.0), ("kvzip", 0.9, 0, 100, 9.0), ("kvzip", 0.5, 1, 100, 16.0),
        ("kvzip", 0.9, 1, 100, 18.0),
    ]
    records = [record("a", m, r, i, s) | {"prefill_seconds": t} for m, r, i, s, t in timed]
    assert prefill_costs(records) == {"nestedkv": (pytest.approx(1.1), 2), "kvzip": (pytest.approx(9.0), 2)}
    text = write_report(records, tmp_path)
    assert "| kvzip | 9.00× | 2 |" in text and "| nestedkv | 1.10× | 2 |" in text
    assert (tmp_path / "score_vs_cost.png").stat().st_size > 1000
    assert prefill_costs([record("a", "none", 0.0, 0, 100)]) == {}  # records without times: no table, no plot
    # A method added later, on a machine twice as slow that day: divided by its own run's uncompressed prefill
    later = [record("a", "tova", 0.5, i, 100) | {"prefill_seconds": 2.2 * t, "uncompressed_prefill_seconds": 2 * t}
             for i, t in ((0, 1.0), (1, 2.0))]
    assert prefill_costs(records + later)["tova"] == (pytest.approx(1.1), 2)


def test_report_counts_tasks_measured_unequally(tmp_path):
    """An interrupted run may have measured some tasks once more than others: the report says so."""
    jobs = (("none", 0.0), ("nestedkv", 0.5), ("x", 0.5), ("nestedkv-global", 0.5))  # both plot panels
    records = [record(task, method, ratio, i, 100) for task in "ab" for method, ratio in jobs
               for i in range(3 if task == "a" else 2)]
    cells, _ = collect(records)
    assert cells["x", 0.5].samples_per_task == "2-3" and cells["x", 0.5].total == 5
    assert "2-3 sample(s) per task, 5 samples per cell" in write_report(records, tmp_path)


def test_report_refuses_an_empty_store(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_report([], tmp_path)


def test_store_records_are_json_lines(tmp_path):
    store = ResultStore(tmp_path)
    store.add(record("a", "none", 0.0, 0, 100.0))
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["method"] == "none"
    assert ("m", "ruler-local", 4096, "a", 0, 0, "none", 0.0, False) in ResultStore(tmp_path)


def test_store_skips_lines_that_are_not_results(tmp_path):
    """Hand-edited or damaged lines cost themselves only, each named by its line number."""
    good = record("a", "none", 0.0, 0, 100.0)
    lines = [
        json.dumps(good).encode(),
        b"[1, 2]",
        json.dumps({"model": "m", "score": 1}).encode(),
        b'{"method": "caf\xe9"}',
        json.dumps({**good, "task": ["a"]}).encode(),
        json.dumps({**good, "score": "high"}).encode(),
        json.dumps(record("b", "none", 0.0, 0, 50.0)).encode(),
    ]
    (tmp_path / "results.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning) as caught:
        store = ResultStore(tmp_path)
    messages = [str(warning.message).removeprefix(f"{store.path}:") for warning in caught]
    assert messages == [
        "2: skipping an unreadable line: a JSON list, not a result",
        "3: skipping an unreadable line: a result without benchmark, length, task, index, seed, method, ratio, "
        "query_aware",
        "4: skipping an unreadable line: not UTF-8",
        "5: skipping an unreadable line: a result whose key holds a list or an object",
        "6: skipping an unreadable line: a result whose score 'high' is not a number",
    ]
    assert len(store) == 2 and [r["task"] for r in store] == ["a", "b"]  # warned once per store
    store.add(record("c", "none", 0.0, 0, 0.0))
    with pytest.warns(UserWarning):
        assert len(ResultStore(tmp_path)) == 3


def error(task, method, ratio, index, message):
    return {**record(task, method, ratio, index, None), "prediction": None, "error": message}


def test_errors_are_measured_again_and_listed_in_the_report(tmp_path):
    store = ResultStore(tmp_path)
    for job in (("none", 0.0, 100.0), ("nestedkv", 0.5, 50.0), ("nestedkv", 0.9, 0.0)):
        store.add(record("a", job[0], job[1], 0, job[2]))
    store.add(error("a", "nestedkv", 0.9, 1, "RuntimeError: out of memory"))
    store.add(error("a", "knorm", 0.5, 0, "ValueError: too short | for this"))
    store.add(error("a", "knorm", 0.5, 0, "ValueError: too short | for this"))  # retried, failed again
    failed = error("a", "knorm", 0.5, 0, "")
    assert result_key(failed) not in ResultStore(tmp_path) and len(store) == 3 and store.errors == 2
    text = write_report(ResultStore(tmp_path), tmp_path)
    assert "No result yet for knorm: every measurement of it failed." in text
    assert "| knorm | 0.5 | 1 | ValueError: too short \\| for this |" in text
    assert "| nestedkv | 0.9 | 1 | RuntimeError: out of memory |" in text
    store.add(record("a", "knorm", 0.5, 0, 100.0))  # the retry that succeeds replaces the error
    assert result_key(failed) in store and store.errors == 1
    text = write_report(ResultStore(tmp_path), tmp_path)
    assert "| knorm | 100.0 |" in text and "No result yet" not in text and "| knorm | 0.5 |" not in text


def test_report_on_the_baseline_alone_says_so(tmp_path):
    records = [record(task, "none", 0.0, i, 100.0 * i) for task in "ab" for i in range(2)]
    records.append(error("a", "snapkv", 0.5, 0, "RuntimeError: boom"))
    text = write_report(records, tmp_path)
    assert "| none (r=0) | 50.0 ± 152.1 |" in text  # t(2) = 4.303: Welch-Satterthwaite over two tasks of 2
    assert "Only the uncompressed baseline has results so far" in text and "No result yet for snapkv" in text
    assert (tmp_path / "score_vs_ratio.png").exists() and (tmp_path / "task_heatmap.png").exists()
    with pytest.raises(ValueError, match=r"every result in the store is an error \(the first: RuntimeError: boom\)"):
        write_report(records[-1:], tmp_path)


def test_samples_longer_than_the_model_window_are_refused_before_any_prefill(model, tokenizer, tmp_path, monkeypatch):
    def no_prefill(*args):
        raise AssertionError("prefilled a sample that does not fit")

    monkeypatch.setattr("nestedkv.bench.runner.prefill_once", no_prefill)
    config = EvalConfig(model="m", lengths=(16384,), methods=("none",), samples=1)
    with pytest.raises(ValueError, match="context length 16384 does not fit the model's context window of 8192"):
        run(config, model, tokenizer, ResultStore(tmp_path), progress=False)
    row = {"context": "word " * 9000, "question": "q", "answer_prefix": "", "answer": ["x"], "max_new_tokens": 8}
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "context": "short"}) + "\n")
    config = EvalConfig(model="m", benchmark="loogle", subset="shortdep_qa", data_files=str(data), methods=("none",))
    with pytest.raises(ValueError, match=r"1 of 2 samples do not fit the model's context window of 8192 tokens"):
        run(config, model, tokenizer, ResultStore(tmp_path), progress=False)


def test_hub_benchmark_from_a_local_file(model, tokenizer, tmp_path):
    data = Path(__file__).parent / "data" / "hub" / "longbench_trec.jsonl"
    config = EvalConfig(
        model="smollm2-test",
        benchmark="longbench",
        subset="trec",
        data_files=str(data),
        methods=("none", "knorm"),
        ratios=(0.5,),
        samples=2,
    )
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 4
    records = list(ResultStore(tmp_path))
    assert {(r["benchmark"], r["length"], r["task"], r["metric"]) for r in records} == {
        ("longbench", None, "trec", "classification_score_first_line")
    }
    assert all(0 <= r["score"] <= 100 for r in records)
    assert all(0 < r["answer_nll"] < 20 for r in records)


def test_answer_nll_reads_at_most_the_tokens_an_answer_may_have(model, tokenizer, tmp_path):
    """A reference longer than ``max_new_tokens`` is cut there: the positions fed stay inside the window
    that the prompt check guaranteed."""
    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "hub" / "longbench_trec.jsonl").open()]
    data = tmp_path / "long_answer.jsonl"
    data.write_text(json.dumps({**rows[0], "answers": ["Location of a famous tower in Paris"], "max_new_tokens": 2}))
    config = EvalConfig(model="smollm2-test", benchmark="longbench", subset="trec", data_files=str(data),
                        methods=("none",), ratios=(0.5,), samples=1)
    run(config, model, tokenizer, ResultStore(tmp_path / "store"), progress=False)
    [record] = ResultStore(tmp_path / "store")
    [(_, sample)] = plan_samples(config, tokenizer)
    answer_ids = tokenizer.encode(" Location of a famous tower in Paris", return_tensors="pt", add_special_tokens=False)
    assert answer_ids.shape[1] > 2
    assert record["answer_nll"] == pytest.approx(answer_nll_in_one_pass(model, tokenizer, sample, answer_ids[:, :2]),
                                                 abs=1e-4)


def answer_nll_in_one_pass(model, tokenizer, sample, answer_ids: torch.Tensor) -> float:
    """The reference for the runner's answer NLL: the mean NLL of ``answer_ids (1, A)`` from one uncompressed forward
    pass over the sample's prompt followed by them."""
    ids = torch.cat([*encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix), answer_ids], 1)
    with torch.no_grad():
        logits = model(ids).logits[0, -answer_ids.shape[1] - 1 : -1]
    return torch.nn.functional.cross_entropy(logits, answer_ids[0]).item()


def test_bad_benchmark_settings_are_named():
    with pytest.raises(ValueError, match="unknown benchmark 'longbook'"):
        EvalConfig(model="m", benchmark="longbook")
    with pytest.raises(ValueError, match="unknown longbench subset 'nope'"):
        EvalConfig(model="m", benchmark="longbench", subset="nope")
    with pytest.raises(ValueError, match="unknown method 'h2o'"):
        EvalConfig(model="m", methods=("h2o",))
    with pytest.raises(ValueError, match="only NestedKV methods take"):
        EvalConfig(model="m", methods=("snapkv:n_recent=64",))
    with pytest.raises(ValueError, match="'recent=64' is not field=value with a field among"):
        EvalConfig(model="m", methods=("nestedkv:recent=64",))
    with pytest.raises(ValueError, match="pool_size must be odd"):
        EvalConfig(model="m", methods=("nestedkv:pool_size=4",))


def test_nestedkv_methods_take_press_arguments_after_their_name():
    press = make_press("nestedkv-global:n_recent=64:scales=global+window:pool=mean:tau=0.5", 0.9)
    assert (press.compression_ratio, press.n_recent, press.scales, press.pool, press.tau) == (
        0.9, 64, ("global", "window"), "mean", 0.5
    )
    assert make_press("nestedkv-global", 0.9).scales == ("global",)  # the base entry is left as it was


@pytest.mark.slow
def test_quick_preset_end_to_end(default_model, tmp_path, monkeypatch, capsys):
    """The README's quick benchmark, as a user runs it: eval, then report (~20 minutes here)."""
    from nestedkv import cli

    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: default_model)
    assert cli.main(["eval", "--preset", "quick", "--out", str(tmp_path)]) == 0
    assert cli.main(["report", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| nestedkv |" in out and "Mean score over 13 tasks" in out
    assert (tmp_path / "task_heatmap.png").exists()


def test_query_aware_compresses_the_question_with_the_context(model, tokenizer, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("nestedkv.bench.runner.prefill_once", lambda m, ids: seen.append(ids) or prefill_once(m, ids))
    config = EvalConfig(
        model="m",
        tasks=("niah_single_1",),
        lengths=(512,),
        methods=("nestedkv",),
        ratios=(0.5,),
        samples=1,
        query_aware=True,
    )
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 1
    sample = build_samples("niah_single_1", 1, tokenizer, 512)[0]
    question_ids = tokenizer(sample.question, add_special_tokens=False).input_ids
    context_ids = seen[0][0].tolist()
    assert any(context_ids[i : i + len(question_ids)] == question_ids for i in range(len(context_ids)))
    assert next(iter(ResultStore(tmp_path)))["query_aware"] is True


def test_a_hub_only_method_without_its_files_stops_the_run_with_one_line(model, tokenizer, tmp_path, monkeypatch):
    """Q-Filter downloads its filters from the Hugging Face hub: where they can be neither downloaded nor
    found in the local cache, every sample would fail alike, so the run stops with one line."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    config = EvalConfig(
        model="m", tasks=("niah_single_2",), lengths=(640,), ratios=(0.75,), methods=("qfilter",), samples=1, seed=7
    )
    with pytest.raises(ConnectionError, match="method qfilter needs files from the Hugging Face hub"):
        run(config, model, tokenizer, ResultStore(tmp_path), progress=False)
    assert all(record["method"] == "none" for record in ResultStore(tmp_path))  # only what was measured before
