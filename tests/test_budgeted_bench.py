"""The budgeted cache's benchmark (nestedkv.bench.budgeted): each measurement runs and reports what it claims."""

import pytest
import torch
from test_correctness import tiny_llama

from nestedkv.bench.budgeted import (
    METHODS,
    continuation,
    continuation_markdown,
    multi_turn,
    multiturn_markdown,
    needle_conversation,
    paired_markdown,
)


@pytest.fixture(scope="module")
def continued():
    model = tiny_llama()
    tokens = torch.randint(0, model.config.vocab_size, (1, 241), generator=torch.Generator().manual_seed(0))
    return {method: continuation(model, tokens, 40, method, 80) for method in METHODS}


def test_continuation_bytes_grow_uncompressed_and_stay_flat_within_a_budget(continued):
    assert all(len(run["loss"]) == 200 for run in continued.values())
    assert continued["none"]["held"][-1] == 240 and continued["none"]["bytes"][-1] > 2.5 * continued["none"]["bytes"][0]
    for method in ("nestedkv", "keydiff", "streamingllm"):
        run = continued[method]
        assert max(run["held"]) <= 80 + 16 + 16
        assert max(run["bytes"][100:]) <= 1.05 * max(run["bytes"][:100])
    rows = [{"method": method, "budget": 0 if method == "none" else 80, **run} for method, run in continued.items()]
    table = continuation_markdown({"rows": rows})
    assert table.count("\n") == 1 + len(rows) and "nestedkv @ 80" in table
    assert paired_markdown({"run": rows}).count("\n") == 1 + 2  # NestedKV against the two peers at its budget


def test_needle_conversation_hides_every_asked_value_once():
    context, questions = needle_conversation(300, 3, seed=5)
    assert len(questions) == 3 and needle_conversation(300, 3, seed=5) == (context, questions)
    for question, value in questions:
        assert context.count(value) == 1 and "special magic number for" in question


def test_multi_turn_answers_from_one_cache_turn_after_turn(model, tokenizer):
    context, questions = needle_conversation(400, 2, seed=3)
    turns = {method: multi_turn(model, tokenizer, context, questions, method, 128, max_new_tokens=12)
             for method in ("none", "nestedkv")}
    assert [turn["seen"] for turn in turns["none"]] == [turn["seen"] for turn in turns["nestedkv"]]
    assert turns["none"][1]["seen"] > turns["none"][0]["seen"] > 500
    assert max(turn["held"] for turn in turns["nestedkv"]) <= 128 + 16 + 16
    assert turns["none"][1]["held"] == turns["none"][1]["seen"]
    rows = [{"method": method, "budget": 128, "conversations": [run]} for method, run in turns.items()]
    assert "| none | " in multiturn_markdown({"rows": rows})
