"""nestedkv: NestedKV key-only KV cache compression for Hugging Face transformers (arXiv 2605.26678).

The names below are imported from their modules on first use (PEP 562), so that ``import nestedkv``
and the command line's checks of its options do not wait for torch, transformers and kvpress.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from nestedkv.models import DEFAULT_MODEL, ModelLoadError, load_model
from nestedkv.settings import NestedKVConfig

if TYPE_CHECKING:
    from nestedkv.chat import Chat, ChatStatus
    from nestedkv.press import HeadAdaptivePress, NestedKVPress
    from nestedkv.scoring import nestedkv_score
    from nestedkv.streaming import BudgetedPress, prefill_in_chunks

_LAZY = {
    "Chat": "nestedkv.chat", "ChatStatus": "nestedkv.chat",
    "HeadAdaptivePress": "nestedkv.press", "NestedKVPress": "nestedkv.press",
    "nestedkv_score": "nestedkv.scoring",
    "BudgetedPress": "nestedkv.streaming", "prefill_in_chunks": "nestedkv.streaming",
}

__all__ = ["DEFAULT_MODEL", "BudgetedPress", "Chat", "ChatStatus", "HeadAdaptivePress", "ModelLoadError",
           "NestedKVConfig", "NestedKVPress", "load_model", "nestedkv_score", "prefill_in_chunks"]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'nestedkv' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
