"""Answer a question about a long context through kvpress's pipeline, and report the cache."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import BasePress, KVPressTextGenerationPipeline
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nestedkv.cache import CacheSummary, summarize_cache


@dataclass(frozen=True)
class Answer:
    text: str
    cache: CacheSummary


def answer_question(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    question: str,
    press: BasePress | None = None,
    *,
    answer_prefix: str = "",
    max_new_tokens: int = 50,
) -> Answer:
    """Compress ``context`` with ``press`` (query-agnostic: before the question is seen), then
    answer ``question`` greedily from the compressed cache.
    """
    if not context.strip():
        raise ValueError("context is empty")
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    max_length = tokenizer.model_max_length
    context_ids = pipe.preprocess(context, [question], answer_prefix, max_length)["context_ids"]
    cache = DynamicCache()
    result = pipe(
        context,
        question=question,
        press=press,
        cache=cache,
        answer_prefix=answer_prefix,
        max_new_tokens=max_new_tokens,
    )
    return Answer(result["answer"], summarize_cache(model, cache, context_ids.shape[1]))
