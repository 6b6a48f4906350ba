"""nestedkv: NestedKV key-only KV cache compression for Hugging Face transformers (arXiv 2605.26678)."""

from nestedkv.chat import Chat, ChatStatus
from nestedkv.models import DEFAULT_MODEL, ModelLoadError, load_model
from nestedkv.press import HeadAdaptivePress, NestedKVPress
from nestedkv.scoring import NestedKVConfig, nestedkv_score
from nestedkv.streaming import BudgetedPress, prefill_in_chunks

__all__ = ["DEFAULT_MODEL", "BudgetedPress", "Chat", "ChatStatus", "HeadAdaptivePress", "ModelLoadError",
           "NestedKVConfig", "NestedKVPress", "load_model", "nestedkv_score", "prefill_in_chunks"]
