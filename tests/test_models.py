"""Where models come from: what is known about a model before its weights load."""

import torch

from nestedkv.models import (
    CACHE_ENV,
    DEFAULT_MODEL,
    _converted_dir,
    _save_converted,
    default_model_file,
    load_model,
    model_window,
)


def test_window_from_the_gguf_header_is_the_loaded_models(model):
    """The CLI refuses too-long contexts from the GGUF header alone; it must agree with transformers."""
    assert model_window() == model_window(DEFAULT_MODEL) == model.config.max_position_embeddings == 8192


def test_a_gguf_model_is_converted_once_and_read_back_unchanged(tmp_path, monkeypatch):
    """The first load of a GGUF file keeps a float32 copy; later loads read it and get the same model."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    converted, converted_tokenizer = load_model()  # parses and de-quantises the GGUF file, keeps a copy
    kept = list((tmp_path / "converted").iterdir())
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()
    model, tokenizer = load_model()  # reads the copy
    assert model.config.name_or_path == str(kept[0]) and model.config.gguf_file is None
    assert converted.config.gguf_file == default_model_file().name
    theirs = converted.state_dict()
    for name, weight in model.state_dict().items():
        assert weight.dtype == torch.float32 and torch.equal(weight, theirs.pop(name)), name
    assert not theirs
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est le café n° 42 ?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == converted_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer(prompt).input_ids == converted_tokenizer(prompt).input_ids
    assert (tokenizer.eos_token, tokenizer.model_max_length) == (converted_tokenizer.eos_token, 8192)
    # the copy's name follows the file and the transformers version; an empty variable keeps none
    assert _converted_dir(default_model_file()) == kept[0]
    monkeypatch.setenv(CACHE_ENV, "")
    assert _converted_dir(default_model_file()) is None


def test_a_cache_that_cannot_be_written_is_skipped_with_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    where = tmp_path / "a-file" / "converted"
    _save_converted(None, None, where / "model")
    assert f"not keeping a converted copy of the model in {where}" in capsys.readouterr().err
