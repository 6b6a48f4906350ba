"""Shared fixtures: the real default model is loaded once per test session."""

import pytest

from nestedkv import load_model
from nestedkv.bench.ruler import build_samples


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once (~25 s)."""
    return load_model()


@pytest.fixture(scope="session")
def model(default_model):
    return default_model[0]


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """Three chat prompts of different lengths (needle samples of ~300, ~500 and ~700 tokens)."""
    if tokenizer.pad_token is None:  # the GGUF tokenizer names none; padding needs one
        tokenizer.pad_token = tokenizer.eos_token
    texts = []
    for length, seed in ((300, 1), (500, 2), (700, 3)):
        sample = build_samples("niah_single_1", 1, tokenizer, length, seed=seed)[0]
        messages = [{"role": "user", "content": sample.context + "\n" + sample.question}]
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts
