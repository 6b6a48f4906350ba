"""Hub benchmark loaders on tiny local files in the hub datasets' format, and their metrics."""

from __future__ import annotations

import difflib
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from nestedkv.bench.hub import (
    BENCHMARKS,
    HubSample,
    load_hub_samples,
    longbench_e_bucket,
    metric_for,
    subsets,
)
from nestedkv.bench.metrics import METRICS, score_sample

DATA = Path(__file__).parent / "data" / "hub"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets``' cache of the local files out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


def load(benchmark: str, subset: str | None, name: str, **kwargs) -> list[HubSample]:
    return load_hub_samples(benchmark, subset, data_files=str(DATA / name), **kwargs)


def test_ruler_rows_become_samples_grouped_by_task():
    samples = load("ruler", "4096", "ruler_4096.jsonl")
    assert [(s.task, s.index) for s in samples] == [
        ("niah_single_1", 0),
        ("niah_single_1", 1),
        ("niah_single_1", 2),
        ("qa_1", 0),
        ("vt", 0),
    ]
    niah, qa, vt = samples[0], samples[3], samples[4]
    assert isinstance(niah, HubSample)
    assert niah.context.startswith("A special magic number is hidden") and "4821937" in niah.context
    assert niah.question == "What is the special magic number for tender-ratio mentioned in the provided text? "
    assert niah.answer_prefix == "The special magic number for tender-ratio mentioned in the provided text is"
    assert niah.answers == ("4821937",) and niah.max_new_tokens == 128 and niah.metric == "string_match_all"
    assert qa.answers == ("Paris", "Paris, France") and qa.max_new_tokens == 32 and qa.metric == "string_match_part"
    assert vt.answers == ("QWERT", "ASDFG") and vt.max_new_tokens == 30 and vt.metric == "string_match_all"


