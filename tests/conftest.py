"""Shared fixtures: the real default model is loaded once per test session."""

import pytest

from nestedkv import load_model


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
