"""NestedKVPress on real models: the default SmolLM2 and tiny random models of other shapes."""

import contextlib
import shutil

import pytest
import torch
from kvpress import ChunkPress, KeyDiffPress, PyramidKVPress
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import rotate_half

from nestedkv import load_model
from nestedkv.bench.ruler import build_samples
from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import summarize_cache
from nestedkv.generate import answer_question
from nestedkv.models import ModelLoadError
from nestedkv.press import HeadAdaptivePress, NestedKVPress
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import NestedKVConfig, compute_n_kept, layer_compression_ratio, ramp_weight


def prefill(model, input_ids, press=None):
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press else contextlib.nullcontext():
        model.model(input_ids=input_ids, past_key_values=cache)
    return cache


def kept_positions(kept_keys, full_keys):
    """Positions of the context that a compressed layer kept, per head, found by matching key rows.

    kept_keys ``(1, H, n, d)``, full_keys ``(1, H, N, d)`` -> ``[H]`` sorted position lists.
    """
    matches = (kept_keys[0, :, :, None, :] == full_keys[0, :, None, :, :]).all(dim=-1)  # (H, n, N)
    return [sorted(head.nonzero()[:, 1].tolist()) for head in matches]


@pytest.fixture(scope="module")
def context_ids(tokenizer):
    sample = build_samples("niah_single_2", 1, tokenizer, 1024, seed=11)[0]
    return tokenizer(sample.context, return_tensors="pt").input_ids


def test_global_scale_uniform_budget_no_sinks_keeps_what_keydiff_keeps(model, context_ids):
    full = prefill(model, context_ids)
    ours = prefill(model, context_ids, NestedKVPress.paper(0.75, scales=("global",), budget="uniform", n_sink=0))
    keydiff = prefill(model, context_ids, KeyDiffPress(compression_ratio=0.75))
    n_kept = compute_n_kept(context_ids.shape[1], 0.75)
    for full_layer, ours_layer, keydiff_layer in zip(full.layers, ours.layers, keydiff.layers, strict=True):
        assert ours_layer.keys.shape[2] == n_kept
        positions = kept_positions(ours_layer.keys, full_layer.keys)
        assert all(len(head) == n_kept for head in positions)
        assert positions == kept_positions(keydiff_layer.keys, full_layer.keys)


def test_head_adaptive_budget_on_the_real_model(model, context_ids):
    press = NestedKVPress(0.9)
    cache = prefill(model, context_ids, press)
    n = context_ids.shape[1]
    summary = summarize_cache(model, cache, n)
    n_kept = compute_n_kept(n, 0.9)
    heads = model.config.num_key_value_heads
    for per_head in summary.kept:
        assert sum(per_head) == heads * n_kept
        assert min(per_head) >= int(0.2 * n_kept)
    assert len({tuple(per_head) for per_head in summary.kept}) > 1, "budgets should differ across layers"
    assert summary.kept_fraction == pytest.approx(n_kept / n)


def test_the_default_scores_the_cached_keys_turned_back_by_their_angles(model, context_ids):
    """The shipped default (``scored_keys='pre-rope'``) keeps what the head-adaptive budget keeps of the score of
    the keys turned back by hand (Llama's RoPE inverted, ``k cos - rotate_half(k) sin`` at positions 0..N-1):
    pins its kept positions on a fixed input. They differ from what the cached keys' score keeps."""
    n = context_ids.shape[1]
    full = prefill(model, context_ids)
    prefill(model, context_ids, NestedKVPress(0.9, storage="masked"))
    cos, sin = (angle[:, None] for angle in model.model.rotary_emb(full.layers[0].keys, torch.arange(n)[None]))

    def keep(keys, values):
        return head_adaptive_keep(nestedkv_score(keys, NestedKVConfig(), values), compute_n_kept(n, 0.9))

    changed = 0
    for layer, module in zip(full.layers, (layer.self_attn for layer in model.model.layers), strict=True):
        kept = torch.ones(layer.keys.shape[:3], dtype=torch.bool)
        kept[module.masked_key_indices] = False
        assert torch.equal(kept, keep(layer.keys * cos - rotate_half(layer.keys) * sin, layer.values))
        changed += int((kept != keep(layer.keys, layer.values)).sum())
    assert changed > 0.005 * kept.numel() * len(full.layers)  # 1.1 %: a score of other keys (a tenth is kept)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
