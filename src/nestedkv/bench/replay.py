"""Prefill once, compress many times: the benchmarks' way of running many presses on one context.

Compression happens after each layer's attention, so the prefill's hidden states, keys and values
do not depend on the method. :func:`prefill_once` prefills a context once, capturing what every
layer's press hook would see; :func:`compress_replay` replays that hook for any press on a fresh
cache holding the full keys and values; :func:`reuse_scores` lets presses whose scores do not
depend on the ratio score a context once for every ratio; :func:`prefill_compressed` prefills for
real the presses that cannot be replayed. :func:`prefill` is the one prefill
that every benchmark (quality and speed) runs. Decode many at once: :func:`ragged_rows` turns any
method's compressed cache (dense, ragged, or kvpress's head-wise masks) into ragged layers, and
:func:`greedy_answers` decodes the answers of many such caches of one context as one batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from kvpress import BasePress, KVComposePress, KVzipPress
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from nestedkv.cache import RaggedLayer
from nestedkv.cache.attention import (
    attention_went_through_registry,
    mask_can_hide_context,
    record_attention_through_registry,
)
from nestedkv.models import attention_modules, eager_attention


@torch.no_grad()
def prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, press: BasePress | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill ``input_ids (1, N)`` under ``press`` (none: no compression); return the cache and the last
    position's hidden state ``(1, 1, hidden)``.

    As kvpress's pipeline does, the context goes through the decoder only (no output head).
    """
    cache = DynamicCache()
    with press(model) if press is not None else nullcontext():
        hidden = model.model(input_ids=input_ids, past_key_values=cache).last_hidden_state
    return cache, hidden[:, -1:].clone()  # a view would keep every position's hidden state alive


@dataclass
class Prefill:
    """One context's prefill: the full cache and what each layer's press hook received."""

    context_length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hook_kwargs: list[dict] = field(repr=False)
    attentions: list[torch.Tensor | None] = field(repr=False)
    through_registry: bool = True
    """Whether every layer's attention went through transformers' attention registry (what the presses that read
    ragged layers or apply head-wise masks check; a replay answers as the prefill did)."""


