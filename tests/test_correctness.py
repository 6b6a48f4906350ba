"""Correct or refuse: batches, padding, beam search, sampling, a second turn, sliding windows, caches
the press cannot hold, settings. Real model where it matters; tiny random models for other shapes."""

import math
import warnings

import pytest
import torch
from kvpress import (
    CAMPress,
    ChunkPress,
    ComposedPress,
    KeyDiffPress,
    KnormPress,
    PerLayerCompressionPress,
    PyramidKVPress,
)
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    NemotronConfig,
    NemotronForCausalLM,
)

from nestedkv.bench.ruler import build_samples
from nestedkv.cache import RaggedLayer
from nestedkv.cache.attention import uses_varlen_kernel
from nestedkv.press import HeadAdaptivePress, NestedKVPress
from nestedkv.settings import compute_n_kept
from nestedkv.streaming import BudgetedPress, prefill_in_chunks

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=4096)


def generate(model, tokenizer, texts, press, padding_side="left", **options):
    tokenizer.padding_side = padding_side
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    options = {"max_new_tokens": 8, "do_sample": False, **options}
    with torch.no_grad(), press(model):
        out = model.generate(**encoded, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **options)
    return out.sequences[:, encoded["input_ids"].shape[1]:], out


def until_eos(tokens, eos):
    """Generated tokens up to the first end of sequence (a finished row of a batch goes on with padding)."""
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("make_press", [lambda: NestedKVPress(0.75), lambda: HeadAdaptivePress(KeyDiffPress(0.75))],
                         ids=["nestedkv", "head-adaptive-keydiff"])
def test_left_padded_batch_gives_each_row_what_it_gets_alone(model, tokenizer, prompts, make_press):
    batch, _ = generate(model, tokenizer, prompts, make_press())
    for row, text in enumerate(prompts):
        alone, _ = generate(model, tokenizer, [text], make_press())
        eos = model.generation_config.eos_token_id  # what generate stops at (the GGUF tokenizer names another)
        assert until_eos(batch[row], eos) == until_eos(alone[0], eos), f"row {row}"