def test_the_compiled_score_keeps_what_the_eager_score_keeps(model, context_ids):
    """``compile_score=True`` (inductor's fused kernels) evicts what the default press evicts, in every layer and head,
    at two context lengths, with at most one graph compiled for both."""
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (context_ids.shape[1], 700):
        evicted = []
        for compile_score in (False, True):
            prefill(model, context_ids[:, :n], NestedKVPress(0.9, storage="masked", compile_score=compile_score))
            masks = []
            for layer in model.model.layers:
                mask = torch.zeros(1, model.config.num_key_value_heads, n, dtype=torch.bool)
                mask[layer.self_attn.masked_key_indices] = True
                masks.append(mask)
            evicted.append(torch.stack(masks))
        assert evicted[0].any() and torch.equal(*evicted)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 1


def test_a_score_that_torch_compile_cannot_build_is_refused_in_one_line(model, context_ids, monkeypatch):
    """Where torch.compile cannot build (no C++ compiler for inductor, no Triton on a GPU) ``compile_score=True``
    stops with one line naming the cause and the way out, not torch's page of trace. The backend here fails as
    inductor does without a compiler; a real one cannot be taken away reliably (inductor's disk cache may
    already hold the built kernel)."""

    def no_compiler(graph, example_inputs):
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx\n(many more lines)")

    monkeypatch.setattr(
        "nestedkv.press.compiled_nestedkv_score",
        lambda: torch.compile(nestedkv_score, backend=no_compiler, dynamic=True, fullgraph=True),
    )
    with pytest.raises(ValueError) as refused:
        prefill(model, context_ids[:, :300], NestedKVPress(0.9, compile_score=True))
    assert str(refused.value) == (
        "compile_score=True: torch.compile could not build the score on this machine (RuntimeError: No working C++ "
        "compiler found in torch._inductor.config.cpp.cxx); use compile_score=False (the eager score keeps the "
        "same positions)"
    )


def test_a_ramp_tied_to_the_budget_weighs_each_layer_at_its_own_ratio(model, context_ids):
    """``recency_over_kept`` with budgets that differ across layers: each layer keeps what its own ratio's ramp
    weight keeps (keys turned back by hand as above), and that differs from the fixed ramp's choice."""
    n, ratio, layers = context_ids.shape[1], 0.9, model.config.num_hidden_layers
    full = prefill(model, context_ids)
    prefill(model, context_ids, NestedKVPress(ratio, recency_over_kept=0.1, layer_budget=0.5, storage="masked"))
    cos, sin = (angle[:, None] for angle in model.model.rotary_emb(full.layers[0].keys, torch.arange(n)[None]))
    changed = 0
    for index, (layer, module) in enumerate(zip(full.layers, (layer.self_attn for layer in model.model.layers),
                                                strict=True)):
        layer_ratio = layer_compression_ratio(ratio, index, layers, 0.5)
        keys = layer.keys * cos - rotate_half(layer.keys) * sin
        kept = torch.ones(layer.keys.shape[:3], dtype=torch.bool)
        kept[module.masked_key_indices] = False
        tied = NestedKVConfig(recency=ramp_weight(0.5, 0.1, layer_ratio))
        assert torch.equal(kept, head_adaptive_keep(nestedkv_score(keys, tied, layer.values),
                                                    compute_n_kept(n, layer_ratio)))
        fixed = head_adaptive_keep(nestedkv_score(keys, NestedKVConfig(), layer.values), compute_n_kept(n, layer_ratio))
        changed += int((kept != fixed).sum())
    assert changed > 0


def test_pre_rope_scoring_of_part_of_the_keys_warns_and_scores_them_as_cached(model, context_ids):
    """A kvpress wrapper that scores chunks of the keys hands the angles of all of them: the chunks' own are
    unknown, so they are scored as cached, with a warning."""
    chunked = ChunkPress(NestedKVPress(0.75, scored_keys="pre-rope", budget="uniform"), chunk_length=256)
    with pytest.warns(UserWarning, match="scored_keys='pre-rope': the model handed no RoPE angles of these keys"):
        cache = prefill(model, context_ids, chunked)
    as_cached = ChunkPress(NestedKVPress(0.75, scored_keys="cached", budget="uniform"), chunk_length=256)
    as_cached = prefill(model, context_ids, as_cached)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, as_cached.layers, strict=True))


