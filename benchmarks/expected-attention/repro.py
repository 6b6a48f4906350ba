"""Why kvpress's ExpectedAttentionPress fails the demo needle on SmolLM2-135M (docs/benchmarks.md).

In a few retrieval heads (layer 17 head 1, 18/2, 20/1, KV heads), ExpectedAttention's score puts the
needle's digits in the bottom few percent, mostly through its covariance term, whose logit range
dwarfs the mean term's there. Keeping just the needle's tokens in layers 17-20, everything else as
ExpectedAttention chooses, restores the answer. About a minute on one CPU thread:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/expected-attention/repro.py
"""

import time
from dataclasses import dataclass

import torch
from kvpress import ExpectedAttentionPress, KVPressTextGenerationPipeline, ScorerPress
from transformers.models.llama.modeling_llama import repeat_kv

# nestedkv only reads the demo and loads the GGUF model, none of its presses is imported: the same
# happens without nestedkv
from nestedkv.cli import demo_sample
from nestedkv.models import load_model

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
groups = model.config.num_attention_heads // model.config.num_key_value_heads


def value_range(logits: torch.Tensor) -> list[float]:
    """max - min over positions, per KV head (the mean over its query heads)."""
    spread = (logits.amax(-1) - logits.amin(-1))[0].view(-1, groups).mean(-1)
    return [round(float(x), 1) for x in spread]


@dataclass
class Probe(ScorerPress):
    """ExpectedAttention's scores, reported in layers 17, 18, 20; with ``keep_needle_in``, the needle's
    tokens get the highest score in those layers."""

    inner: ScorerPress = None
    keep_needle_in: tuple = ()

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        scores = self.inner.score(module, hidden_states, keys, values, attentions, kwargs)
        layer = module.layer_idx
        if not self.keep_needle_in and layer in (17, 18, 20):
            mean, covariance = self.inner.get_query_statistics(module, hidden_states)
            k = repeat_kv(keys[:, :, self.inner.n_sink :], groups).transpose(2, 3)
            covariance_term = torch.einsum("bhin,bhij,bhjn->bhn", k, covariance, k) / k.shape[2] / 2
            mean_term = (mean.unsqueeze(2) @ k).squeeze(2) / k.shape[2] ** 0.5
            rank = scores[0].argsort(-1).argsort(-1)[:, needle].float().mean(-1) / scores.shape[-1] * 100
            print(f"  layer {layer}: needle percentile per KV head {[round(float(x)) for x in rank]}; logit range per "
                  f"KV head: mean term {value_range(mean_term)}, covariance term {value_range(covariance_term)}")
        if layer in self.keep_needle_in:
            scores[:, :, needle] = scores.max() + 1
        return scores


print(f"demo: {len(ids)} context tokens, needle tokens {needle}, expected answer {demo['answer']}")
variants = [("ExpectedAttentionPress(0.5)", ()), ("same, needle kept in layers 17-20 only", (17, 18, 19, 20))]
for label, layers in variants:
    press = Probe(0.5, inner=ExpectedAttentionPress(0.5), keep_needle_in=layers)
    answer = pipe(demo["context"], question=demo["question"], answer_prefix=demo["answer_prefix"], press=press,
                  max_new_tokens=8)["answer"]
    print(f"{label:40s} -> {answer!r}")
print(f"({time.time() - start:.0f} s)")