def matched(keys: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Which of ``keys (k, d)`` equal one of ``others (m, d)`` to 1e-4 (the same position's key, prefilled
    alone or in a batch). ``-> bool (k,)``"""
    if not len(keys) or not len(others):
        return torch.zeros(len(keys), dtype=torch.bool)
    return ((keys[:, None] - others[None]).abs().amax(-1) <= 1e-4).any(-1)


@pytest.mark.parametrize(
    ("padding_side", "scored_keys"), [("left", "cached"), ("right", "cached"), ("left", "pre-rope")]
)
def test_padded_rows_keep_what_they_keep_alone_and_never_a_pad(model, tokenizer, prompts, padding_side, scored_keys):
    """A padded row keeps what it keeps alone, up to one near-tie per layer: its keys differ from the row
    prefilled alone by float rounding (a batched matrix product blocks its sums differently; on an AVX2 CPU
    that flipped one position between two heads of one layer), and it never keeps a padding position. Keys
    scored before RoPE are turned back by their own row's angles."""
    tokenizer.padding_side = padding_side
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch_cache = prefill(model, encoded, NestedKVPress(0.8, scored_keys=scored_keys))
    full_cache = prefill(model, encoded, NestedKVPress(0.0))  # every key, the padding's too
    for row, text in enumerate(prompts):
        alone_ids = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        alone = prefill(model, alone_ids, NestedKVPress(0.8, scored_keys=scored_keys))
        real = int(encoded["attention_mask"][row].sum())
        pads = encoded["attention_mask"][row] == 0
        for layer_batch, layer_alone, full in zip(batch_cache.layers, alone.layers, full_cache.layers, strict=True):
            lengths, alone_lengths = layer_batch.context_lengths[row], layer_alone.context_lengths[0]
            assert int(lengths.sum()) == layer_batch.heads * compute_n_kept(real, 0.8)
            assert int((lengths - alone_lengths).abs().sum()) <= 2  # one position moved between two heads at most
            unmatched = 0
            for head in range(layer_batch.heads):
                stream = row * layer_batch.heads + head
                kept = layer_batch.context_keys[layer_batch.offsets[stream] : layer_batch.offsets[stream + 1]]
                kept_alone = layer_alone.context_keys[layer_alone.offsets[head] : layer_alone.offsets[head + 1]]
                extra = kept[~matched(kept, kept_alone)]  # kept in the batch only: a near-tie, never a pad
                assert not matched(extra, full.keys[row, head, pads]).any()
                unmatched += len(extra)
            assert unmatched <= 1


def prefill(model, encoded, press):
    """Prefill as ``generate`` does: positions count each row's real tokens only."""
    positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(**encoded, position_ids=positions, past_key_values=cache)
    return cache


def test_beam_search_and_several_sequences_over_a_padded_batch_match_masked_storage(model, tokenizer, prompts):
    two = prompts[:2]
    for options in (dict(num_beams=2, num_return_sequences=2), dict(num_return_sequences=2, do_sample=True, top_k=5)):
        results = {}
        for storage in ("ragged", "masked"):
            torch.manual_seed(0)
            results[storage], _ = generate(model, tokenizer, two, NestedKVPress(0.5, storage=storage), **options)
        assert results["ragged"].shape[0] == 4
        assert results["ragged"].tolist() == results["masked"].tolist(), options


def test_second_turn_reuses_the_compressed_cache(model, tokenizer):
    sample = build_samples("niah_single_1", 1, tokenizer, 1500, seed=4)[0]
    messages = [{"role": "user", "content": sample.context + "\nRemember this document. Reply OK."}]
    first = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    outputs, logits = {}, {}
    for storage in ("ragged", "masked"):
        with torch.no_grad(), NestedKVPress(0.5, storage=storage)(model):
            turn = model.generate(**first, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            reply = tokenizer.decode(turn.sequences[0, first["input_ids"].shape[1]:], skip_special_tokens=True)
            second = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": sample.question}],
                add_generation_prompt=True, return_tensors="pt", return_dict=True,
            )
            cache = turn.past_key_values
            seen = cache.get_seq_length()
            out = model.generate(**second, past_key_values=cache, max_new_tokens=32, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        outputs[storage] = (tokenizer.decode(out.sequences[0, second["input_ids"].shape[1]:]), cache, seen)
        logits[storage] = torch.stack(out.logits)
    answer, cache, seen = outputs["ragged"]
    assert seen == turn.sequences.shape[1] - 1  # the logical length: every token of turn 1 but the last
    torch.testing.assert_close(logits["ragged"], logits["masked"], atol=5e-4, rtol=1e-4)
    assert sample.answers[0] in answer
    layer = cache.layers[0]
    assert isinstance(layer, RaggedLayer)
    held = layer.context_keys.shape[0] + layer.keys.shape[2] * layer.heads
    assert held < 0.6 * cache.get_seq_length() * layer.heads  # only the kept half plus the new tokens


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def tiny_mistral(sliding_window):
    torch.manual_seed(0)
    config = MistralConfig(**TINY, num_key_value_heads=2, sliding_window=sliding_window)
    config._attn_implementation = "sdpa"
    return MistralForCausalLM(config).eval()


def test_plain_cache_under_a_sliding_window_mask_equals_masked_storage():
    tiny = tiny_mistral(sliding_window=48)
    input_ids = torch.randint(0, 128, (1, 200))
    logits = {}
    for storage in ("ragged", "masked"):
        cache = DynamicCache()  # kvpress's pipeline builds this plain cache: the mask alone applies the window
        with torch.no_grad(), NestedKVPress(0.5, storage=storage, block_size=32)(tiny):
            tiny.model(input_ids=input_ids, past_key_values=cache)
            steps = []
            for step in range(6):
                token = torch.tensor([[step + 3]])
                steps.append(tiny(input_ids=token, past_key_values=cache).logits[0, -1])
        logits[storage] = torch.stack(steps)
    assert cache.layers[0].keys.shape[2] == 206
    torch.testing.assert_close(logits["ragged"], logits["masked"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_ragged_decoding_through_the_varlen_kernel_equals_masked_storage():
    tiny = tiny_llama().to("cuda", torch.bfloat16)
    input_ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :40] = 0  # a left-padded row
    encoded = dict(input_ids=input_ids, attention_mask=attention_mask)
    logits = {}
    for storage in ("masked", "ragged"):
        cache, mask, steps = DynamicCache(), attention_mask, []
        # One press context for prefill and decoding: entering a press clears masked storage's masks.
        with torch.no_grad(), NestedKVPress(0.75, storage=storage)(tiny):
            tiny.model(**encoded, position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache)
            for step in range(6):  # the same tokens for both storages, as generate would feed them
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                token = torch.full((2, 1), step + 3, device="cuda")
                out = tiny(input_ids=token, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           past_key_values=cache)
                steps.append(out.logits[:, -1].float())
        logits[storage] = torch.stack(steps)
    layer = cache.layers[0]
    assert isinstance(layer, RaggedLayer)
    assert uses_varlen_kernel(torch.empty(1, 4, 1, 16, device="cuda", dtype=torch.bfloat16), layer)
    torch.testing.assert_close(logits["ragged"], logits["masked"], atol=1e-2, rtol=1e-2)


def test_sliding_window_cache_layers_stay_uncompressed_with_a_warning():
    tiny = tiny_mistral(sliding_window=48)
    input_ids = torch.randint(0, 128, (1, 200))
    with pytest.warns(UserWarning, match="sliding-window cache layers stay uncompressed"):
        with torch.no_grad(), NestedKVPress(0.5)(tiny):
            out = tiny.generate(input_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert not any(isinstance(layer, RaggedLayer) for layer in out.past_key_values.layers)


def test_static_cache_is_refused_and_the_model_left_as_it_was():
    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 300))
    with pytest.raises(ValueError, match="a static cache cannot be compressed"):
        with torch.no_grad(), NestedKVPress(0.5)(tiny):
            tiny.generate(input_ids, max_new_tokens=2, cache_implementation="static")
    plain = tiny.generate(input_ids, max_new_tokens=2, cache_implementation="static", do_sample=False)
    assert plain.shape == (1, 302)


def test_use_cache_false_warns_and_does_nothing():
    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 300))
    with torch.no_grad():
        want = tiny(input_ids, use_cache=False).logits
        with pytest.warns(UserWarning, match="use_cache=False"), NestedKVPress(0.5)(tiny):
            got = tiny(input_ids, use_cache=False).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("make_press", [lambda: NestedKVPress(0.5, budget="uniform"),
                                        lambda: ChunkPress(NestedKVPress(0.5), chunk_length=128)],
                         ids=["uniform", "chunk-press"])
