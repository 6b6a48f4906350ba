"""Any decoder-only model transformers builds: ragged storage decodes as kvpress's masked storage does.

Tiny randomly initialised models of many architectures (attention through transformers' registry: grouped
queries, sliding-window and hybrid layers, attention chunks, QK norms, partial rotary, mixtures of experts,
latent attention with equal head sizes). Each prefills 120 tokens under ``NestedKVPress(0.5, n_recent=8)``
(head-adaptive eviction beyond the recent window), then decodes three tokens; ragged and masked storage must
give the same logits, and the compression must change them (else the comparison would say nothing). And the
press turns each one's keys back to before RoPE (``scored_keys='pre-rope'``) where its angles can be undone. What
the presses refuse is in ``test_correctness.py``.
"""

import sys
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from nestedkv.bench.replay import prefill_once
from nestedkv.cache import RaggedLayer
from nestedkv.models import attention_modules
from nestedkv.press import NestedKVPress, rotary_of
from nestedkv.scoring import undo_rotary

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, head_dim=16, initializer_range=0.2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
HYBRID = dict(sliding_window=48, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
LATENT = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
              topk_group=1)

ARCHITECTURES = {  # name -> (model class, config class, settings beside BASE; None drops a BASE setting)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral, window 48": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=48)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {}),
    "qwen3-moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(head_dim=None)),
    "phi": ("PhiForCausalLM", "PhiConfig", {}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(sliding_window=48, num_hidden_layers=4)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", HYBRID),
    "cohere": ("CohereForCausalLM", "CohereConfig", {}),
    "cohere2": ("Cohere2ForCausalLM", "Cohere2Config", HYBRID),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {}),
    "olmo3": ("Olmo3ForCausalLM", "Olmo3Config", HYBRID),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", {}),
    "starcoder2, window 48": ("Starcoder2ForCausalLM", "Starcoder2Config", dict(sliding_window=48)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", {}),
    "glm4": ("Glm4ForCausalLM", "Glm4Config", {}),
    "deepseek-v2": ("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(LATENT, head_dim=None, v_head_dim=16)),
    "llama4, chunks of 48": ("Llama4ForCausalLM", "Llama4TextConfig",
                             dict(attention_chunk_size=48, num_hidden_layers=4, intermediate_size_mlp=128,
                                  num_local_experts=2, num_experts_per_tok=1, moe_layers=[],
                                  no_rope_layers=[1, 1, 1, 0])),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "exaone4": ("Exaone4ForCausalLM", "Exaone4Config", HYBRID),
    "ministral": ("MinistralForCausalLM", "MinistralConfig", HYBRID),
    "persimmon": ("PersimmonForCausalLM", "PersimmonConfig", {}),
    "ernie4.5": ("Ernie4_5ForCausalLM", "Ernie4_5Config", {}),
}


def tiny(model_class: str, config_class: str, settings: dict) -> torch.nn.Module:
    options = {key: value for key, value in {**BASE, **settings}.items() if value is not None}
    config = getattr(transformers, config_class)(**options)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def decode(model, ids: torch.Tensor, press) -> tuple[torch.Tensor, DynamicCache]:
    """Logits of three decoding steps after a prefill of ``ids`` under ``press``, in a plain cache."""
    cache = DynamicCache()
    with torch.no_grad(), warnings.catch_warnings(), press(model):
        warnings.simplefilter("ignore")  # kvpress: "model not tested"
        model(ids, past_key_values=cache)
        steps = [model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1] for token in (5, 6, 7)]
    return torch.stack(steps), cache


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ragged_storage_decodes_as_masked_storage(name):
    model = tiny(*ARCHITECTURES[name])
    ids = torch.randint(3, 128, (1, 120), generator=torch.Generator().manual_seed(1))
    full, _ = decode(model, ids, NestedKVPress(0.0))
    masked, _ = decode(model, ids, NestedKVPress(0.5, n_recent=8, storage="masked"))
    ragged, cache = decode(model, ids, NestedKVPress(0.5, n_recent=8))
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    assert (masked - full).abs().max() > 1e-2  # the eviction changes the answer
    torch.testing.assert_close(ragged, masked, atol=1e-4, rtol=1e-4)


NO_ROPE_ANGLES = {"deepseek-v2", "llama4, chunks of 48"}
"""Rotary embeddings of their own kind (latent attention's rotated slice; Llama 4's complex angles)."""


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_rotary_of_each_architecture_is_undone(name):
    """One token repeated: the first layer's keys before RoPE are one key at every position (its input is the
    token's embedding), whatever the rotation's layout (halves, interleaved pairs, a rotated part, QK norms,
    angles derived from half of them). :func:`undo_rotary` of the probed rotation equals the model's own
    ``apply_rotary_pos_emb`` by −θ (the reference). Architectures whose angles cannot be undone get ``None``:
    the press scores their keys as cached."""
    model = tiny(*ARCHITECTURES[name])
    prefill = prefill_once(model, torch.full((1, 40), 7))
    module, cached, kwargs = attention_modules(model)[0], prefill.keys[0], prefill.hook_kwargs[0]
    rotary = rotary_of(module, cached, kwargs)
    if name in NO_ROPE_ANGLES:
        assert rotary is None
        return
    unrotated = undo_rotary(cached, rotary)
    assert (cached - cached[:, :, :1]).abs().max() > 1  # rotated: each position's key differs
    torch.testing.assert_close(unrotated, unrotated[:, :, :1].expand_as(unrotated), atol=1e-5, rtol=0)
    cos, sin = kwargs["position_embeddings"]
    r = cos.shape[-1]
    rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb
    reference = rotate(cached[..., :r], cached[..., :r], cos, -sin)[1]
    torch.testing.assert_close(unrotated[..., :r], reference, atol=1e-5, rtol=0)


def test_the_rotation_is_handed_over_on_the_keys_device():
    """The layout is read off the model once, on CPU; what the score gets is on the keys' device (``meta``
    here, standing in for a GPU: a CPU ``sign`` would not multiply CUDA keys)."""
    model = tiny(*ARCHITECTURES["llama"])
    prefill = prefill_once(model, torch.full((1, 40), 7))
    kwargs = dict(prefill.hook_kwargs[0])
    kwargs["position_embeddings"] = tuple(angle.to("meta") for angle in kwargs["position_embeddings"])
    keys = prefill.keys[0].to("meta")
    rotary = rotary_of(attention_modules(model)[0], keys, kwargs)
    assert {part.device.type for part in (rotary.cos, rotary.sin, rotary.perm, rotary.sign)} == {"meta"}
    assert undo_rotary(keys, rotary).shape == keys.shape
