"""Which scorer keeps the needle of RULER's needle-in-a-haystack tasks? A diagnostic, dev split only.

One uncompressed prefill per sample. A forward hook on every attention layer hands each scorer the
layer's cached keys and values, as a press's hook sees them, and each KV head keeps its best
``(1 - r)`` share of the positions (the same count in every head, kvpress's uniform budget). Printed:
the share of the needle's answer tokens and of its sentence's tokens that each scorer keeps, averaged
over layers, KV heads and samples. The samples are the dev split's (seed 0): nothing here may be read on
the test split. ``docs/tuning.md`` quotes its output.

    python scripts/needle_retention.py --ratio 0.9 --tasks niah_single_1,niah_single_2 --samples 3
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import kvpress
import torch

from nestedkv import NestedKVPress
from nestedkv.bench.ruler import Sample, build_samples
from nestedkv.budgets import uniform_keep
from nestedkv.models import attention_modules, load_model
from nestedkv.settings import compute_n_kept


def scorers(ratio: float) -> dict[str, kvpress.ScorerPress]:
    """The scorers compared: the shipped default, three of its variants and the peers that keep needles."""
    return {
        "nestedkv (shipped)": NestedKVPress(ratio),
        "nestedkv, no ramp": NestedKVPress(ratio, recency=0.0),
        "nestedkv, no ramp, no values": NestedKVPress(ratio, recency=0.0, value_weight=0.0),
        "nestedkv, global anchor only": NestedKVPress(ratio, scales=("global",)),
        "nestedkv-paper": NestedKVPress.paper(ratio),
        "keydiff": kvpress.KeyDiffPress(ratio),
        "leverage-score": kvpress.LeverageScorePress(ratio),
        "compactor": kvpress.CompactorPress(ratio),
        "snapkv": kvpress.SnapKVPress(ratio),
    }


def needle_tokens(sample: Sample, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``(N,)`` masks of the context tokens that overlap an answer, and the sentences holding one."""
    answer, sentence = torch.zeros(len(offsets), dtype=torch.bool), torch.zeros(len(offsets), dtype=torch.bool)
    for value in sample.answers:
        start = sample.context.find(value)
        if start < 0:
            raise ValueError(f"{sample.task} #{sample.index}: answer {value!r} not in the context")
        end = start + len(value)
        first, last = sample.context.rfind(".", 0, start) + 1, sample.context.find(".", end) + 1
        answer |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        sentence |= (offsets[:, 0] < last) & (offsets[:, 1] > first)
    return answer, sentence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1")
    parser.add_argument("--samples", type=int, default=3, help="per task")
    parser.add_argument("--length", type=int, default=4096)
    args = parser.parse_args()
    model, tokenizer = load_model()
    presses = scorers(args.ratio)
    kept = defaultdict(lambda: [0.0, 0.0, 0])  # (task, scorer) -> [answer share, sentence share, heads seen]
    marks: dict[str, torch.Tensor] = {}

    def hook(module, _args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values, n = layer.keys, layer.values, layer.keys.shape[-2]
        for name, press in presses.items():
            scores = press.score(module, kwargs["hidden_states"], keys, values, None, kwargs)
            keep = uniform_keep(scores.float(), compute_n_kept(n, args.ratio))[0]  # (H, N)
            record = kept[(marks["task"], name)]
            record[0] += keep[:, marks["answer"]].float().mean(dim=-1).sum().item()  # each head's share, summed
            record[1] += keep[:, marks["sentence"]].float().mean(dim=-1).sum().item()
            record[2] += keep.shape[0]
        return output

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in attention_modules(model)]
    for task in args.tasks.split(","):
        for sample in build_samples(task, args.samples, tokenizer, args.length, seed=0):
            encoded = tokenizer(sample.context, return_offsets_mapping=True, return_tensors="pt")
            answer, sentence = needle_tokens(sample, encoded["offset_mapping"][0])
            marks.update(task=task, answer=answer, sentence=sentence)
            with torch.no_grad():
                model(encoded["input_ids"], use_cache=True)
            print(f"{task} #{sample.index}: {encoded['input_ids'].shape[1]} tokens, {int(answer.sum())} answer tokens, "
                  f"{int(sentence.sum())} in its sentence", flush=True)
    for handle in handles:
        handle.remove()
    print(f"\nShare of the needle's tokens kept at r = {args.ratio} (each KV head its best {1 - args.ratio:.0%}; "
          f"mean over {model.config.num_hidden_layers} layers, the KV heads and {args.samples} dev samples per task)\n")
    print("| task | scorer | answer tokens | sentence tokens |\n|---|---|---:|---:|")
    for (task, name), (answer_share, sentence_share, heads) in kept.items():
        print(f"| {task} | {name} | {answer_share / heads:.2f} | {sentence_share / heads:.2f} |")


if __name__ == "__main__":
    main()
