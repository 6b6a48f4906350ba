"""Measurements of the budgeted cache (:mod:`nestedkv.streaming`) against kvpress's decoding-time peers.

Three measurements, each ``python -m nestedkv.bench.budgeted <name> --out FILE.json``:

* ``continuation``: a real text (the shipped Austen excerpt) fed token by token after a short prompt,
  as decoding does; per token, the cache's bytes and the model's loss on the next token of the text.
  Flat bytes for a budgeted cache, rising for the uncompressed one; the loss says what the
  evictions cost (teacher forcing, as StreamingLLM's perplexity runs: one text for every method).
* ``multiturn``: SCBench-style, offline from RULER's needle generator: one long context holding
  several needles, then one question per turn, each answered greedily from the cache the earlier
  turns left; per turn, whether the needle's value is in the answer, and the cache's bytes.
* ``prefill``: peak memory of prefilling a prompt of random tokens on a randomly initialised model
  of a real shape, one fresh process per (method, length): one pass, chunks without compression,
  chunks compressed to a budget.

Methods at a budget ``B`` (positions per KV head): ``nestedkv`` is :class:`BudgetedPress`;
``keydiff`` and ``streamingllm`` are kvpress's ``DecodingPress`` (every 16 steps back to ``B``) after a
one-shot prefill press that keeps ``B`` of the context: kvpress's own way to bound a cache.
Every forward pass gets its true positions (``cache_position``), so RoPE stays exact whatever a
press does to the cache's length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

import torch
from kvpress import BasePress, DecodingPress, KeyDiffPress, PrefillDecodingPress, StreamingLLMPress
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nestedkv.bench.methods import split_arguments
from nestedkv.bench.plan import RANDOM_SHAPES
from nestedkv.bench.replay import feed
from nestedkv.bench.report import t_quantile_95
from nestedkv.bench.ruler import _NEEDLE, _distinct, _essay, _insert_at_depths, random_needle_item
from nestedkv.bench.speed import _MemoryProbe, _release_freed_memory_at_once, machine_info, random_config, random_model
from nestedkv.settings import BudgetedSettings, NestedKVConfig
from nestedkv.streaming import BudgetedPress, cache_bytes, most_held, prefill_in_chunks

METHODS = ("none", "nestedkv", "keydiff", "streamingllm")
DECODING_INTERVAL = 16


def make_press(method: str, budget: int, context_tokens: int) -> BasePress | None:
    """The press of ``method`` that keeps ``budget`` positions per KV head of a ``context_tokens`` prompt.

    ``nestedkv`` takes NestedKV switches after its name, as ``nestedkv eval`` does:
    ``nestedkv:recency=0.5`` is :class:`BudgetedPress` with its config's ``recency`` set to 0.5.
    """
    if method == "none":
        return None
    base, options = split_arguments(method, NestedKVConfig.__dataclass_fields__)
    if base == "nestedkv":
        config = dataclasses.replace(BudgetedSettings().config, **options)
        return BudgetedPress(budget=budget, interval=DECODING_INTERVAL, config=config)
    scorer = {"keydiff": KeyDiffPress, "streamingllm": StreamingLLMPress}.get(method)
    if scorer is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    ratio = max(0.0, 1 - budget / context_tokens)
    return PrefillDecodingPress(
        prefilling_press=scorer(compression_ratio=ratio),
        decoding_press=DecodingPress(scorer(), compression_interval=DECODING_INTERVAL, target_size=budget),
    )


def continuation(
    model: PreTrainedModel, tokens: torch.Tensor, prompt: int, method: str, budget: int
) -> dict[str, list[float]]:
    """Prefill ``tokens[:, :prompt]``, then feed the rest one token at a time under ``method``.

    ``-> {"loss": [...], "bytes": [...], "held": [...]}``, one entry per token fed after the prompt:
    the loss (nats) on the token that follows it, the cache's bytes and most held positions after it.
    """
    press = make_press(method, budget, prompt)
    cache, result = DynamicCache(), {"loss": [], "bytes": [], "held": []}
    with press(model) if press is not None else nullcontext():
        logits = feed(model, cache, tokens[:, :prompt], 0)[:, -1]
        for position in range(prompt, tokens.shape[1] - 1):
            logits = feed(model, cache, tokens[:, position : position + 1], position)[:, -1]
            loss = torch.nn.functional.cross_entropy(logits.float(), tokens[:, position + 1])
            result["loss"].append(float(loss))
            result["bytes"].append(cache_bytes(cache))
            result["held"].append(most_held(cache))
    return result


def needle_conversation(n_words: int, turns: int, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """A RULER-style essay haystack holding ``turns`` needles (word keys, 7-digit values) and one question
    per needle, in a random order: ``(context, [(question, value), ...])``."""
    rng = random.Random(seed)
    keys = _distinct(lambda: random_needle_item(rng, "words"), turns)
    values = [random_needle_item(rng, "numbers") for _ in keys]
    needles = [_NEEDLE.format(kind="numbers", key=k, value=v) for k, v in zip(keys, values, strict=True)]
    context = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n" + _insert_at_depths(_essay(n_words), needles, rng)
    )
    order = rng.sample(range(turns), turns)
    questions = [(f"What is the special magic number for {keys[i]} mentioned in the provided text? "
                  "Answer with the number only.", values[i]) for i in order]
    return context, questions


def multi_turn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, context: str, questions: list[tuple[str, str]],
    method: str, budget: int, max_new_tokens: int = 32, chunk_size: int = 512,
) -> list[dict]:
    """Answer ``questions`` one per turn from one cache (the context as the system message, prefilled
    before any question). One dict per turn: answer, hit (the value is in it), bytes, held, seen."""
    messages = [{"role": "system", "content": context}]
    fed = tokenizer.apply_chat_template(messages, tokenize=False)  # the text of every token fed so far
    ids = tokenizer.encode(fed, return_tensors="pt", add_special_tokens=False).to(model.device)
    press = make_press(method, budget, ids.shape[1])
    eos = model.generation_config.eos_token_id
    end_of_turn = set(eos if isinstance(eos, list) else [eos])
    cache, turns = DynamicCache(), []
    with press(model) if press is not None else nullcontext():
        if isinstance(press, BudgetedPress):  # the budgeted cache's own chunked prefill; kvpress's compress one pass
            prefill_in_chunks(model, ids, cache, chunk_size)
        else:
            feed(model, cache, ids, 0)
        seen = ids.shape[1]
        for question, value in questions:
            messages.append({"role": "user", "content": question})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            new = tokenizer.encode(prompt[len(fed) :], return_tensors="pt", add_special_tokens=False)
            logits = feed(model, cache, new.to(model.device), seen)[:, -1]
            seen += new.shape[1]
            answer: list[int] = []
            while len(answer) < max_new_tokens and (not answer or answer[-1] not in end_of_turn):
                answer.append(int(logits.argmax(-1)))
                logits = feed(model, cache, torch.tensor([answer[-1:]], device=model.device), seen)[:, -1]
                seen += 1
            reply = tokenizer.decode(answer, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
            fed = prompt + reply + (tokenizer.decode(answer[-1:]) if answer[-1] in end_of_turn else "")
            turns.append({"answer": reply, "hit": value in reply, "bytes": cache_bytes(cache),
                          "held": most_held(cache), "seen": seen})
    return turns


def _prefill_peak(shape: str, length: int, method: str, budget: int, chunk_size: int, threads: int) -> dict:
    """In a fresh process: peak memory above the loaded model of prefilling ``length`` random tokens."""
    _release_freed_memory_at_once()
    torch.set_num_threads(threads)
    model = random_model(random_config(shape), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    probe = _MemoryProbe(model.device)
    start = time.perf_counter()
    if method == "one-pass":  # every method keeps only the last position's logits
        cache = DynamicCache()
        feed(model, cache, ids, 0)
    elif method == "chunked":
        cache = prefill_in_chunks(model, ids, chunk_size=chunk_size)
    else:
        with BudgetedPress(budget=budget)(model):
            cache = prefill_in_chunks(model, ids, chunk_size=chunk_size)
    return {"shape": shape, "length": length, "method": method, "budget": budget, "chunk_size": chunk_size,
            "peak_bytes": probe.peak(), "cache_bytes": cache_bytes(cache), "held": most_held(cache),
            "seconds": time.perf_counter() - start}


def prefill_peaks(shape: str, lengths: list[int], methods: list[str], budget: int, chunk_size: int) -> list[dict]:
    rows = []
    for length in lengths:
        for method in methods:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                rows.append(pool.submit(_prefill_peak, shape, length, method, budget, chunk_size,
                                        torch.get_num_threads()).result())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# --- the report ---------------------------------------------------------------------------------------


def _label(row: dict) -> str:
    return row["method"] if row["method"] == "none" else f"{row['method']} @ {row['budget']}"


def _mean_and_ci(values: list[float], block: int = 64) -> tuple[float, float]:
    """Mean and a 95 % half-width (Student's t) from the means of consecutive ``block``-token blocks
    (neighbouring tokens' losses are correlated, blocks much less)."""
    means = [sum(values[i : i + block]) / len(values[i : i + block]) for i in range(0, len(values), block)]
    centre = sum(means) / len(means)
    spread = (sum((m - centre) ** 2 for m in means) / (len(means) - 1)) ** 0.5 if len(means) > 1 else 0.0
    return sum(values) / len(values), t_quantile_95(len(means) - 1) * spread / len(means) ** 0.5


def continuation_markdown(report: dict, plot: Path | None = None, baseline: dict | None = None) -> str:
    """Table: bytes at the start, the end and at most, most held positions, loss and its difference
    from the uncompressed cache (paired, token by token: ``baseline``, the ``none`` row of a run on the
    same tokens, where this run has none); and a plot of bytes against tokens."""
    rows = report["rows"]
    baseline = next((row for row in rows if row["method"] == "none"), baseline)
    lines = ["| method @ budget | cache MiB after 1 token | at the end | most | most held per head | loss (nats) "
             "| loss − none (95 % CI) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        loss, _ = _mean_and_ci(row["loss"])
        difference = "—"
        if baseline is not None and row is not baseline:
            delta, ci = _mean_and_ci([a - b for a, b in zip(row["loss"], baseline["loss"], strict=True)])
            difference = f"{delta:+.3f} ± {ci:.3f}"
        lines.append(f"| {_label(row)} | {row['bytes'][0] / 2**20:.1f} | {row['bytes'][-1] / 2**20:.1f} | "
                     f"{max(row['bytes']) / 2**20:.1f} | {max(row['held'])} | {loss:.3f} | {difference} |")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

        figure, axes = pyplot.subplots(figsize=(7, 4))
        for row in rows:
            axes.plot(range(1, len(row["bytes"]) + 1), [b / 2**20 for b in row["bytes"]], label=_label(row))
        axes.set_xlabel("tokens fed after the prompt")
        axes.set_ylabel("cache MiB")
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(plot, dpi=110)
        pyplot.close(figure)
    return "\n".join(lines)


def paired_markdown(runs: dict[str, list[dict]]) -> str:
    """Each NestedKV row against every other row at the same budget, token by token, across runs on the
    same text. runs: run name -> rows."""
    lines = ["| NestedKV run @ budget | against | loss difference (95 % CI) |", "|---|---|---|"]
    for name, rows in runs.items():
        for row in rows:
            if not row["method"].startswith("nestedkv"):
                continue
            for other_name, other_rows in runs.items():
                for other in other_rows:
                    if other is row or other["budget"] != row["budget"] or len(other["loss"]) != len(row["loss"]):
                        continue
                    delta, ci = _mean_and_ci([a - b for a, b in zip(row["loss"], other["loss"], strict=True)])
                    lines.append(f"| `{name}` {_label(row)} | `{other_name}` {_label(other)} | "
                                 f"{delta:+.3f} ± {ci:.3f} |")
    return "\n".join(lines)


def _wilson(hits: int, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def multiturn_markdown(report: dict) -> str:
    """Table: accuracy per turn (hits / questions), overall with its 95 % Wilson interval, mean bytes
    after the last turn and most held positions."""
    rows = report["rows"]
    turns = max(len(conversation) for row in rows for conversation in row["conversations"])
    head = "| method @ budget | " + " | ".join(f"turn {t + 1}" for t in range(turns))
    lines = [head + " | all (95 % CI) | cache MiB after the last turn | most held per head |",
             "|---|" + "---|" * (turns + 3)]
    for row in rows:
        conversations = row["conversations"]
        per_turn = [[c[t]["hit"] for c in conversations if len(c) > t] for t in range(turns)]
        hits = [h for turn in per_turn for h in turn]
        low, high = _wilson(sum(hits), len(hits))
        last_bytes = sum(c[-1]["bytes"] for c in conversations) / len(conversations)
        held = max(turn["held"] for c in conversations for turn in c)
        cells = " | ".join(f"{sum(turn)}/{len(turn)}" for turn in per_turn)
        lines.append(f"| {_label(row)} | {cells} | {sum(hits)}/{len(hits)} ({low:.2f}–{high:.2f}) | "
                     f"{last_bytes / 2**20:.1f} | {held} |")
    return "\n".join(lines)


def prefill_markdown(report: dict) -> str:
    lines = ["| shape | prompt tokens | method | peak MiB above the model | cache MiB after | most held per head | s |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        method = row["method"] + (f" (budget {row['budget']})" if row["method"] == "budgeted" else "")
        lines.append(f"| {row['shape']} | {row['length']} | {method} | {row['peak_bytes'] / 2**20:.0f} | "
                     f"{row['cache_bytes'] / 2**20:.1f} | {row['held']} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def austen_tokens(tokenizer: PreTrainedTokenizerBase, n: int, offset: int = 0) -> torch.Tensor:
    """``n`` tokens of the shipped Austen excerpt from its token ``offset`` on: ``(1, n)``."""
    text = resources.files("nestedkv").joinpath("data/austen.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < offset + n:
        raise ValueError(f"the Austen excerpt has {ids.shape[1]} tokens, fewer than {offset} + {n}")
    return ids[:, offset : offset + n]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nestedkv.bench.budgeted", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measurement", choices=("continuation", "multiturn", "prefill", "report"))
    parser.add_argument("--out", required=True, help="JSON file to write (report: the markdown file)")
    parser.add_argument("--results", default="benchmarks/budgeted", help="report: the JSON files' directory")
    parser.add_argument("--methods", default=None, help="comma list (default: every method of the measurement)")
    parser.add_argument("--budgets", type=_ints, default=[256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=2048, help="continuation: tokens fed after the prompt")
    parser.add_argument("--prompt", type=int, default=256, help="continuation: prompt tokens")
    parser.add_argument("--offset", type=int, default=0,
                        help="continuation: first token of the text (reported runs: 0; development: 20000)")
    parser.add_argument("--samples", type=int, default=4, help="multiturn: conversations")
    parser.add_argument("--turns", type=int, default=4, help="multiturn: questions per conversation")
    parser.add_argument("--words", type=int, default=2500, help="multiturn: words of haystack")
    parser.add_argument("--seed", type=int, default=1000, help="multiturn: first conversation's seed")
    parser.add_argument("--shape", choices=sorted(RANDOM_SHAPES), default="llama-3.2-1b", help="prefill")
    parser.add_argument("--lengths", type=_ints, default=[2048, 8192, 32768], help="prefill: prompt lengths")
    parser.add_argument("--chunk-size", type=int, default=512)
    args = parser.parse_args(argv)
    if args.measurement == "report":
        out, parts = Path(args.out), []
        to_markdown = {"continuation": continuation_markdown, "multiturn": multiturn_markdown,
                       "prefill": prefill_markdown}
        reports = {path: json.loads(path.read_text()) for path in sorted(Path(args.results).glob("*.json"))}
        uncompressed = {len(row["loss"]): row for report in reports.values() if report["measurement"] == "continuation"
                        for row in report["rows"] if row["method"] == "none"}  # by tokens fed: the same text
        for path, report in reports.items():
            extra = {}
            if report["measurement"] == "continuation":
                extra["plot"] = out.parent / f"budgeted_bytes_{path.stem}.png"
                extra["baseline"] = uncompressed.get(len(report["rows"][0]["loss"]))
            parts.append(f"### `{path.name}`: {report['measurement']} ({report['started']}, "
                         f"`{' '.join(report['argv'][1:])}`)\n\n" + to_markdown[report["measurement"]](report, **extra))
        runs = {path.stem: report["rows"] for path, report in reports.items()
                if report["measurement"] == "continuation"}
        if runs:
            parts.append("### continuation: NestedKV against the other methods at the same budget, paired by token\n\n"
                         + paired_markdown(runs))
        out.write_text("\n\n".join(parts) + "\n")
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report: dict = {"measurement": args.measurement, "started": started, "argv": sys.argv,
                    "machine": machine_info(torch.device("cpu")), "rows": []}

    def save() -> None:  # after every row: an interrupted run keeps what it finished
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)

    if args.measurement == "prefill":
        methods = args.methods.split(",") if args.methods else ["one-pass", "chunked", "budgeted"]
        for length in args.lengths:
            report["rows"] += prefill_peaks(args.shape, [length], methods, args.budgets[0], args.chunk_size)
            save()
        return
    from nestedkv.models import load_model

    methods = args.methods.split(",") if args.methods else list(METHODS)
    for method in methods:  # an unknown method or switch is refused before the model loads
        make_press(method, args.budgets[0], 4096)
    model, tokenizer = load_model()
    runs: list[tuple[str, int]] = [("none", 0)] * ("none" in methods) + [
        (method, budget) for budget in args.budgets for method in methods if method != "none"
    ]
    measure: Callable[[str, int], dict]
    if args.measurement == "continuation":
        tokens = austen_tokens(tokenizer, args.prompt + args.tokens + 1, args.offset)

        def measure(method: str, budget: int) -> dict:
            return continuation(model, tokens, args.prompt, method, budget)
    else:
        conversations = [needle_conversation(args.words, args.turns, args.seed + i) for i in range(args.samples)]

        def measure(method: str, budget: int) -> dict:
            return {"conversations": [multi_turn(model, tokenizer, context, questions, method, budget)
                                      for context, questions in conversations]}
    for method, budget in runs:
        start = time.perf_counter()
        row = {"method": method, "budget": budget, **measure(method, budget), "seconds": time.perf_counter() - start}
        report["rows"].append(row)
        save()
        print(f"{method} {budget}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