def test_a_dense_cache_refuses_a_padded_batch(model, tokenizer, prompts, make_press):
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with pytest.raises(ValueError, match="cannot hold the different lengths of a padded batch"):
        prefill(model, encoded, make_press())


def test_a_press_before_the_head_adaptive_one_on_a_padded_batch_is_refused_for_what_it_did():
    tiny = tiny_llama()
    ids = torch.randint(3, 128, (2, 120))
    padding = torch.ones_like(ids)
    padding[1, :40] = 0
    with pytest.raises(ValueError, match="a press before the head-adaptive one shortened a padded batch"):
        with torch.no_grad(), ComposedPress([KnormPress(0.5), NestedKVPress(0.5)])(tiny):
            tiny(ids, attention_mask=padding, past_key_values=DynamicCache())


def test_attention_chunks_llama_4_decode_from_ragged_storage_as_from_the_full_cache():
    """Llama 4's chunked layers hide earlier chunks from later tokens: a ragged layer keeps its keys' positions so
    the chunk mask applies to the kept keys, in a plain cache (kvpress's pipeline, ``Chat``) under both presses.
    The decoding tokens' chunk lies in the protected recent positions, so the answer is the uncompressed one."""
    torch.manual_seed(0)
    config = Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        attention_chunk_size=32, no_rope_layers=[1, 1], max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    tiny = Llama4ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 200))

    def decode(press, prefill):
        cache = DynamicCache()
        with torch.no_grad(), warnings.catch_warnings(), press(tiny):
            warnings.simplefilter("ignore")  # "model not tested" by kvpress
            prefill(cache)
            logits = [tiny(input_ids=torch.tensor([[step]]), past_key_values=cache).logits[0, -1] for step in (3, 4)]
        return torch.stack(logits), cache

    def at_once(cache):
        tiny(input_ids=ids[:, :100], past_key_values=cache)

    def in_chunks(cache):
        prefill_in_chunks(tiny, ids, cache, chunk_size=50)

    budgeted = BudgetedPress(budget=100, interval=16, head_slack=8)
    for press, prefill in ((NestedKVPress(0.5, block_size=16), at_once), (budgeted, in_chunks)):
        full, _ = decode(NestedKVPress(0.0), prefill)
        got, cache = decode(press, prefill)
        layer = cache.layers[0]
        assert isinstance(layer, RaggedLayer) and layer.positions is not None
        assert int(layer.context_lengths.sum()) < 0.6 * cache.get_seq_length() * layer.heads
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def refused_before_any_layer_changes(model, ids, message, presses=None):
    """Each press (by default every press that reads through the registry: both head-adaptive storages and
    ``BudgetedPress``) stops the prefill of ``ids`` with ``message`` and leaves no layer of the cache ragged."""
    if presses is None:
        presses = [NestedKVPress(0.5), NestedKVPress(0.5, storage="masked"), BudgetedPress(budget=100, interval=16)]
    for press in presses:
        cache = DynamicCache()
        with pytest.raises(ValueError, match=message):
            with torch.no_grad(), warnings.catch_warnings(), press(model):
                warnings.simplefilter("ignore")  # "model not tested" by kvpress
                model(ids, past_key_values=cache)
        assert not any(isinstance(layer, RaggedLayer) for layer in cache.layers)


