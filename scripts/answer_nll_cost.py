"""What the answer NLL (``nestedkv.bench.runner.answer_nll``) adds to a benchmark answer: one 4k RULER
sample of the dev split, compressed at r = 0.9 by NestedKV and KeyDiff, and not at all. Printed per
cache: the median of five answer-NLL measurements and the time of the greedy answer alone (question
feed and decoding, as one row of the runner's batch). One thread, as each shard of ``nestedkv eval``
runs here.

    OMP_NUM_THREADS=1 python scripts/answer_nll_cost.py
"""

from __future__ import annotations

import time
from statistics import median

import torch

from nestedkv.bench.methods import make_press
from nestedkv.bench.plan import EvalConfig
from nestedkv.bench.replay import compress_replay, greedy_answers, prefill_once, ragged_rows
from nestedkv.bench.runner import _encode, answer_nll, plan_samples, reference_answer_ids
from nestedkv.models import load_model


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    config = EvalConfig(model="default", tasks=("niah_multikey_2",), lengths=(4096,), ratios=(0.9,), samples=1)
    [(_, sample)] = plan_samples(config, tokenizer)
    context_ids, question_ids = _encode(sample, tokenizer, query_aware=False)
    answer_ids = reference_answer_ids(sample, tokenizer)
    print(f"context {context_ids.shape[1]}, question {question_ids.shape[1]}, answer {answer_ids.shape[1]} tokens")
    with torch.no_grad():
        prefill = prefill_once(model, context_ids)
        for method in ("nestedkv", "keydiff", "none"):
            cache = compress_replay(model, prefill, None if method == "none" else make_press(method, 0.9))
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                answer_nll(model, cache, question_ids, answer_ids, prefill)
                seconds.append(time.perf_counter() - start)
            rows = ragged_rows(model, cache, prefill.context_length)
            start = time.perf_counter()
            [answer] = greedy_answers(model, [rows], question_ids, prefill.context_length, sample.max_new_tokens)
            greedy = time.perf_counter() - start
            print(f"{method}: answer NLL {1000 * median(seconds):.0f} ms (median of 5); the greedy answer alone "
                  f"{1000 * greedy:.0f} ms ({len(answer)} tokens)")


if __name__ == "__main__":
    main()
