"""Command line: parse, call the library, print. ``nestedkv --help`` lists the commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib import resources

from nestedkv.generate import answer_question
from nestedkv.models import DEFAULT_MODEL, ModelLoadError, load_model
from nestedkv.press import NestedKVPress

DEMO_RATIO = 0.75


def demo_sample() -> dict[str, str]:
    """The shipped demo: a RULER niah_single_1 sample of ~2.9k tokens (``nestedkv.bench.ruler``,
    seed 5), one 7-digit number hidden in filler text; keys context, question, answer_prefix, answer."""
    return json.loads(resources.files("nestedkv").joinpath("data/demo.json").read_text(encoding="utf-8"))


# --- NestedKV options, generated from the press's own fields so the two never drift apart ------

_PRESS_FIELDS = [f for f in dataclasses.fields(NestedKVPress) if f.name != "compression_ratio"]


def _tuple_of(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            message = f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "auto") else int(text)


def add_press_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`NestedKVPress` field (``--n-sink``, ``--scales global,block``…)."""
    group = parser.add_argument_group("NestedKV options (defaults are the paper's)")
    for field in _PRESS_FIELDS:
        default = field.default
        if isinstance(default, tuple):
            kind = _tuple_of(type(default[0]))
            shown = ",".join(map(str, default))
        elif field.name == "block_size":
            kind, shown = _optional_int, "auto: clip(N//32, 128, 256)"
        else:
            kind, shown = type(default), default
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=default,
            help=f"default: {shown}",
        )


def press_from_args(args: argparse.Namespace) -> NestedKVPress:
    options = {field.name: getattr(args, field.name) for field in _PRESS_FIELDS}
    return NestedKVPress(compression_ratio=args.ratio, **options)


# --- commands ---------------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> None:
    answer_prefix = args.answer_prefix
    if args.context is None:
        demo = demo_sample()
        context, question = demo["context"], args.question or demo["question"]
        if args.question is None and answer_prefix is None:
            answer_prefix = demo["answer_prefix"]
    else:
        try:
            with open(args.context, encoding="utf-8") as handle:
                context = handle.read()
        except OSError as error:
            raise ValueError(f"cannot read context file {args.context}: {error.strerror}") from None
        if args.question is None:
            raise ValueError("--question is required with --context")
        question = args.question
    press = press_from_args(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    answer = answer_question(
        model, tokenizer, context, question, press if press.compression_ratio > 0 else None,
        answer_prefix=answer_prefix or "", max_new_tokens=args.max_new_tokens,
    )
    print(f"question: {question}")
    print(f"answer:   {(answer_prefix or '') + answer.text}".rstrip())
    print(f"press:    NestedKV, compression ratio {press.compression_ratio} ({press.budget} budget, {press.storage})")
    print(answer.cache.format())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestedkv", description=__doc__)
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
    generate.add_argument("--model", default=None, help=f"HF id, local dir or .gguf file (default: {DEFAULT_MODEL})")
    generate.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's)")
    generate.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    add_press_options(generate)
    generate.set_defaults(run=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, ModelLoadError) as error:
        print(f"nestedkv: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
