"""The cache rooms: ragged storage (:mod:`.storage`), the attention that reads it (:mod:`.attention`,
registered with transformers at import), and summaries of what a cache holds (:mod:`.summary`)."""

from nestedkv.cache import attention  # noqa: F401  (registers the ragged attention with transformers)
from nestedkv.cache.storage import RaggedLayer
from nestedkv.cache.summary import CacheSummary, summarize_cache

__all__ = ["CacheSummary", "RaggedLayer", "summarize_cache"]
