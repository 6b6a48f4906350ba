"""Where models come from: what is known about a model before its weights load."""

from nestedkv.models import DEFAULT_MODEL, model_window


def test_window_from_the_gguf_header_is_the_loaded_models(model):
    """The CLI refuses too-long contexts from the GGUF header alone; it must agree with transformers."""
    assert model_window() == model_window(DEFAULT_MODEL) == model.config.max_position_embeddings == 8192