def test_n_keeps_nested_seeded_subsets_per_task():
    one = load("ruler", "4096", "ruler_4096.jsonl", n=1)
    two = load("ruler", "4096", "ruler_4096.jsonl", n=2)
    assert [s.task for s in one] == ["niah_single_1", "qa_1", "vt"]
    assert [s.task for s in two] == ["niah_single_1", "niah_single_1", "qa_1", "vt"]
    assert set(one) <= set(two)
    assert load("ruler", "4096", "ruler_4096.jsonl", n=2) == two
    picks = {tuple(s.index for s in load("ruler", "4096", "ruler_4096.jsonl", n=1, seed=seed)) for seed in range(8)}
    assert len(picks) > 1  # the seed chooses which niah row is kept
    assert load("ruler", "4096", "ruler_4096.jsonl", n=0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        load("ruler", "4096", "ruler_4096.jsonl", n=-1)


def test_longbench_classification_rows_carry_their_classes():
    samples = load("longbench", "trec", "longbench_trec.jsonl")
    assert [s.answers for s in samples] == [("Location",), ("Human being",)]
    sample = samples[1]
    assert sample.task == "trec" and sample.metric == "classification_score_first_line"
    assert sample.max_new_tokens == 84 and sample.answer_prefix == "Type:" and sample.length == 40
    assert sample.question == "Question: Who painted the Mona Lisa ?\n"
    assert "Human being" in sample.all_classes and len(sample.all_classes) == 6
    assert score_sample(sample.metric, " Human being\nLocation", sample.answers, all_classes=sample.all_classes) == 100
    assert score_sample(sample.metric, "Location", sample.answers, all_classes=sample.all_classes) == 0


def test_longbench_e_from_parquet_with_length_buckets(tmp_path: Path):
    parquet = tmp_path / "qasper_e.parquet"
    datasets.load_dataset("json", data_files=str(DATA / "longbench_e_qasper.jsonl"), split="train").to_parquet(parquet)
    for subset in ("qasper", "qasper_e", "qasper-e"):
        samples = load_hub_samples("longbench-e", subset, data_files=str(parquet))
        assert [s.task for s in samples] == ["qasper_e", "qasper_e"]
    first, second = samples
    assert first.metric == "qa_f1_score" and first.max_new_tokens == 148 and first.all_classes == ()
    assert first.answers == ("SQuAD", "the SQuAD dataset") and first.context.startswith("You are given a scientific")
    assert (longbench_e_bucket(first.length), longbench_e_bucket(second.length)) == ("0-4k", "8k+")
    assert longbench_e_bucket(4000) == "4-8k"
    with pytest.raises(ValueError, match="narrativeqa"):  # not a LongBench-E task
        load_hub_samples("longbench-e", "narrativeqa", data_files=str(parquet))


def test_subset_may_come_from_the_task_column_of_a_local_file():
    samples = load("longbench-e", None, "longbench_e_qasper.jsonl")
    assert [s.task for s in samples] == ["qasper_e", "qasper_e"]
    assert load("longbench", None, "longbench_trec.jsonl")[0].metric == "classification_score_first_line"


def test_loogle_answers_and_metrics():
    (cloze,) = load("loogle", "shortdep_cloze", "loogle_shortdep_cloze.jsonl")
    assert cloze.metric == "cloze_exact_match" and cloze.max_new_tokens == 50 and cloze.answer_prefix == "Answer:"
    assert cloze.answers == ('{"<mask-0>": "Ada Lovelace", "<mask-1>": "London"}',)
    assert score_sample(cloze.metric, "{'<mask-0>': 'Ada Lovelace', '<mask-1>': 'Paris'}", cloze.answers) == 50
    (qa,) = load("loogle", "shortdep_qa", "loogle_shortdep_qa.jsonl")
    assert qa.metric == "rouge_l_recall" and qa.max_new_tokens == 300
    assert qa.answers == ("The bridge was opened in 1894.",)
    assert score_sample(qa.metric, "It was opened in 1894", qa.answers) == pytest.approx(100 * 4 / 6)


def test_infinitebench_choice_label_is_option_text_and_letter():
    (choice,) = load("infinitebench", "longbook_choice_eng", "infinitebench_longbook_choice_eng.jsonl")
    assert choice.answers == ("Walking Georgie", "A") and choice.metric == "infinitebench_choice"
    assert choice.max_new_tokens == 60 and choice.answer_prefix == "The letter of the correct answer is"
    assert score_sample(choice.metric, " A", choice.answers) == 100
    assert score_sample(choice.metric, "The answer is: Walking Georgie", choice.answers) == 100
    assert score_sample(choice.metric, "B. Taking care of Totty", choice.answers) == 0
    (passkey,) = load("infinitebench", "passkey", "infinitebench_passkey.jsonl")
    assert passkey.metric == "infinitebench_first_int" and passkey.max_new_tokens == 26
    assert passkey.answers == ("71432",)
    assert score_sample(passkey.metric, " 71432.", passkey.answers) == 100


def test_every_task_has_a_known_metric():
    for benchmark in BENCHMARKS:
        tasks = ("niah_single_1", "qa_2") if benchmark == "ruler" else subsets(benchmark)
        for task in tasks:
            assert metric_for(benchmark, task) in METRICS


def test_unknown_names_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown benchmark 'scrolls'.*longbench-e"):
        load_hub_samples("scrolls", "x")
    with pytest.raises(ValueError, match="unknown longbench subset 'qaspr'.*narrativeqa"):
        load_hub_samples("longbench", "qaspr")
    with pytest.raises(ValueError, match="unknown ruler subset '2048'.*4096"):
        load_hub_samples("ruler", "2048")
    with pytest.raises(ValueError, match="unknown infinitebench subset 'longbook_sum_eng'"):
        load_hub_samples("infinitebench", "longbook_sum_eng")
    with pytest.raises(ValueError, match="choose a loogle subset.*shortdep_qa"):
        load_hub_samples("loogle", None)


def test_rows_without_the_prompt_columns_are_rejected(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "question": "q", "answer": ["a"], "task": "passkey"}\n')
    with pytest.raises(ValueError, match=r"lacks columns \['answer_prefix', 'max_new_tokens'\]"):
        load_hub_samples("infinitebench", "passkey", data_files=str(bad))


def test_unreachable_hub_fails_fast_with_a_clear_message(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = r"cannot reach the Hugging Face hub to load Xnhyacinth/LongBench \(qasper\); pass data_files=\.\.\."
    with pytest.raises(ConnectionError, match=message):
        load_hub_samples("longbench", "qasper", n=2)


# --------------------------------------------------------------------------------------------
# Metrics on hand cases


def test_longbench_qa_f1_is_best_over_references():
    assert score_sample("qa_f1_score", "The Eiffel Tower, Paris", ["Eiffel Tower"]) == pytest.approx(80)
    assert score_sample("qa_f1_score", "The Eiffel Tower, Paris", ["Paris", "Eiffel Tower"]) == pytest.approx(80)
    assert score_sample("qa_f1_score", "an apple", ["the"]) == 0  # articles only: nothing to share
    assert score_sample("qa_f1_score_first_line", "\n Paris\nEiffel Tower", ["Eiffel Tower"]) == 0


def test_rouge_l_is_the_rouge_packages_summary_level_score():
    assert score_sample("rouge_score", "the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(80)
    # sentences are split at "." and the LCS words of every sentence pair are united
    assert score_sample("rouge_score", "cat. dog", ["dog cat"]) == pytest.approx(100)
    assert score_sample("rouge_l_recall", "the cat", ["the cat is on the mat"]) == pytest.approx(40)
    assert score_sample("rouge_score", "", ["a summary"]) == 0  # the package raises; LongBench scores 0
    assert score_sample("rouge_score_first_line", "a summary\nmore", ["a summary"]) == pytest.approx(100)


def test_classification_retrieval_count_and_code_similarity():
    classes = ["Location", "Human being", "Human"]
    assert score_sample("classification_score", "Human being", ["Human being"], all_classes=classes) == 100
    assert score_sample("classification_score", "Location or Human being", ["Human being"], all_classes=classes) == 50
    with pytest.raises(ValueError, match="all_classes"):
        score_sample("classification_score", "Location", ["Location"])
    assert score_sample("retrieval_score", "Paragraph 3", ["Paragraph 3"]) == 100
    assert score_sample("retrieval_score", "Paragraph 3 or 4", ["Paragraph 3"]) == 50
    assert score_sample("retrieval_zh_score", "段落12", ["段落12"]) == 100
    assert score_sample("count_score", "There are 7 unique paragraphs.", ["7"]) == 100
    assert score_sample("count_score", "7 or 8", ["7"]) == 50 and score_sample("count_score", "none", ["7"]) == 0
    code = "    return x + 1"
    assert score_sample("code_sim_score", "```python\n# next line\n" + code + "\n```", [code]) == 100
    ratio = difflib.SequenceMatcher(None, "return x+1", code).ratio()
    assert score_sample("code_sim_score", "return x+1", [code]) == pytest.approx(round(100 * ratio))


def test_infinitebench_scorers():
    assert score_sample("infinitebench_kv_retrieval", 'is: "9f2c-77".', ["9f2c-77"]) == 100
    assert score_sample("infinitebench_kv_retrieval", "9f2c-7", ["9f2c-77"]) == 0
    assert score_sample("infinitebench_first_int", "is 12 then 71432", ["71432"]) == 0
    assert score_sample("infinitebench_code_run", "The return value is: -12", ["-12"]) == 100
    assert score_sample("infinitebench_code_debug", "The answer is: func_3", ["func_3", "C"]) == 100
    assert score_sample("infinitebench_code_debug", "B", ["func_3", "C"]) == 0
    assert score_sample("infinitebench_math_find", "The largest is 94.", ["94"]) == 100
    assert score_sample("infinitebench_math_calc", "[8, 5, 9, 3]", ["8", "5", "7", "3"]) == 50
    assert score_sample("infinitebench_longdialogue_qa", "It is probably Ace.", ["ACE", "ACE ROTHSTEIN"]) == 100
    assert score_sample("qa_f1_zh_char_score", "北京", ["北京市"]) == pytest.approx(80)


def test_loogle_cloze_scores_share_of_masks():
    reference = ['{"<mask-0>": "Bob Smith", "<mask-1>": "Paris"}']
    assert score_sample("cloze_exact_match", "{'<mask-0>': 'Bob', '<mask-1>': 'Paris'}", reference) == 50
    assert score_sample("cloze_partial_match", "{'<mask-0>': 'Bob', '<mask-1>': 'Paris'}", reference) == 100
    assert score_sample("cloze_exact_match", "Bob and Paris", reference) == 0


def test_chinese_segmentation_metrics_need_jieba():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install jieba"):
            score_sample("qa_f1_zh_score", "北京", ["北京"])
    else:
        assert score_sample("qa_f1_zh_score", "北京", ["北京"]) == 100
