"""Answer a question about a long context through kvpress's pipeline, and report the cache."""

from __future__ import annotations

from dataclasses import dataclass

from kvpress import BasePress, KVPressTextGenerationPipeline
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nestedkv.cache import CacheSummary, summarize_cache
from nestedkv.models import check_fits, config_window
from nestedkv.prompts import encode_prompt


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

    A prompt that, with ``max_new_tokens`` to generate, does not fit the model's context window is
    refused with a ``ValueError`` (kvpress's pipeline would cut the context silently).
    """
    if not context.strip():
        raise ValueError("context is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    context_ids, question_ids = encode_prompt(tokenizer, context, question, answer_prefix)
    prompt = context_ids.shape[1] + question_ids.shape[1]
    what = f"the prompt ({prompt} tokens) plus {max_new_tokens} tokens to generate"
    check_fits(prompt + max_new_tokens, config_window(model.config), what)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
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
