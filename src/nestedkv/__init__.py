"""nestedkv: NestedKV key-only KV cache compression for Hugging Face transformers."""

from nestedkv.models import DEFAULT_MODEL, ModelLoadError, load_model

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "load_model"]