def test_ragged_storage_is_refused_where_attention_would_not_read_it():
    """Eager attention bypasses transformers' attention registry (the wrapper would never see the ragged layer);
    multi-head latent attention's values are narrower than its keys. Both are refused at the first layer."""
    tiny = tiny_llama()
    tiny.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (1, 120))
    try:
        with pytest.raises(ValueError, match="attn_implementation='eager' bypasses"):
            with torch.no_grad(), BudgetedPress(budget=100, interval=16)(tiny):
                prefill_in_chunks(tiny, ids, DynamicCache(), chunk_size=100)
    finally:
        tiny.config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    latent = DeepseekV3ForCausalLM(config).eval()
    message = "values as wide as keys, this model's are 8 and 16"
    refused_before_any_layer_changes(latent, ids, message, presses=[NestedKVPress(0.5)])


def test_a_model_whose_attention_bypasses_the_registry_is_refused_not_misread():
    """Nemotron's and DiffLlama's SDPA classes call SDPA themselves: a ragged layer would hand them its tail only
    (the compressed context silently dropped) and kvpress's head-wise masks would never apply (nothing evicted).
    Every head-adaptive storage and BudgetedPress refuse at the first layer; the uniform budget (a dense cache
    any attention reads) runs."""
    torch.manual_seed(0)
    config = NemotronConfig(**TINY, num_key_value_heads=2, head_dim=16)
    config._attn_implementation = "sdpa"
    nemotron = NemotronForCausalLM(config).eval()
    ids = torch.randint(1, 128, (1, 120))
    refused_before_any_layer_changes(nemotron, ids, "NemotronSdpaAttention computes attention itself")
    cache = DynamicCache()
    with torch.no_grad(), warnings.catch_warnings(), NestedKVPress(0.5, budget="uniform")(nemotron):
        warnings.simplefilter("ignore")
        nemotron(ids, past_key_values=cache)
    assert cache.get_seq_length() == compute_n_kept(120, 0.5)