@torch.no_grad()
def prefill_once(model: PreTrainedModel, context_ids: torch.Tensor) -> Prefill:
    """Prefill ``context_ids (1, N)`` without compression, capturing every attention layer's inputs."""
    captured: list[tuple[dict, torch.Tensor | None, bool]] = []

    def capture(module, args, kwargs, output):
        kwargs = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        captured.append((kwargs, output[1], attention_went_through_registry(module)))

    hooks = [module.register_forward_hook(capture, with_kwargs=True) for module in attention_modules(model)]
    try:
        cache, _ = prefill(model, context_ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return Prefill(
        context_length=context_ids.shape[1],
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        hook_kwargs=[kwargs for kwargs, _, _ in captured],
        attentions=[attentions for _, attentions, _ in captured],
        through_registry=all(served for _, _, served in captured),
    )


@torch.no_grad()
def compress_replay(model: PreTrainedModel, prefill: Prefill, press: BasePress | None) -> DynamicCache:
    """A cache holding ``prefill``'s context as ``press`` would have compressed it during prefill.

    The press's own forward hook runs on every layer with the captured inputs, inside the press's
    context manager (so ``post_init_from_model`` and its other set-up run as in a real prefill).
    The full keys and values are shared, never modified: presses build new tensors.
    """
    cache = DynamicCache()
    for keys, values in zip(prefill.keys, prefill.values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    modules = attention_modules(model)
    for module in modules:
        module.masked_key_indices = None  # a real prefill resets kvpress's head-wise masks too
    if press is None:
        return cache
    with press(model):
        for module, kwargs, attentions in zip(modules, prefill.hook_kwargs, prefill.attentions, strict=True):
            if prefill.through_registry:
                record_attention_through_registry(module)
            press.forward_hook(module, (), {**kwargs, "past_key_values": cache}, (None, attentions))
    return cache


@torch.no_grad()
def prefill_compressed(
    model: PreTrainedModel, context_ids: torch.Tensor, press: BasePress, *, eager: bool = False
) -> DynamicCache:
    """Prefill ``context_ids (1, N)`` for real under ``press``: for presses that cannot be replayed,
    because they run passes of their own over the context (KVzip, KVCompose) or score attention
    weights (``eager``: prefill with eager attention, the only implementation that returns them)."""
    for module in attention_modules(model):
        module.masked_key_indices = None  # a head-wise mask of an earlier press must not leak in
    with eager_attention(model) if eager else nullcontext():
        cache, _ = prefill(model, context_ids.to(model.device), press)
    return cache


def feed(
    model: PreTrainedModel, cache: DynamicCache, ids: torch.Tensor, start: int, logits_to_keep: int = 1
) -> torch.Tensor:
    """Feed ``ids (1, T)`` at positions ``start .. start + T - 1``; the logits ``(1, T', vocab)`` of the
    last ``logits_to_keep`` positions (0: all).

    A cache compressed by a kvpress press holds fewer positions than it has seen, so the RoPE
    positions are given, as kvpress's pipeline gives them; the cache positions are not: transformers
    derives them from what the cache holds, and the causal mask among the fed tokens is built from
    them (logical cache positions past a shorter cache would let every fed token see all the others)."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    with torch.no_grad():
        return model(ids, past_key_values=cache, position_ids=positions[None], logits_to_keep=logits_to_keep).logits


def reuse_scores(press: BasePress, memo: dict[int, torch.Tensor]) -> BasePress:
    """Make ``press`` (a ``ScorerPress``, a press wrapping one in ``.press``, ``KVzipPress`` or
    ``KVComposePress``) score each layer once per ``memo``: later presses of the same method on the same
    prefill reuse the stored scores.

    Only for methods whose scores do not depend on the ratio (``Method.ratio_free_scores``). KVzip and
    KVCompose score in passes of their own over the context: with ``memo`` empty, the press runs them
    (in a prefill of its own) and stores its scores; with ``memo`` filled, it is a press for
    :func:`compress_replay` that evicts by the stored scores.
    """
    if isinstance(press, KVzipPress):
        return _reuse_kvzip_scores(press, memo)
    if isinstance(press, KVComposePress):
        return _reuse_kvcompose_scores(press, memo)
    scorer = getattr(press, "press", press)
    compute = scorer.score

    def score(module, *args):
        if module.layer_idx not in memo:
            memo[module.layer_idx] = compute(module, *args)
        return memo[module.layer_idx].clone()  # some presses (AdaKV) write into their scores

    scorer.score = score
    return press


def _reuse_kvzip_scores(press: KVzipPress, memo: dict[int, torch.Tensor]) -> KVzipPress:
    """:func:`reuse_scores` for KVzip, which scores every layer at once after the prefill by making the
    model re-read the context (its ``score_val``, ``(layers, 1, kv_heads, N)``), then evicts by ratio
    (``compress_post``, which hides the evicted keys)."""
    evict = press.compress_post
    if not memo:

        def store_then_evict(model: PreTrainedModel) -> None:
            memo.update(enumerate(press.score_val.clone()))  # before eviction raises the sinks' scores in place
            evict(model)

        press.compress_post = store_then_evict
        return press

    def note_context(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        press._context_ids = kwargs["hidden_states"]  # KVzip compresses on exit only after a context went in
        return output

    def stored_scores_then_evict(model: PreTrainedModel, tokenizer: object) -> None:
        press.score_val = _stacked(memo)
        evict(model)

    press.forward_hook, press._perform_kvzip_compression = note_context, stored_scores_then_evict
    return press


def _reuse_kvcompose_scores(press: KVComposePress, memo: dict[int, torch.Tensor]) -> KVComposePress:
    """:func:`reuse_scores` for KVCompose, which scores every layer after an eager prefill and a re-feed of
    the context (its ``scores``, ``(layers, kv_heads, N)``), then keeps each layer's share by ratio; a
    replayed press takes the cache to evict from the replayed hooks."""
    if not memo:
        enhance = press.enhance_scores

        def enhance_then_store() -> None:
            enhance()
            memo.update(enumerate(press.scores.clone()))

        press.enhance_scores = enhance_then_store
        return press

    def take_cache(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        press._register_cache(kwargs["past_key_values"])
        press.context_len = press.cache.layers[module.layer_idx].keys.shape[-2]
        return output

    def stored_scores() -> None:
        press.scores = _stacked(memo)

    press.forward_hook, press.compute_scores, press.enhance_scores = take_cache, stored_scores, lambda: None
    return press


def _stacked(memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """Every layer's stored scores as one new tensor ``(layers, ...)``: the presses write into theirs."""
    return torch.stack([memo[layer] for layer in range(len(memo))])


def ragged_rows(model: PreTrainedModel, cache: DynamicCache, context_length: int) -> list[RaggedLayer] | None:
    """``cache`` (one row, just compressed from a context of ``context_length`` tokens) as one ragged layer
    per decoder layer, holding what its attention would read: a dense layer's keys whole, or without
    those that kvpress's head-wise masks hide (``masked_key_indices``, read now: the next press resets
    them). ``None`` for a cache that cannot be held so (sliding windows, quantised or other layers)."""
    rows = []
    for layer, module in zip(cache.layers, attention_modules(model), strict=True):
        masked = getattr(module, "masked_key_indices", None)
        if isinstance(layer, RaggedLayer):
            if masked is not None or not layer.stackable:
                return None
            rows.append(layer)
        elif type(layer) is DynamicLayer and not mask_can_hide_context(module):
            keep = torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
            if masked is not None:
                keep[masked] = False
            rows.append(RaggedLayer.from_keep(layer.keys, layer.values, keep, context_length=context_length))
        else:
            return None
    return rows


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel, rows: list[list[RaggedLayer]], question_ids: torch.Tensor, context_length: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy answers to ``question_ids (1, Q)`` from several compressed caches of one context
    (:func:`ragged_rows` each), decoded as one batch: each cache is a batch row of one ragged cache, the
    question is fed at positions ``context_length ..``, then one token per row per step. A row's answer
    ends after ``max_new_tokens`` or with its first end-of-sequence token after the first token, as
    kvpress's pipeline answers (it does not stop at a first token that ends the sequence)."""
    for module in attention_modules(model):
        module.masked_key_indices = None  # the rows hold what kvpress's masks hid; its patch must not apply them
    cache = DynamicCache()
    cache.layers = [RaggedLayer.stack([row[index] for row in rows]) for index in range(len(rows[0]))]
    stop = model.generation_config.eos_token_id
    stop = torch.tensor(stop if isinstance(stop, list) else [stop], device=model.device)
    ids = question_ids.to(model.device).expand(len(rows), -1)
    last = feed(model, cache, ids, context_length)[:, -1].argmax(-1)
    answers = [[token] for token in last.tolist()]
    active = list(range(len(rows)))  # rows still answering, in the cache's row order
    position = context_length + ids.shape[1]
    for _ in range(max_new_tokens - 1):
        last = feed(model, cache, last[:, None], position)[:, -1].argmax(-1)
        position += 1
        for row, token in zip(active, last.tolist(), strict=True):
            answers[row].append(token)
        going = ~torch.isin(last, stop)
        if not bool(going.all()):  # finished rows leave the batch, so that they cost nothing more
            if not bool(going.any()):
                break
            active = [row for row, keep in zip(active, going.tolist(), strict=True) if keep]
            cache.batch_select_indices(going.nonzero().squeeze(-1))
            last = last[going]
    return answers
