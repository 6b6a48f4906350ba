"""Command line: parse, call the library, print. ``nestedkv --help`` lists the commands.

Each command checks every option (and the model's name, device, dtype and context window) before it
imports torch, transformers or kvpress: bad input is refused in a fraction of a second, with the
message the library would give. The modules it reads until then import none of them (a test keeps
it so); what computes is imported inside the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from nestedkv.bench.documents import DOCUMENTS
from nestedkv.bench.hub import BENCHMARKS as HUB_BENCHMARKS
from nestedkv.bench.methods import METHODS
from nestedkv.bench.plan import (
    LOCAL_BENCHMARKS,
    LOCAL_RULER,
    LONG_DECODING_RATIO,
    PRESETS,
    QUICK,
    RANDOM_SHAPES,
    SPLIT_SEEDS,
    BenchSettings,
    EvalConfig,
    check_window,
    load_samples,
)
from nestedkv.bench.report import write_report
from nestedkv.bench.ruler import TASKS, QADataset, read_hotpotqa, read_squad, task_names
from nestedkv.bench.store import ResultStore
from nestedkv.files import check_new_file, check_output_dir, check_readable, file_error, read_text
from nestedkv.models import (
    DEFAULT_MODEL,
    check_device,
    check_fits,
    check_load_options,
    dtype_name,
    load_model,
    parse_dtype,
)
from nestedkv.settings import DEFAULT_BUDGET, PAPER_SETTINGS, BudgetedSettings, NestedKVSettings
from nestedkv.validation import check_number, check_ratio

if TYPE_CHECKING:
    from nestedkv.press import NestedKVPress

DEMO_RATIO = 0.75


def demo_sample() -> dict[str, str]:
    """The shipped demo: a RULER niah_single_1 sample of ~2.9k tokens (``nestedkv.bench.ruler``,
    seed 5), one 7-digit number hidden in filler text; keys context, question, answer_prefix, answer."""
    return json.loads(resources.files("nestedkv").joinpath("data/demo.json").read_text(encoding="utf-8"))


# --- NestedKV options, generated from the press's own fields so the two never drift apart ------

_PRESS_FIELDS = dataclasses.fields(NestedKVSettings)


def _tuple_of(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            message = f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


def _lengths_or_none(text: str) -> tuple[int, ...]:
    """Comma-separated token counts, or ``none`` for no length at all."""
    return () if text.strip().lower() == "none" else _tuple_of(int)(text)


def _joined(values: tuple) -> str:
    return ",".join(map(str, values))


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (this process's shard of N), got {text!r}") from None
    return index, count


AUTO = "auto"  # --block-size auto: the paper's rule (block_size None), told apart from an option left unset


def _block_size(text: str) -> int | str:
    return AUTO if text.lower() in ("none", AUTO) else int(text)


def add_press_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`NestedKVPress` field (``--n-sink``, ``--scales global,block``…)."""
    group = parser.add_argument_group("NestedKV options (defaults: the shipped method, docs/tuning.md)")
    group.add_argument("--paper", action="store_true",
                       help="the paper's method: no recent window, no recency ramp, the cached keys only (after "
                       "RoPE), the paper's block sizes (other options still apply)")
    for field in _PRESS_FIELDS:
        default = field.default
        if isinstance(default, tuple):
            kind = _tuple_of(type(default[0]))
            shown = ",".join(map(str, default))
        elif field.name == "block_size":
            kind, shown = _block_size, f"{default} (auto: the paper's clip(N//32, 128, 256))"
        else:
            kind, shown = type(default), default
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=None,  # unset: the shipped default, or the paper's with --paper
            help=f"default: {shown}",
        )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device``: what :func:`nestedkv.models.load_model` takes."""
    parser.add_argument("--model", default=None, help=f"HF id, local dir or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def press_settings(args: argparse.Namespace) -> NestedKVSettings:
    """The NestedKV options given (unset: the shipped default, or the paper's with ``--paper``), checked."""
    options = {field.name: getattr(args, field.name) for field in _PRESS_FIELDS}
    options = {name: None if value == AUTO else value for name, value in options.items() if value is not None}
    return NestedKVSettings(**({**PAPER_SETTINGS, **options} if args.paper else options))


def press_from_args(args: argparse.Namespace) -> NestedKVPress:
    """The press ``--ratio`` and the NestedKV options describe."""
    from nestedkv.press import NestedKVPress

    return NestedKVPress(args.ratio, **vars(press_settings(args)))  # the press checks the ratio


# --- commands ---------------------------------------------------------------------------------


def _check_model_options(args: argparse.Namespace) -> int | None:
    """What ``load_model`` would refuse (device, dtype, a model that does not exist), found before it
    spends half a minute loading and before a hub benchmark is downloaded; returns the model's context window."""
    return check_load_options(args.model, dtype=args.dtype, device=args.device)


def _generate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty")
    answer_prefix = args.answer_prefix
    if args.context is None:
        demo = demo_sample()
        context, question = demo["context"], args.question or demo["question"]
        if args.question is None and answer_prefix is None:
            answer_prefix = demo["answer_prefix"]
    else:
        if args.question is None:
            raise ValueError("--question is required with --context")
        context, question = read_text(args.context, "context file"), args.question
        if not context.strip():
            raise ValueError(f"context file {args.context} is empty")
    check_ratio(args.ratio)
    press_settings(args)
    _check_model_options(args)
    from nestedkv.generate import answer_question

    press = press_from_args(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    answer = answer_question(  # refuses a prompt longer than the model's window, before any compute
        model, tokenizer, context, question, press if press.compression_ratio > 0 else None,
        answer_prefix=answer_prefix or "", max_new_tokens=args.max_new_tokens,
    )
    print(f"question: {question}")
    print(f"answer:   {(answer_prefix or '') + answer.text}".rstrip())
    print(f"press:    NestedKV, compression ratio {press.compression_ratio} ({press.budget} budget, {press.storage})")
    print(answer.cache.format())


def _user_turns(interactive: bool):
    """The user's turns: typed at a ``you>`` prompt in a terminal, else one per line of standard input."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def _chat(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    settings = BudgetedSettings(budget=args.budget, compression_ratio=args.ratio, interval=args.interval,
                                head_slack=args.head_slack)
    check_number("--chunk-size", args.chunk_size, low=1, integer=True)
    context = None
    if args.context is not None:
        context = read_text(args.context, "context file")
        if not context.strip():
            raise ValueError(f"context file {args.context} is empty")
    _check_model_options(args)
    from nestedkv.chat import Chat
    from nestedkv.streaming import BudgetedPress

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    chat = Chat(model, tokenizer, BudgetedPress(**vars(settings)), context=context, chunk_size=args.chunk_size,
                max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if context is not None:
        print(f"context: {args.context}")
        print(chat.status().format(), flush=True)
    for turn in _user_turns(interactive):
        if not interactive:
            print(f"you> {turn}")
        print(f"assistant> {chat.say(turn)}")
        print(chat.status().format(), flush=True)


def _bench(args: argparse.Namespace) -> None:
    check_device(args.device)
    if args.out is not None:
        check_new_file(args.out, "--out")
    overrides = {
        name: getattr(args, name)
        for name in ("length", "batch", "ratios", "scaling_lengths", "decode_lengths", "batched_rows")
    }
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if args.no_peak_memory:
        overrides["peak_memory"] = False
    if args.compiled_score:
        overrides["compiled_score"] = True
    settings = dataclasses.replace(QUICK if args.quick else BenchSettings(), **overrides)
    # The scaling and long-decoding tables use the 1B shape, or the tiny one with the tiny model (tests).
    scaling_shape = "tiny" if args.random_shape == "tiny" else "llama-3.2-1b"
    if args.random_shape is not None:
        if args.model is not None:
            raise ValueError("give --model or --random-shape, not both")
        dtype = dtype_name(args.dtype or "bfloat16")
        window = RANDOM_SHAPES[args.random_shape]["max_position_embeddings"]
    else:
        window = _check_model_options(args)
    decoded = settings.warmup + settings.decode_tokens
    check_fits(settings.length + decoded, window, f"--length {settings.length} plus {decoded} decoded tokens")
    if settings.decode_lengths:
        scaling_window = RANDOM_SHAPES[scaling_shape]["max_position_embeddings"]
        longest = max(settings.decode_lengths)
        check_fits(longest + decoded, scaling_window, f"--decode-lengths {longest} plus {decoded} decoded tokens")
    from nestedkv.bench.speed import format_markdown, random_config, random_model, run_bench

    if args.random_shape is not None:
        config = random_config(args.random_shape)
        model = random_model(config, dtype=parse_dtype(dtype), device=args.device)
        name = f"random-weight {args.random_shape}"
    else:
        model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
        name = args.model or DEFAULT_MODEL
    report = run_bench(
        model, settings, model_name=name, scaling_config=random_config(scaling_shape),
        progress=lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True),
    )
    report = {"command": shlex.join(["nestedkv", *args.argv]), **report}
    print(format_markdown(report))
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nwrote {args.out}")


def _eval_config(args: argparse.Namespace) -> EvalConfig:
    """The run the options describe, every option checked (the model is not loaded yet)."""
    options = dict(PRESETS[args.preset])
    for name in ("tasks", "lengths", "ratios", "methods", "samples", "benchmark"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.split is not None and args.seed is not None:
        raise ValueError(f"--split {args.split} is seed {SPLIT_SEEDS[args.split]}: give --split or --seed, not both")
    seed = SPLIT_SEEDS[args.split or "dev"] if args.seed is None else args.seed
    config = EvalConfig(
        model=args.model or DEFAULT_MODEL, seed=seed, query_aware=args.query_aware,
        squad_path=args.squad, hotpot_path=args.hotpot, subset=args.subset,
        data_files=args.data_files, shard=args.shard, **options,
    )
    if config.benchmark == LOCAL_RULER:
        unknown = set(config.tasks or ()) - set(task_names(args.squad, args.hotpot))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(sorted(unknown))}; choose from {', '.join(task_names())}")
        qa_files = ((args.squad, read_squad, "SQuAD file"), (args.hotpot, read_hotpotqa, "HotpotQA file"))
        for path, reader, what in qa_files:
            if path is not None:
                _check_qa_file(path, reader, what)
    return config


def _check_qa_file(path: str, reader: Callable[[str], QADataset], what: str) -> None:
    """Read a --squad / --hotpot file now, so that a wrong one is named before the model loads."""
    check_readable(path, what)
    try:
        data = reader(path)
    except UnicodeDecodeError as error:
        raise file_error(path, what, error) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"cannot read {what} {path}: not JSON ({error})") from None
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        layout = f"{type(error).__name__}: {error}"
        raise ValueError(f"{what} {path} does not have the dataset's JSON layout ({layout})") from None
    if not data.items:
        raise ValueError(f"{what} {path} holds no answerable question")


def _eval(args: argparse.Namespace) -> None:
    config = _eval_config(args)
    default_out = f"results/{args.preset}" if config.benchmark in LOCAL_BENCHMARKS else (
        f"results/{config.benchmark}-{config.subset or 'all'}"
    )
    out = check_output_dir(args.out or default_out, "--out")
    check_window(config, _check_model_options(args))
    samples = load_samples(config)  # a hub benchmark's data, read before the model: a bad file fails fast
    store = ResultStore(out)
    retried = f", {store.errors} errors to measure again" if store.errors else ""
    print(f"results: {store.path} ({len(store)} already there{retried})", file=sys.stderr)
    from nestedkv.bench import runner

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        added = runner.run(config, model, tokenizer, store, samples=samples, together=not args.one_by_one)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted, {len(store)} results kept, run the same command to resume") from None
    print(f"{added} new results in {store.path}; `nestedkv report --results {store.path.parent}` summarises them")


def _report(args: argparse.Namespace) -> None:
    store = Path(args.results) / "results.jsonl"
    if not store.is_file():
        raise ValueError(f"no results store at {store}: run `nestedkv eval --out {args.results}` first")
    out = check_output_dir(args.out or args.results, "--out")
    print(write_report(ResultStore(args.results), out, args.heatmap_ratio, args.against, args.methods or None))
    print(f"wrote {out / 'report.md'} and its plots (*.png) in {out}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option ends like every other bad input: one line, exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"nestedkv: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nestedkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="compress a context with NestedKV and answer a question about it",
        description="Compress a context (query-agnostic) and answer a question greedily. Without "
        "--context, runs the shipped demo: a 7-digit number hidden in ~2.9k tokens of filler.",
    )
    generate.add_argument("--context", help="text file holding the context (default: the shipped demo)")
    generate.add_argument("--question", help="question about the context")
    generate.add_argument("--answer-prefix", default=None, help="text the answer starts with (primes the model)")
    generate.add_argument("--ratio", type=float, default=DEMO_RATIO, help="fraction of KV removed (default: 0.75)")
    add_model_options(generate)
    generate.add_argument(
        "--max-new-tokens", type=int, default=48,
        help="answer tokens, >= 1; with the prompt, they must fit the model's context window (default: 48)",
    )
    add_press_options(generate)
    generate.set_defaults(run=_generate)

    chat = commands.add_parser(
        "chat",
        help="chat with the model, its cache kept within a budget (NestedKV in a stream)",
        description="A chat whose KV cache never holds much more than --budget positions per KV head (or, with "
        "--ratio, than that share of the conversation): prompts are "
        "prefilled in chunks and compressed after each, answers are compressed while they are generated. After "
        "the context and after each turn a status line says: seen <tokens of the conversation> held <the most "
        "positions a KV head keeps> cache <bytes>. In a terminal, type a turn at the prompt (Ctrl-D ends); "
        "otherwise each line of standard input is one user turn.",
    )
    size = chat.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help=f"positions per KV head the cache keeps (default: {DEFAULT_BUDGET})")
    size.add_argument("--ratio", type=float,
                      help="instead of a budget: the fraction of the tokens seen that is removed (0.75 keeps 1/4)")
    chat.add_argument("--context", help="text file: a document that opens the conversation (the system message)")
    chat.add_argument("--interval", type=int, default=16,
                      help="generated tokens between compressions: the cache's slack (default: 16)")
    chat.add_argument("--head-slack", type=int, default=16,
                      help="positions one KV head may keep above the budget (head-adaptive budgets; default: 16)")
    chat.add_argument("--chunk-size", type=int, default=512, help="tokens prefilled at a time (default: 512)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="answer tokens per turn (default: 256)")
    add_model_options(chat)
    chat.set_defaults(run=_chat)

    bench = commands.add_parser(
        "bench",
        help="measure KV bytes, peak memory, prefill/scoring/decoding time and scaling with context length",
        description="Speed and memory benchmark (not the test suite): no compression, NestedKV ragged and masked, "
        "KeyDiff, at each compression ratio, on a context of random tokens; then scoring time and cache bytes "
        "against context length on Llama-3.2-1B's shape (random weights, no download). Prints Markdown tables.",
    )
    add_model_options(bench)
    full, quick = BenchSettings(), QUICK
    bench.add_argument("--length", type=int, default=None, help=f"context tokens (default: {full.length})")
    bench.add_argument(
        "--batch", type=int, default=None,
        help=f"rows decoded together, each with its own context (default: {full.batch})",
    )
    bench.add_argument("--ratios", type=_tuple_of(float), default=None, help=f"default: {_joined(full.ratios)}")
    bench.add_argument(
        "--scaling-lengths", type=_tuple_of(int), default=None, help=f"default: {_joined(full.scaling_lengths)}"
    )
    bench.add_argument(
        "--batched-rows", type=int, default=None,
        help=f"prompts of different lengths (from --length down towards half of it, left-padded) generated together, "
        f"uncompressed, with NestedKV at r={LONG_DECODING_RATIO:g} and with the budgeted cache keeping "
        f"1 - r of each row's tokens; 0 to skip (default: {full.batched_rows}; "
        "--quick: 0)",
    )
    bench.add_argument(
        "--decode-lengths", type=_lengths_or_none, default=None,
        help=f"contexts of the long-context decoding table, at r={LONG_DECODING_RATIO:g} on the scaling shape "
        f"(caches built from random keys, no prefill); 'none' to skip (default: {_joined(full.decode_lengths)}; "
        "--quick: none)",
    )
    bench.add_argument(
        "--out", default=None, help="also write the report as JSON to this new file (an existing one is kept)"
    )
    bench.add_argument(
        "--quick", action="store_true",
        help=f"short run: length {quick.length}, r={_joined(quick.ratios)}, scaling to {max(quick.scaling_lengths)}, "
        f"{quick.repeats} repeat, {quick.decode_tokens} decoded tokens (explicit options win)",
    )
    bench.add_argument(
        "--no-peak-memory", action="store_true", help="skip the memory measurements (fresh processes on CPU)"
    )
    bench.add_argument(
        "--compiled-score", action="store_true",
        help="also time the score compiled with torch.compile (NestedKVPress(compile_score=True), one graph for "
        "every length; meant for GPUs) and how long its first call takes to compile",
    )
    bench.add_argument(
        "--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
        help="instead of --model, a randomly initialised model of this shape (speed and memory do not depend on "
        "the weights; nothing to download); tiny is for the tests",
    )
    bench.set_defaults(run=_bench)

    evaluate = commands.add_parser(
        "eval",
        help="benchmark methods x ratios x lengths x tasks (RULER, built locally), resumable",
        description="Run every (sample, method, ratio) not yet in the results store. Each sample is "
        "prefilled once and every method is applied to that same prefill. Interrupt at will (Ctrl-C, exit code "
        "130): running the same command again resumes. A result recorded as an error (the method failed on that "
        "sample) is measured again by the next run; `nestedkv report` lists the errors. Lengths longer than the "
        "model's context window are refused before the model loads.",
    )
    evaluate.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="default: quick (~20 min)")
    evaluate.add_argument("--tasks", type=_tuple_of(str), help=f"comma list (default: all of {', '.join(TASKS)})")
    evaluate.add_argument("--lengths", type=_tuple_of(int), help="context lengths in tokens, prompt included")
    evaluate.add_argument("--ratios", type=_tuple_of(float), help="compression ratios")
    evaluate.add_argument(
        "--methods", type=_tuple_of(str),
        help=f"comma list of: none, {', '.join(METHODS)}; a NestedKV method takes NestedKVPress arguments "
        "after its name: nestedkv-paper:n_recent=64:recency=0.5 (tuples joined by +: scales=global+block)",
    )
    evaluate.add_argument("--samples", type=int, help="samples per task and length")
    evaluate.add_argument(
        "--split", choices=tuple(SPLIT_SEEDS),
        help="dev (default; tune on it) or test (report it): disjoint RULER seeds and documents",
    )
    evaluate.add_argument("--seed", type=int, help="RULER samples' seed instead of a split's (dev is seed 0)")
    evaluate.add_argument("--query-aware", action="store_true", help="compress the question with the context")
    evaluate.add_argument(
        "--one-by-one", action="store_true",
        help="decode each (method, ratio)'s answer alone with kvpress's pipeline, instead of all a sample's answers "
        "together as one batch of ragged rows (the same answers, slower)",
    )
    evaluate.add_argument(
        "--benchmark", choices=(*LOCAL_BENCHMARKS, *HUB_BENCHMARKS),
        help=f"default: the preset's, else {LOCAL_RULER}; {DOCUMENTS}: continuation loss and code completion on "
        "real source files (both built offline); the others load from the hub (docs/hub_benchmarks.md)",
    )
    evaluate.add_argument("--subset", help="hub benchmark subset (a task, or RULER's length)")
    evaluate.add_argument("--data-files", help="local parquet/jsonl copy of a hub benchmark")
    evaluate.add_argument("--squad", help="SQuAD v2 json: adds RULER's real qa_1")
    evaluate.add_argument("--hotpot", help="HotpotQA json: adds RULER's real qa_2")
    evaluate.add_argument("--out", help="results directory (default: results/<preset> or results/<benchmark>-<subset>)")
    evaluate.add_argument(
        "--shard", type=_shard, default=(0, 1), metavar="K/N",
        help="measure only shard K of N (0-based): run N such processes, e.g. one per GPU, on the same --out",
    )
    add_model_options(evaluate)
    evaluate.set_defaults(run=_eval)

    report = commands.add_parser(
        "report", help="Markdown tables and PNG plots from a results store",
        description="Mean score per method and ratio (95 %% CI), per-task tables, a score-vs-ratio plot and a "
        "task x method heat map. Only samples measured with every (method, ratio) are counted; results recorded "
        "as errors are listed per method and ratio with the first error message.",
    )
    report.add_argument("--results", default="results/quick", help="results directory (default: results/quick)")
    report.add_argument("--out", help="where to write report.md and the plots (default: the results directory)")
    report.add_argument("--heatmap-ratio", type=float, help="ratio of the heat map (default: 0.9, else the largest)")
    report.add_argument(
        "--against", metavar="METHOD",
        help="pair every method with this one and draw it as ours (default: nestedkv, else nestedkv-paper)",
    )
    report.add_argument(
        "--methods", metavar="M1,M2,...", type=_tuple_of(str),
        help="report only these methods (as stored; the uncompressed baseline always), counting every sample "
        "they all have, where the whole store's report counts only the samples every method has",
    )
    report.set_defaults(run=_report)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"nestedkv: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends with one line ``nestedkv: error: ...`` and exit code 2, an
    interruption (Ctrl-C) with exit code 130."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad option (its one line already printed)
        return int(stop.code or 0)
    args.argv = argv
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line  # one line each, not the warning's source line
            args.run(args)
    except (ValueError, ConnectionError) as error:  # ModelLoadError is a ValueError
        print(f"nestedkv: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"nestedkv: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