def test_models_the_presses_cannot_hook_are_refused_in_one_line():
    """GPT-2 has no model.model.layers; Gemma 3n's last layers read an earlier layer's keys and values (no cache
    layer of their own); flex attention fails under kvpress's attention patch. Each stops with a ValueError."""
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a decoder whose every layer has self-attention"):
        with NestedKVPress(0.5)(gpt2):
            pass
    torch.manual_seed(0)
    config = Gemma3nTextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=[128] * 4, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=48, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, laurel_rank=8,
        altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
    )
    config._attn_implementation = "sdpa"
    gemma3n = Gemma3nForCausalLM(config).eval()
    ids = torch.randint(1, 128, (1, 120))
    refused_before_any_layer_changes(gemma3n, ids, "no key-value layer of its own for every attention layer")
    tiny = tiny_llama()
    tiny.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match="flex attention does not run under kvpress"), torch.no_grad():
            tiny(ids)
    finally:
        tiny.config._attn_implementation = "sdpa"


def test_a_kvpress_press_keeping_fewer_positions_in_deeper_layers_refuses_a_padded_batch():
    """kvpress's PyramidKV keeps fewer positions in deeper layers, and transformers sizes the attention mask from
    layer 0: on a left-padded batch nothing says where a deeper layer's kept keys sit among the padding, so
    ``generate`` stops with the attention wrapper's one-line refusal; one unpadded row decodes."""
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 4}, num_key_value_heads=2)).eval()
    ids = torch.randint(5, 128, (2, 80))
    padding = torch.ones(2, 80, dtype=torch.long)
    padding[1, :10] = 0
    with pytest.raises(ValueError, match="compress one unpadded prompt at a time"):
        with torch.no_grad(), PyramidKVPress(compression_ratio=0.5, window_size=4)(tiny):
            tiny.generate(ids, attention_mask=padding, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), PyramidKVPress(compression_ratio=0.5, window_size=4)(tiny):
        out = tiny.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 83)
    held = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert held[-1] < held[0]  # the unpadded row did reach the fitted-mask path


def greedy(model, input_ids, press, max_new_tokens=12):
    with torch.no_grad(), press(model):
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
    return torch.stack(out.logits, dim=1), out.past_key_values


def test_per_layer_ratios_of_kvpress_reach_each_ragged_layer():
    tiny, input_ids = tiny_llama(), torch.randint(0, 128, (1, 300))
    ratios = [0.25, 0.75]
    logits, cache = greedy(tiny, input_ids, PerLayerCompressionPress(NestedKVPress(), ratios))
    for layer, ratio in zip(cache.layers, ratios, strict=True):
        assert int(layer.context_lengths.sum()) == layer.heads * compute_n_kept(300, ratio)
    masked_logits, _ = greedy(tiny, input_ids, PerLayerCompressionPress(NestedKVPress(storage="masked"), ratios))
    torch.testing.assert_close(logits, masked_logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\).*got 1.0"):
        greedy(tiny, input_ids, PerLayerCompressionPress(NestedKVPress(), [0.5, 1.0]))


@pytest.mark.parametrize("storage, budget", [("ragged", "head-adaptive"), ("masked", "head-adaptive"),
                                             ("masked", "uniform")])
def test_layer_budget_compresses_each_layer_at_its_share(storage, budget):
    """layer_budget=0.5 at r=0.5 over 2 layers keeps 1.5x and 0.5x the average share: the ratios 0.25 and 0.75
    given to kvpress's PerLayerCompressionPress, answer for answer; the press's own ratio is left as it was."""
    tiny, input_ids = tiny_llama(), torch.randint(0, 128, (1, 300))
    press = NestedKVPress(0.5, layer_budget=0.5, storage=storage, budget=budget)
    logits, cache = greedy(tiny, input_ids, press)
    expected, _ = greedy(tiny, input_ids, PerLayerCompressionPress(
        NestedKVPress(storage=storage, budget=budget), [0.25, 0.75]))
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    if storage == "ragged":
        kept = [int(layer.context_lengths.sum()) for layer in cache.layers]
        ratios = zip(cache.layers, (0.25, 0.75), strict=True)
        assert kept == [layer.heads * compute_n_kept(300, ratio) for layer, ratio in ratios]
    assert press.compression_ratio == 0.5


@pytest.mark.parametrize("head_adaptive", [lambda: NestedKVPress(0.5), lambda: NestedKVPress(0.5, storage="masked"),
                                           lambda: HeadAdaptivePress(KeyDiffPress(0.5))],
                         ids=["nestedkv", "nestedkv-masked", "head-adaptive-keydiff"])
def test_composed_press_refuses_a_head_adaptive_press_before_another(head_adaptive):
    tiny, input_ids = tiny_llama(), torch.randint(0, 128, (1, 300))
    with pytest.raises(ValueError, match="must be the last press of a ComposedPress"):
        greedy(tiny, input_ids, ComposedPress([head_adaptive(), KnormPress(0.5)]))


def test_composed_press_with_nestedkv_last_compresses_what_the_first_press_kept():
    tiny, input_ids = tiny_llama(), torch.randint(0, 128, (1, 300))
    logits, cache = greedy(tiny, input_ids, ComposedPress([KnormPress(0.5), NestedKVPress(0.5)]))
    for layer in cache.layers:
        assert int(layer.context_lengths.sum()) == layer.heads * 75
    masked_logits, _ = greedy(tiny, input_ids, ComposedPress([KnormPress(0.5), NestedKVPress(0.5, storage="masked")]))
    torch.testing.assert_close(logits, masked_logits, atol=1e-4, rtol=0)


def test_chunk_press_and_cam_press_around_nestedkv_score_with_the_uniform_budget():
    tiny, input_ids = tiny_llama(), torch.randint(0, 128, (1, 300))
    _, cache = greedy(tiny, input_ids, ChunkPress(NestedKVPress(0.5), chunk_length=128), max_new_tokens=1)
    assert all(layer.keys.shape[2] == 64 + 64 + 22 for layer in cache.layers)  # half of each chunk of 128, 128, 44
    _, cache = greedy(tiny, input_ids[:, :40], CAMPress(NestedKVPress(), compression_interval=16, target_size=48),
                      max_new_tokens=60)
    assert all(layer.keys.shape[2] <= 48 + 16 for layer in cache.layers)


@pytest.mark.parametrize("field", ["beta", "kappa", "tau", "gap_fraction", "eps", "alpha_safeguard", "window"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        NestedKVPress(0.5, **{field: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prior": (0.4, math.nan, 0.2)}, "prior must be finite"),
        ({"n_sink": 2.5}, "n_sink must be an integer"),
        ({"n_recent": True}, "n_recent must be an integer"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"compression_ratio": math.nan}, "compression_ratio must be in"),
        ({"layer_budget": 1.0}, "layer_budget must be in"),
        ({"recency_over_kept": -0.1}, "recency_over_kept must be >= 0"),
    ],
)
def test_bad_numbers_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        NestedKVPress(**{"compression_ratio": 0.5, **options})


def test_masks_of_an_earlier_masked_run_do_not_leak_into_a_later_one(model, tokenizer, prompts):
    encoded = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    prefill(model, encoded, NestedKVPress(0.5, storage="masked"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ragged = prefill(model, encoded, NestedKVPress(0.5))
    assert all(module.self_attn.masked_key_indices is None for module in model.model.layers)
    assert isinstance(ragged.layers[0], RaggedLayer)


def test_decoding_press_around_nestedkv_keeps_the_cache_near_its_target():
    """kvpress's DecodingPress calls compress() on windows shorter than one block: two half blocks serve."""
    from kvpress import DecodingPress

    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 40))
    press = DecodingPress(NestedKVPress(), compression_interval=16, target_size=48)
    with torch.no_grad(), press(tiny):
        out = tiny.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=100,
                            min_new_tokens=100, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert all(layer.keys.shape[2] <= 48 + 16 for layer in out.past_key_values.layers)


@pytest.mark.parametrize(("storage", "scorer", "message"), [
    ("ragged", KeyDiffPress, "pruned the tail of a compressed"),
    ("masked", NestedKVPress, "masked storage and cannot be compressed again"),
])
def test_decoding_press_after_a_head_adaptive_prefill_is_refused_before_a_wrong_step(storage, scorer, message):
    """kvpress's DecodingPress sees only the tail of a ragged layer (pruning it would drift positions silently)
    and indexes masked positions that it has removed."""
    from kvpress import DecodingPress, PrefillDecodingPress

    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 60))
    press = PrefillDecodingPress(NestedKVPress(compression_ratio=0.5, storage=storage),
                                 DecodingPress(scorer(), compression_interval=4, target_size=8))
    with torch.no_grad(), press(tiny), pytest.raises(ValueError, match=message):
        tiny.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20, min_new_tokens=20,
                      do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("storage", ["ragged", "masked"])
