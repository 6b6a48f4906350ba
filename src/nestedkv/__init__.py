"""nestedkv: NestedKV key-only KV cache compression for Hugging Face transformers (arXiv 2605.26678)."""

from nestedkv.models import DEFAULT_MODEL, ModelLoadError, load_model
from nestedkv.press import HeadAdaptivePress, NestedKVPress
from nestedkv.scoring import NestedKVConfig, nestedkv_score

__all__ = ["DEFAULT_MODEL", "HeadAdaptivePress", "ModelLoadError", "NestedKVConfig", "NestedKVPress", "load_model",
           "nestedkv_score"]
