"""The documents benchmark: real source files, a fixed dev/test split, continuation loss and code completion."""

import math
from dataclasses import replace

import pytest
import torch

from nestedkv.bench.documents import (
    CONTINUATION_TOKENS,
    SPLITS,
    build_document_samples,
    documents,
    greedy_agreement_and_nll,
    split_of,
)
from nestedkv.bench.methods import make_press
from nestedkv.bench.plan import EvalConfig
from nestedkv.bench.replay import compress_replay, feed, prefill_once
from nestedkv.bench.report import write_report
from nestedkv.bench.runner import run
from nestedkv.bench.store import ResultStore


def test_agreement_and_nll_on_hand_made_logits():
    targets = torch.tensor([0, 1, 2, 0])
    reference = torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [9, 0, 0]])
    same = greedy_agreement_and_nll(reference, reference, targets)
    assert same["score"] == 100 and same["delta_nll"] == 0
    # two positions predict another token; uniform logits cost log(3) nats on every position
    other = torch.tensor([[9.0, 0, 0], [9, 0, 0], [0, 0, 9], [0, 9, 0]])
    assert greedy_agreement_and_nll(other, reference, targets)["score"] == 50
    uniform = greedy_agreement_and_nll(torch.zeros(4, 3), reference, targets)
    assert uniform["nll"] == pytest.approx(math.log(3))
    assert uniform["delta_nll"] == pytest.approx(math.log(3) - same["nll"])


def test_splits_are_disjoint_fixed_and_both_populated():
    dev, test = (dict(documents(split, 20_000)) for split in SPLITS)
    assert len(dev) > 20 and len(test) > 20 and not set(dev) & set(test)
    assert all(split_of(name) == "test" for name in test)
    assert all(not name.startswith("test/") and "/tests/" not in name for name in dev | test)
    assert [name for name, _ in documents("test", 20_000)] == list(test)  # a fixed order


def test_document_samples_are_the_files_own_tokens_and_lines(tokenizer):
    continuation = build_document_samples("continuation", 2, tokenizer, 512, "dev")
    assert len(continuation) == 2 and continuation[0].answers != continuation[1].answers
    for sample in continuation:
        assert sample.context_ids.shape == (1, 512) and sample.target_ids.shape == (1, CONTINUATION_TOKENS + 1)
        text = tokenizer.decode(torch.cat([sample.context_ids, sample.target_ids], 1)[0], skip_special_tokens=True)
        assert text[:200] in dict(documents("dev", 0))[sample.context]
    code = build_document_samples("code-completion", 2, tokenizer, 1024, "test")
    assert len(code) == 2
    for sample in code:
        source = dict(documents("test", 0))
        code = sample.context.split("\n", 1)[1]  # after LCC's instruction line
        text = next(text for text in source.values() if code in text)
        assert text[text.index(code) + len(code) :].splitlines()[0].strip() == sample.answers[0]


def test_continuation_runs_through_eval_and_its_positions_are_right(model, tokenizer, tmp_path):
    """The uncompressed continuation's NLL equals one forward pass over context + continuation (the
    teacher-forced tokens sit at the right positions); compressed methods lose something; the report
    has both tables."""
    config = EvalConfig(
        model="m", benchmark="documents", tasks=("continuation",), lengths=(512,), ratios=(0.9,),
        methods=("none", "nestedkv", "knorm"), samples=1, seed=1,
    )
    assert run(config, model, tokenizer, ResultStore(tmp_path), progress=False) == 3
    records = {r["method"]: r for r in ResultStore(tmp_path)}
    sample = build_document_samples("continuation", 1, tokenizer, 512, "test")[0]
    ids = torch.cat([sample.context_ids, sample.target_ids], 1)
    with torch.no_grad():
        logits = model(ids).logits[0, 512:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 513:]).item()
    assert records["none"]["nll"] == pytest.approx(expected, abs=1e-4)
    # that tolerance tells positions apart: the continuation fed 16 positions too early costs far more
    prefill = prefill_once(model, sample.context_ids)
    shifted = feed(model, compress_replay(model, prefill, None), sample.target_ids[:, :-1], 512 - 16, 0)[0]
    assert torch.nn.functional.cross_entropy(shifted, ids[0, 513:]).item() > expected + 0.01
    assert records["none"]["score"] == 100 and records["none"]["delta_nll"] == pytest.approx(0, abs=1e-6)
    for method in ("nestedkv", "knorm"):
        assert records[method]["delta_nll"] > 0 and records[method]["score"] < 100
    # a kvpress-compressed cache holds fewer positions than it has seen: the teacher-forced tokens
    # must still be causal among themselves (fed together = fed one by one)
    together = feed(model, compress_replay(model, prefill, make_press("knorm", 0.9)), sample.target_ids[:, :16], 512, 0)
    cache = compress_replay(model, prefill, make_press("knorm", 0.9))
    one_by_one = [feed(model, cache, sample.target_ids[:, i : i + 1], 512 + i)[0, -1] for i in range(16)]
    torch.testing.assert_close(together[0], torch.stack(one_by_one), atol=2e-4, rtol=1e-4)
    text = write_report(ResultStore(tmp_path), tmp_path / "report")
    assert "## continuation: delta_nll" in text and "## continuation: score" in text
    assert (tmp_path / "report" / "score_vs_ratio_continuation.png").is_file()


def test_a_masked_method_added_to_a_store_loses_what_it_loses_in_a_fresh_run(model, tokenizer, tmp_path):
    """A method added to a store whose ``none`` is already measured (a resumed or extended run) gets the same
    loss as in a run that measures ``none`` first. It once came out uncompressed at its first ratio with masked
    storage: the uncompressed reference, built after its cache, reset the head-wise masks that cache lives by."""
    config = EvalConfig(
        model="m", benchmark="documents", tasks=("continuation",), lengths=(512,), ratios=(0.9,),
        methods=("none", "nestedkv:storage=masked"), samples=1, seed=1,
    )
    run(config, model, tokenizer, ResultStore(tmp_path / "fresh"), progress=False)
    run(replace(config, methods=("none",)), model, tokenizer, ResultStore(tmp_path / "added"), progress=False)
    assert run(config, model, tokenizer, ResultStore(tmp_path / "added"), progress=False) == 1
    fresh, added = ({r["method"]: r for r in ResultStore(tmp_path / run_dir)}["nestedkv:storage=masked"]
                    for run_dir in ("fresh", "added"))
    assert fresh["delta_nll"] > 0.01
    assert added["delta_nll"] == pytest.approx(fresh["delta_nll"], abs=1e-5)


def test_documents_benchmark_refuses_seeds_that_are_not_splits():
    with pytest.raises(ValueError, match="--split dev or test"):
        EvalConfig(model="m", benchmark="documents", seed=7)
    with pytest.raises(ValueError, match="documents task"):
        EvalConfig(model="m", benchmark="documents", tasks=("niah_single_1",))