def test_a_forward_with_gradients_on_is_compressed_like_one_without(storage):
    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 60))
    kept = []
    for grad in (False, True):
        cache = DynamicCache()
        with torch.set_grad_enabled(grad), NestedKVPress(compression_ratio=0.5, storage=storage)(tiny):
            tiny(input_ids, past_key_values=cache)
        layer = cache.layers[0]
        kept.append(layer.offsets if storage == "ragged" else tiny.model.layers[0].self_attn.masked_key_indices[2])
    assert torch.equal(*kept)


@pytest.mark.parametrize("split", ["cpu-and-offloaded", "cpu-and-cuda"])
def test_a_model_split_over_devices_keeps_each_layer_cache_where_the_layer_runs(split, tmp_path):
    """accelerate's layer placement (``device_map``): layer 1 offloaded (its weights on the meta device until its
    forward loads them) or on a GPU; the ragged cache of each layer lives on the device its layer runs on, and
    the logits equal those of the model in one piece."""
    if split == "cpu-and-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from nestedkv.models import load_model

    tiny, path = tiny_llama(), tmp_path / "tiny"
    tiny.save_pretrained(path)
    # load_model reads a tokenizer beside the weights; a word-level one of the tiny vocabulary, so that the test
    # needs no file of the default model (the GPU machine has none).
    vocabulary = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=vocabulary).save_pretrained(path)
    second = "disk" if split == "cpu-and-offloaded" else "cuda:0"
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": second, "model.norm": "cpu", "lm_head": "cpu"}
    placed = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=tmp_path / "offload")
    whole, _ = load_model(str(path), device_map="auto")  # one CPU: accelerate puts every layer on it
    input_ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(3))
    logits, caches = {}, {}
    for name, model in (("tiny", tiny), ("placed", placed), ("whole", whole)):
        with torch.no_grad(), NestedKVPress(0.75)(model):
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=5,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        logits[name], caches[name] = torch.stack(out.logits).cpu(), out.past_key_values
    expected = "cpu" if second == "disk" else "cuda"
    assert [layer.context_keys.device.type for layer in caches["placed"].layers] == ["cpu", expected]
    assert all(isinstance(layer, RaggedLayer) for cache in caches.values() for layer in cache.layers)
    torch.testing.assert_close(logits["placed"], logits["tiny"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["whole"], logits["tiny"], atol=1e-5, rtol=1e-5)


def test_decoding_from_the_ragged_cache_compiles_into_one_graph_with_the_logits_of_eager_decoding():
    """A decoding step after a compressed prefill reads nothing back from the device (no ``.item()``: the
    press tells prefill from decoding by the cache's length), so ``torch.compile(fullgraph=True)`` traces it
    whole; dynamo's own backend keeps the test fast, inductor adds only code generation. (Masked storage
    cannot: kvpress's fake-key search branches on data, in its attention patch.)"""
    import torch._dynamo

    tiny = tiny_llama()
    input_ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(tiny.forward, backend="eager", fullgraph=True)
    logits = {}
    for name, forward in (("eager", tiny.forward), ("compiled", compiled)):
        cache, token, steps = DynamicCache(), torch.tensor([[7]]), []
        with torch.no_grad(), NestedKVPress(0.75)(tiny):
            tiny.model(input_ids=input_ids, past_key_values=cache)  # the prefill compresses, eagerly
            for step in range(6):
                out = forward(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[120 + step]]))
                steps.append(out.logits[0, -1])
                token = out.logits[:, -1:].argmax(-1)
        logits[name] = torch.stack(steps)
    assert isinstance(cache.layers[0], RaggedLayer)
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-5, rtol=1e-5)
