"""The one place that turns (context, question, answer prefix) into token ids.

The layout is exactly the one of kvpress's ``KVPressTextGenerationPipeline.preprocess``, so that a
prompt measured here (the RULER length fitting) is the prompt the model sees (the benchmark runner):

* with a chat template, the context is put alone in a user turn, closed by a long run of ``#``
  (the separator trick); the rendered text is cut at the separator: what comes before is the
  context text, what comes after (end of the user turn, start of the assistant turn) is the
  question suffix;
* without one, the context is prefixed with the BOS token and the question suffix is ``"\\n"``;
* the question text is ``question + question_suffix + answer_prefix``;
* both are tokenized separately, without special tokens, and never truncated here.

The question thus lands after the end of the user turn, as in kvpress's evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def prompt_texts(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str = ""
) -> tuple[str, str]:
    """The two strings that ``encode_prompt`` tokenizes: (context text, question text)."""
    if tokenizer.chat_template is None:
        context_text = (getattr(tokenizer, "bos_token", None) or "") + context
        question_suffix = "\n"
    else:
        separator = "#" * (len(context) + 10)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,  # the pipeline's default
        )
        context_text, question_suffix = rendered.split(separator)
    return context_text, question + question_suffix + answer_prefix


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_ids ``[1, n_ctx]``, question_ids ``[1, n_q]``) as kvpress's pipeline builds them.

    ``question_ids`` already holds the chat template's end of turn and ``answer_prefix``; the
    answer is generated right after it. Nothing is truncated.
    """
    context_text, question_text = prompt_texts(tokenizer, context, question, answer_prefix)
    context_ids = tokenizer.encode(context_text, return_tensors="pt", add_special_tokens=False)
    question_ids = tokenizer.encode(question_text, return_tensors="pt", add_special_tokens=False)
    return context_ids, question_ids


def prompt_length(tokenizer: PreTrainedTokenizerBase, context: str, question: str, answer_prefix: str = "") -> int:
    """Number of prompt tokens (context + question) that ``encode_prompt`` yields."""
    context_text, question_text = prompt_texts(tokenizer, context, question, answer_prefix)
    return len(tokenizer.encode(context_text, add_special_tokens=False)) + len(
        tokenizer.encode(question_text, add_special_tokens=False)
    )
