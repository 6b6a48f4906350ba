"""encode_prompt must build exactly the prompt of kvpress's pipeline."""

import copy
import types

import pytest
import torch
from kvpress.pipeline import KVPressTextGenerationPipeline

from nestedkv.prompts import encode_prompt, prompt_length, prompt_texts

CASES = [
    ("A long context.\nWith two lines.", "What is it? ", "The answer is"),
    ("Context with ##### hashes ### inside", "Question?", ""),
    ("Some context", "", ""),
    ("  spaces around  ", "\nquestion after a newline", " Answer:"),
]


def _pipeline_ids(tokenizer, context, question, answer_prefix):
    out = KVPressTextGenerationPipeline.preprocess(
        types.SimpleNamespace(tokenizer=tokenizer),
        context,
        questions=[question],
        answer_prefix=answer_prefix,
        max_context_length=10**9,
    )
    (question_ids,) = out["questions_ids"]
    return out["context_ids"], question_ids


@pytest.mark.parametrize("context,question,answer_prefix", CASES)
def test_encode_prompt_equals_kvpress_preprocess(tokenizer, context, question, answer_prefix):
    assert tokenizer.chat_template is not None
    context_ids, question_ids = encode_prompt(tokenizer, context, question, answer_prefix)
    expected_context, expected_question = _pipeline_ids(tokenizer, context, question, answer_prefix)
    assert context_ids.shape == (1, expected_context.shape[1]) and context_ids.dtype == torch.long
    assert torch.equal(context_ids, expected_context)
    assert torch.equal(question_ids, expected_question)
    assert prompt_length(tokenizer, context, question, answer_prefix) == (context_ids.shape[1] + question_ids.shape[1])


def test_layout_puts_question_after_the_user_turn(tokenizer):
    context_text, question_text = prompt_texts(tokenizer, "CONTEXT", "QUESTION? ", "PREFIX")
    assert context_text.endswith("CONTEXT") and "<|im_start|>user\n" in context_text
    assert question_text == "QUESTION? <|im_end|>\n<|im_start|>assistant\nPREFIX"


def test_without_chat_template_matches_kvpress(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    context, question, prefix = CASES[0]
    context_ids, question_ids = encode_prompt(plain, context, question, prefix)
    expected_context, expected_question = _pipeline_ids(plain, context, question, prefix)
    assert torch.equal(context_ids, expected_context)
    assert torch.equal(question_ids, expected_question)
    assert prompt_texts(plain, context, question, prefix) == (plain.bos_token + context, question + "\n" + prefix)
    assert tokenizer.chat_template is not None  # the shared fixture is untouched