def test_needle_at_2k_tokens_is_answered_with_nestedkv_at_r075(model, tokenizer):
    sample = build_samples("niah_single_1", 1, tokenizer, 2048, seed=0)[0]
    answer = answer_question(
        model,
        tokenizer,
        sample.context,
        sample.question,
        NestedKVPress(compression_ratio=0.75),
        answer_prefix=sample.answer_prefix,
        max_new_tokens=24,
    )
    assert sample.answers[0] in answer.text
    assert answer.cache.context_length > 1800
    assert sum(map(sum, answer.cache.kept)) == 30 * 3 * compute_n_kept(answer.cache.context_length, 0.75)


def test_press_works_as_a_context_manager_around_generate(model, tokenizer):
    sample = build_samples("niah_single_1", 1, tokenizer, 1024, seed=1)[0]
    messages = [{"role": "user", "content": sample.context + "\n" + sample.question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with NestedKVPress(compression_ratio=0.5)(model):
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert sample.answers[0] in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_head_adaptive_press_wraps_any_scorer(model, context_ids):
    cache = prefill(model, context_ids, HeadAdaptivePress(KeyDiffPress(compression_ratio=0.8)))
    summary = summarize_cache(model, cache, context_ids.shape[1])
    assert summary.kept_fraction == pytest.approx(compute_n_kept(context_ids.shape[1], 0.8) / context_ids.shape[1])


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


@pytest.mark.parametrize(
    ("model_class", "config"),
    [
        (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=2)),
        (Qwen3ForCausalLM, Qwen3Config(**TINY, num_key_value_heads=1, head_dim=16)),
        (MistralForCausalLM, MistralConfig(**TINY, num_key_value_heads=2, sliding_window=4096)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget", ["head-adaptive", "uniform"])
def test_other_architectures_and_dtypes(model_class, config, dtype, budget):
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    tiny = model_class(config).to(dtype).eval()
    input_ids = torch.randint(0, 128, (1, 400))
    cache = prefill(tiny, input_ids, NestedKVPress(0.75, budget=budget))
    summary = summarize_cache(tiny, cache, 400)
    assert summary.kept_fraction == pytest.approx(compute_n_kept(400, 0.75) / 400)
    with torch.no_grad():
        positions = torch.arange(400, 403)[None]
        logits = tiny(input_ids=input_ids[:, :3], past_key_values=cache, position_ids=positions).logits
    assert torch.isfinite(logits).all()


def test_bad_input_is_named(model, tokenizer):
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        NestedKVPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        NestedKVPress(compression_ratio=-0.1)
    with pytest.raises(ValueError, match="unknown budget 'greedy'"):
        NestedKVPress(0.5, budget="greedy")
    with pytest.raises(ValueError, match="unknown storage"):
        NestedKVPress(0.5, storage="disk")
    with pytest.raises(ValueError, match="context is empty"):
        answer_question(model, tokenizer, "  ", "What?", NestedKVPress(0.5))
    short = answer_question(model, tokenizer, "A short context about a cat.", "What?", NestedKVPress(0.5))
    assert short.cache.kept_fraction < 0.6  # shorter than one block: compressed with two half blocks
    # a budget smaller than the shipped 64-position recent window keeps the newest of it
    small = answer_question(model, tokenizer, "word " * 200, "What?", NestedKVPress(0.9))
    assert small.cache.kept_fraction < 0.15
    with pytest.raises(ValueError, match="fewer than the 4 sink"):
        answer_question(model, tokenizer, "word " * 300, "What?", NestedKVPress(0.99))
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="is not a model directory: it holds no config.json"):
        load_model(str(__import__("pathlib").Path(__file__).parent))


# --- ragged storage: frees memory, decodes like the masked path -------------------------------


def decode_logits(model, cache, context_length, question_ids, steps=6):
    """Greedy-decode ``steps`` tokens after the question; return the logits of every step."""
    positions = torch.arange(context_length, context_length + question_ids.shape[1])[None]
    logits = []
    with torch.no_grad():
        out = model(input_ids=question_ids, past_key_values=cache, position_ids=positions)
        for step in range(steps):
            logits.append(out.logits[0, -1])
            token = out.logits[0, -1].argmax().view(1, 1)
            out = model(input_ids=token, past_key_values=cache, position_ids=positions[:, -1:] + 1 + step)
    return torch.stack(logits)


def test_ragged_decoding_matches_masked_decoding_on_the_real_model(model, tokenizer, context_ids):
    question_ids = tokenizer(" What is the special magic number?", return_tensors="pt").input_ids
    n = context_ids.shape[1]
    results = {}
    for storage in ("masked", "ragged"):
        cache = prefill(model, context_ids, NestedKVPress(0.9, storage=storage))
        results[storage] = (summarize_cache(model, cache, n), decode_logits(model, cache, n, question_ids))
    (masked, masked_logits), (ragged, ragged_logits) = results["masked"], results["ragged"]
    assert masked.kept == ragged.kept
    torch.testing.assert_close(ragged_logits, masked_logits, atol=2e-4, rtol=1e-4)
    # the ragged cache holds about a tenth of the bytes, the masked one all of them
    assert masked.bytes_held == masked.bytes_full
    assert compute_n_kept(n, 0.9) / n <= ragged.bytes_held / ragged.bytes_full < compute_n_kept(n, 0.9) / n + 0.001


@pytest.mark.parametrize(
    ("model_class", "config"),
    [
        (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=2)),
        (Qwen3ForCausalLM, Qwen3Config(**TINY, num_key_value_heads=1, head_dim=16)),
        (MistralForCausalLM, MistralConfig(**TINY, num_key_value_heads=4, sliding_window=4096)),
    ],
)
def test_ragged_matches_masked_on_other_architectures(model_class, config):
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    tiny = model_class(config).eval()
    input_ids = torch.randint(0, 128, (1, 300))
    question_ids = torch.randint(0, 128, (1, 5))
    logits = {
        storage: decode_logits(tiny, prefill(tiny, input_ids, NestedKVPress(0.8, storage=storage)), 300, question_ids)
        for storage in ("masked", "ragged")
    }
    torch.testing.assert_close(logits["ragged"], logits["masked"], atol=1e-5, rtol=1e-5)


def test_ragged_cache_with_pipeline_and_generate(model, tokenizer):
    sample = build_samples("niah_single_1", 1, tokenizer, 1024, seed=2)[0]
    answer = answer_question(
        model,
        tokenizer,
        sample.context,
        sample.question,
        NestedKVPress(0.5, storage="ragged"),
        answer_prefix=sample.answer_prefix,
        max_new_tokens=24,
    )
    assert sample.answers[0] in answer.text
    assert answer.cache.bytes_held < 0.51 * answer.cache.bytes_full
    messages = [{"role": "user", "content": sample.context + "\n" + sample.question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with NestedKVPress(compression_ratio=0.5, storage="ragged")(model):
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert sample.answers[0] in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_layers_of_different_lengths_decode():
    """PyramidKV keeps fewer positions in deeper layers; the attention mask is cut to each layer's keys."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 4}, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    tiny = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 128, (1, 1500))
    cache = prefill(tiny, input_ids, PyramidKVPress(compression_ratio=0.5))
    assert len({layer.keys.shape[2] for layer in cache.layers}) == 4
    with torch.no_grad():
        logits = tiny(input_ids=input_ids[:, :5], past_key_values=cache, position_ids=torch.arange(1500, 1505)[None])
    assert torch.isfinite(logits.logits).all()


def test_sliding_window_cache_layers_stay_uncompressed_in_both_storages():
    torch.manual_seed(0)
    config = MistralConfig(**TINY, num_key_value_heads=2, sliding_window=256)
    config._attn_implementation = "sdpa"
    tiny = MistralForCausalLM(config).eval()
    input_ids = torch.randint(0, 128, (1, 400))
    for storage in ("ragged", "masked"):
        cache = DynamicCache(config=config)
        with pytest.warns(UserWarning, match="sliding-window cache layers stay uncompressed"):
            with torch.no_grad(), NestedKVPress(0.5, storage=storage)(tiny):
                tiny.model(input_ids=input_ids, past_key_values=cache)
        window = cache.layers[0].keys.shape[2]  # what the sliding layer holds of the 400 tokens
        assert window < 400 and sum(summarize_cache(tiny, cache, 400).kept[0]) == 2 * window
