"""A chat loop over one cache kept within a budget (:class:`~nestedkv.streaming.BudgetedPress`).

Each turn's new tokens are prefilled in chunks into the cache the earlier turns left, the cache is
brought back to the budget after each chunk, and the answer is generated greedily while the press
keeps compressing every ``interval`` tokens. The conversation's positions stay exact: the cache
reports every token seen, and only new tokens are fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from nestedkv.models import check_fits, config_window
from nestedkv.streaming import BudgetedPress, cache_bytes, most_held, prefill_in_chunks


@dataclass(frozen=True)
class ChatStatus:
    """seen: tokens of the conversation so far; held: the most positions any KV head of any layer
    keeps; nbytes: bytes the cache holds (keys, values and what the press remembers)."""

    seen: int
    held: int
    nbytes: int

    def format(self) -> str:
        return f"seen {self.seen} held {self.held} cache {self.nbytes} bytes ({self.nbytes / 2**20:.2f} MiB)"


class Chat:
    """A conversation with ``model`` whose cache ``press`` keeps within its budget.

    ``context`` (a document) opens the conversation as the system message: it is prefilled and
    compressed before any question is seen. ``say(text)`` answers one user turn.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, press: BudgetedPress, *,
        context: str | None = None, chunk_size: int = 512, max_new_tokens: int = 256,
    ) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("chat needs a tokenizer with a chat template (an instruct model)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.press = model, tokenizer, press
        self.chunk_size, self.max_new_tokens = chunk_size, max_new_tokens
        self.cache = DynamicCache()
        self.messages: list[dict[str, str]] = []
        self.ids = torch.empty(1, 0, dtype=torch.long, device=model.device)  # every token of the conversation
        self.pending = self._encode("")  # what the template puts after the last answer, fed with the next turn
        if context is not None:
            if not context.strip():
                raise ValueError("context is empty")
            self.messages.append({"role": "system", "content": context})
            self._feed(self._encode(self._render(add_generation_prompt=False)), last=True)

    def _render(self, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _encode(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)

    def _feed(self, new_ids: torch.Tensor, *, last: bool) -> None:
        """Append ``new_ids`` to the conversation; prefill them in chunks (all of them if ``last``, else all
        but the last, which ``generate`` feeds)."""
        check_fits(self.ids.shape[1] + new_ids.shape[1] + self.max_new_tokens, config_window(self.model.config),
                   f"the conversation ({self.ids.shape[1] + new_ids.shape[1]} tokens) plus {self.max_new_tokens} to "
                   "generate")
        self.ids = torch.cat([self.ids, new_ids], dim=1)
        with self.press(self.model):
            prefill_in_chunks(self.model, self.ids[:, self.cache.get_seq_length() : self.ids.shape[1] - (not last)],
                              self.cache, self.chunk_size)

    def say(self, text: str) -> str:
        """Answer one user turn from the cache the conversation so far left; returns the answer."""
        if not text.strip():
            raise ValueError("the user turn is empty")
        before = self._render(add_generation_prompt=False) if self.messages else ""
        self.messages.append({"role": "user", "content": text})
        prompt = self._render(add_generation_prompt=True)
        if not prompt.startswith(before):
            raise ValueError("the model's chat template rewrites earlier turns; a cache cannot follow it")
        self._feed(torch.cat([self.pending, self._encode(prompt[len(before) :])], dim=1), last=False)
        with torch.no_grad(), self.press(self.model):
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), past_key_values=self.cache,
                                      max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or 0)
        answer_ids = out[:, self.ids.shape[1] :]
        self.ids = out
        answer = self.tokenizer.decode(answer_ids[0], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer})
        # The template closes the answer (end of turn...): what the model did not generate is fed next turn.
        closing = self._render(add_generation_prompt=False)[len(prompt) :]
        if not closing.startswith(answer):
            raise ValueError("the model's chat template rewrites answers; a cache cannot follow it")
        self.pending = self._encode(closing[len(answer) :])
        if self.pending.shape[1] and answer_ids.shape[1] and answer_ids[0, -1] == self.pending[0, 0]:
            self.pending = self.pending[:, 1:]  # the model ended its turn itself
        return answer

    def status(self) -> ChatStatus:
        return ChatStatus(self.cache.get_seq_length(), most_held(self.cache), cache_bytes(self.cache))
