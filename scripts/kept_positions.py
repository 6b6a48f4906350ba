"""Which positions a benchmark method keeps, saved, and how two saved runs differ: the check that a change to the
library keeps what a scratch branch's variant kept (docs/tuning.md), run once from each checkout.

The default model is prefilled with the first ``--length`` tokens of the packaged Austen text under the method's
press (masked storage, so that every evicted (layer, head, position) is named) at each of r = 0.5 to 0.95.

    PYTHONPATH=src .venv/bin/python scripts/kept_positions.py save METHOD OUT.pt [--length 2048]
    .venv/bin/python scripts/kept_positions.py compare A.pt B.pt
"""

from __future__ import annotations

import argparse
from importlib import resources

import torch
from transformers import DynamicCache

RATIOS = (0.5, 0.75, 0.875, 0.9, 0.95)


def save(method: str, out: str, length: int) -> None:
    from nestedkv.bench.methods import make_press
    from nestedkv.models import load_model

    model, tokenizer = load_model()
    text = resources.files("nestedkv").joinpath("data/austen.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: 8 * length], return_tensors="pt").input_ids[:, :length]
    kept = {}
    for ratio in RATIOS:
        press = make_press(method, ratio)
        press.storage = "masked"
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=DynamicCache())
        masks = torch.ones(len(model.model.layers), 1, model.config.num_key_value_heads, ids.shape[1], dtype=torch.bool)
        for index, layer in enumerate(model.model.layers):
            masks[index][layer.self_attn.masked_key_indices] = False
        kept[ratio] = masks
    torch.save(kept, out)


def compare(first: str, second: str) -> None:
    a, b = torch.load(first), torch.load(second)
    for ratio in RATIOS:
        print(f"r = {ratio}: {int((a[ratio] != b[ratio]).sum())} of {a[ratio].numel()} keep flags differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    saving = commands.add_parser("save")
    saving.add_argument("method")
    saving.add_argument("out")
    saving.add_argument("--length", type=int, default=2048)
    comparing = commands.add_parser("compare")
    comparing.add_argument("first")
    comparing.add_argument("second")
    args = parser.parse_args()
    if args.command == "save":
        save(args.method, args.out, args.length)
    else:
        compare(args.first, args.second)


if __name__ == "__main__":
    main()
