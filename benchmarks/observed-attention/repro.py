"""Why kvpress's ObservedAttentionPress (H2O) fails needles even at r = 0.25 on SmolLM2-135M
(docs/benchmarks.md, the leaderboard preset).

Query-agnostic, H2O scores each context position by the attention the context's own queries gave it
(averaged over the queries that could see it). The haystack's queries have no reason to look at the
needle, so its digits (one token each in this tokenizer) get no protection: about as many of them
fall in the evicted quarter as random eviction would drop, more in some layers, and a number that
loses a digit in a layer is lost. Keeping just the needle's tokens, everything else as H2O chooses,
restores the answer. In kvpress's own pipeline, with eager attention as the press requires. About
two minutes on one CPU thread:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/observed-attention/repro.py
"""

import time
from dataclasses import dataclass

import torch
from kvpress import KVPressTextGenerationPipeline, ObservedAttentionPress

from nestedkv.cli import demo_sample
from nestedkv.models import eager_attention, load_model  # loads the GGUF model and switches to eager attention

RATIO = 0.25
start = time.time()
torch.set_num_threads(1)
model, tokenizer = load_model()
pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
demo = demo_sample()
ids = pipe.preprocess(demo["context"], [demo["question"]], demo["answer_prefix"], 100_000)["context_ids"][0].tolist()
needle = next(
    list(range(a, b)) for a in range(len(ids)) for b in range(a + 1, a + 10)
    if tokenizer.decode(ids[a:b]).strip() == demo["answer"]
)


@dataclass
class Probe(ObservedAttentionPress):
    """H2O's scores; reports, per layer, the share of the needle's tokens in the evicted bottom ``RATIO``
    of each KV head; with ``keep_needle``, the needle's tokens get the highest score in every layer."""

    keep_needle: bool = False
    evicted: list = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
        cut = scores.quantile(self.compression_ratio, dim=-1, keepdim=True)
        self.evicted.append(float((scores[..., needle] < cut).float().mean()))
        if self.keep_needle:
            scores[..., needle] = scores.max() + 1
        return scores


pieces = [tokenizer.decode(ids[n]) for n in needle]
print(f"demo: {len(ids)} context tokens, needle tokens {needle} = {pieces}")
with eager_attention(model):
    for label, keep in ((f"ObservedAttentionPress({RATIO})", False), ("same, needle's tokens kept", True)):
        press = Probe(RATIO, keep_needle=keep, evicted=[])
        answer = pipe(demo["context"], question=demo["question"], answer_prefix=demo["answer_prefix"], press=press,
                      max_new_tokens=8)["answer"]
        print(f"{label:36s} -> {answer!r}; expected {demo['answer']}")
        if not keep:
            print("  share of the needle's tokens in the evicted quarter, per layer:",
                  [round(x, 2) for x in press.evicted])
            print(f"  mean over layers: {sum(press.evicted) / len(press.evicted):.2f}")
print(f"({time.time() - start:.0f} s)")
