"""The ragged cache against simple references: dense masked attention, row selection, cropping."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nestedkv import scoring_cpu
from nestedkv.cache import RaggedLayer, attention, cpu_kernel
from nestedkv.cache.attention import ragged_attention, uses_cpu_kernel, uses_varlen_kernel

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def dense_reference(query, keys, values, tail_keys, tail_values, keep, model_mask, scaling):
    """Attention over every context key the keep mask holds and the model's mask shows, plus the tail,
    in float64, one (row, head) at a time: the plain computation the ragged layer must reproduce.

    query (B, Hq, q, d); keys, values (B, H, N, d); tail_* (B, H, T, d); keep (B, H, N);
    model_mask bool (B, q, N + T), the mask transformers would hand to attention. -> (B, q, Hq, d).
    """
    batch, query_heads, q_len, _ = query.shape
    heads, n, tail = keys.shape[1], keys.shape[2], tail_keys.shape[2]
    group = query_heads // heads
    causal = torch.arange(tail) <= torch.arange(tail - q_len, tail)[:, None]
    output = torch.zeros(batch, q_len, query_heads, query.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(query_heads):
            kv = h // group
            k = torch.cat([keys[b, kv], tail_keys[b, kv]]).double()
            v = torch.cat([values[b, kv], tail_values[b, kv]]).double()
            visible = model_mask[b].clone()
            visible[:, :n] &= keep[b, kv]
            visible[:, n:] &= causal
            logits = (query[b, h].double() * scaling) @ k.T
            weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
            output[b, :, h] = weights @ v
    return output


def ragged_layer(keys, values, keep, tail_keys, tail_values, keep_positions):
    layer = RaggedLayer.from_keep(keys, values, keep, keep_positions=keep_positions)
    layer.update(tail_keys, tail_values)
    return layer


SHAPES = dict(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    group=st.integers(1, 4),
    n=st.integers(1, 200),
    tail=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    data=st.data(),
)


@settings(max_examples=80, deadline=None)
@given(
    window=st.one_of(st.none(), st.integers(1, 64)),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    **SHAPES,
)
def test_ragged_attention_equals_dense_masked_attention(batch, heads, group, n, tail, window, dtype, seed, data):
    # one new token at a time (as a long chunk goes, in blocks of tokens) or all at once
    logits_at_once = data.draw(st.sampled_from([1, attention.GATHERED_LOGITS]))
    # the CPU kernel where it applies, or the gathered path everywhere (as on a machine without a compiler)
    built = cpu_kernel.kernel() if data.draw(st.booleans()) else None
    with mock.patch.object(attention, "GATHERED_LOGITS", logits_at_once), mock.patch.object(
        cpu_kernel, "kernel", lambda: built
    ):
        check_against_dense(batch, heads, group, n, tail, window, dtype, seed, data, device="cpu", d=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), d=st.sampled_from([64, 128]), **SHAPES)
def test_cuda_varlen_kernel_equals_dense_masked_attention(batch, heads, group, n, tail, dtype, d, seed, data):
    check_against_dense(batch, heads, group, n, tail, None, dtype, seed, data, device="cuda", d=d)


def check_against_dense(batch, heads, group, n, tail, window, dtype, seed, data, device, d):
    """Random ragged layer (padding, keep masks, tail, optional sliding window) on ``device``:
    ragged_attention must equal :func:`dense_reference`, and use the varlen kernel wherever it can."""
    generator = torch.Generator().manual_seed(seed)
    q_len = data.draw(st.integers(1, tail))
    keys, values = (torch.randn(batch, heads, n, d, generator=generator).to(dtype) for _ in range(2))
    tail_keys, tail_values = (torch.randn(batch, heads, tail, d, generator=generator).to(dtype) for _ in range(2))
    query = torch.randn(batch, heads * group, q_len, d, generator=generator).to(dtype)
    # Left or right padding per row; pads are never kept; every row keeps at least one real position.
    pads = [data.draw(st.integers(0, n - 1)) for _ in range(batch)]
    left = data.draw(st.booleans())
    real = torch.ones(batch, n, dtype=torch.bool)
    for b, pad in enumerate(pads):
        if pad and left:
            real[b, :pad] = False
        elif pad:
            real[b, n - pad :] = False
    keep = (torch.rand(batch, heads, n, generator=generator) < data.draw(st.floats(0.05, 1.0))) & real[:, None]
    first_real = real.float().argmax(dim=-1)
    keep[torch.arange(batch), 0, first_real] = True  # a head may keep one position only
    # The model's own mask: padding columns hidden, tail rows causal, and a sliding window if any.
    columns = torch.arange(n + tail)
    rows = torch.arange(n + tail - q_len, n + tail)
    model_mask = torch.cat([real, torch.ones(batch, tail, dtype=torch.bool)], dim=-1)[:, None, :].expand(-1, q_len, -1)
    if window is not None:
        model_mask = model_mask & (columns > rows[:, None] - window)
    layer = ragged_layer(
        keys.to(device), values.to(device), keep.to(device), tail_keys.to(device), tail_values.to(device),
        keep_positions=window is not None,
    )
    scaling = d**-0.5
    query_on = query.to(device)
    assert uses_varlen_kernel(query_on, layer) == (device == "cuda" and window is None)
    assert uses_cpu_kernel(query_on, layer) == (
        device == "cpu" and dtype in (torch.float32, torch.bfloat16) and window is None
        and cpu_kernel.kernel() is not None
    )
    got = ragged_attention(query_on, layer, scaling, model_mask[:, None].to(device))
    want = dense_reference(query, keys, values, tail_keys, tail_values, keep, model_mask, scaling)
    assert got.dtype == dtype and got.shape == want.shape and got.device.type == device
    torch.testing.assert_close(got.cpu().double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.skipif(cpu_kernel.kernel() is None, reason="no C compiler builds the CPU kernel here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("q_len", [1, 3, attention.CPU_KERNEL_TOKENS])
def test_cpu_kernel_splits_long_heads_into_chunks_and_merges_them(q_len, d, dtype):
    """Heads longer than the kernel's chunk of keys (256), an empty head, one of a single key: the
    chunks' partial softmaxes merged must equal the plain computation, and ragged_attention must use it.
    3 query rows per stream take the kernel's row-by-row loops, 9 and 384 its register tiles (with rows
    and keys left over from whole tiles; d = 64 also takes its paired-row output tiles). A bfloat16 cache is
    read as such and computed in float32: only the output's rounding to bfloat16 differs from the reference."""
    generator = torch.Generator().manual_seed(q_len)
    batch, heads, group, n, tail = 2, 3, 3, 900, q_len + 2
    keys, values = (torch.randn(batch, heads, n, d, generator=generator).to(dtype) for _ in range(2))
    tail_keys, tail_values = (torch.randn(batch, heads, tail, d, generator=generator).to(dtype) for _ in range(2))
    query = torch.randn(batch, heads * group, q_len, d, generator=generator).to(dtype)
    keep = torch.rand(batch, heads, n, generator=generator) < torch.tensor([0.9, 0.4, 0.0])[:, None]
    keep[0, 2], keep[1, 1], keep[1, 2, 5] = True, False, True  # row 1: one head keeps nothing, one a single key
    layer = ragged_layer(keys, values, keep, tail_keys, tail_values, keep_positions=False)
    assert layer.longest > 2 * 256 and 0 in layer.offsets.diff().tolist()
    assert uses_cpu_kernel(query, layer)
    mask = torch.ones(batch, q_len, n + tail, dtype=torch.bool)
    with mock.patch.object(cpu_kernel, "ragged_attention_cpu", wraps=cpu_kernel.ragged_attention_cpu) as called:
        got = ragged_attention(query, layer, d**-0.5, mask[:, None] if q_len > 1 else None)
    assert called.call_count == 1
    want = dense_reference(query, keys, values, tail_keys, tail_values, keep, mask, d**-0.5)
    assert got.dtype == dtype
    rounding = 2**-7 if dtype == torch.bfloat16 else 1e-5  # bfloat16: the output's rounding (at most 2^-8 of it)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=rounding)


@pytest.mark.parametrize("loader", [cpu_kernel.kernel, scoring_cpu.kernel], ids=["attention", "scoring"])
def test_cpu_kernels_can_be_switched_off(loader, monkeypatch):
    monkeypatch.setenv("NESTEDKV_CPU_KERNEL", "0")
    loader.cache_clear()
    try:
        assert loader() is None
    finally:
        loader.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keys_of_large_norm_do_not_overflow(dtype):
    generator = torch.Generator().manual_seed(0)
    keys = 300 * torch.randn(1, 2, 50, 64, generator=generator)
    values = torch.randn(1, 2, 50, 64, generator=generator)
    query = 300 * torch.randn(1, 4, 1, 64, generator=generator)
    tail = torch.randn(1, 2, 1, 64, generator=generator)
    keep = torch.rand(1, 2, 50, generator=generator) < 0.5
    reference = ragged_attention(query, ragged_layer(keys, values, keep, tail, tail, False), 0.125)
    half = ragged_attention(
        query.to(dtype), ragged_layer(keys.to(dtype), values.to(dtype), keep, tail.to(dtype), tail.to(dtype), False),
        0.125,
    )
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=0.05, rtol=0.05)


def test_row_selection_moves_the_packed_context_with_the_tail():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.randn(3, 2, 10, 4, generator=generator), torch.randn(3, 2, 10, 4, generator=generator)
    keep = torch.rand(3, 2, 10, generator=generator) < 0.5
    tail = torch.randn(3, 2, 2, 4, generator=generator)
    rows = torch.tensor([2, 0, 0, 1])
    layer = ragged_layer(keys, values, keep, tail, tail, True)
    layer.select_rows(rows)
    expected = ragged_layer(keys[rows], values[rows], keep[rows], tail[rows], tail[rows], True)
    for name in ("context_keys", "context_values", "offsets", "positions", "keys", "values"):
        assert torch.equal(getattr(layer, name), getattr(expected, name)), name
    assert layer.batch == 4

    layer = ragged_layer(keys, values, keep, tail, tail, False)
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.context_lengths, keep.sum(-1).repeat_interleave(2, dim=0))
    layer.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(layer.context_lengths, keep.sum(-1)[[0, 2]])
    layer.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(layer.context_keys, expected_context(keys, keep, [2, 2]))
    layer.batch_select_indices(torch.tensor([False, True]))  # a row mask, as a dense layer takes it
    assert layer.batch == 1 and layer.keys.shape[0] == 1
    assert torch.equal(layer.context_keys, expected_context(keys, keep, [2]))


def expected_context(keys, keep, rows):
    return torch.cat([keys[b][keep[b]] for b in rows])


def test_logical_length_and_crop():
    keys = torch.randn(1, 2, 10, 4)
    keep = torch.zeros(1, 2, 10, dtype=torch.bool)
    keep[..., :3] = True
    layer = ragged_layer(keys, keys, keep, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), False)
    assert layer.get_seq_length() == 14  # what an uncompressed cache would report
    assert layer.get_mask_sizes(torch.arange(14, 15)) == (15, 0)
    layer.crop(12)
    assert layer.keys.shape[2] == 2 and layer.get_seq_length() == 12
    layer.crop(-1)
    assert layer.get_seq_length() == 11
    with pytest.raises(ValueError, match="cannot crop a compressed cache to 9 tokens"):
        layer.crop(9)


@pytest.mark.skipif(cpu_kernel.kernel() is None, reason="no C compiler builds the CPU kernel here")
def test_cpu_kernel_refuses_tensors_it_would_misread():
    """The kernel reads raw pointers, float32 or (all four of the cache's tensors) bfloat16: anything else is
    refused in one line, not read as garbage."""
    q = torch.randn(2, 3, 8)
    keys, offsets, tail = torch.randn(10, 8), torch.tensor([0, 4, 10]), torch.randn(2, 1, 8)
    refusal = "takes a float32 query and float32 or bfloat16 CPU keys and values"
    with pytest.raises(ValueError, match=refusal):
        cpu_kernel.ragged_attention_cpu(q, keys.bfloat16(), keys, offsets, tail, tail, 1)  # mixed
    with pytest.raises(ValueError, match=refusal):
        cpu_kernel.ragged_attention_cpu(q, keys.half(), keys.half(), offsets, tail.half(), tail.half(), 1)
    with pytest.raises(ValueError, match=refusal):
        cpu_kernel.ragged_attention_cpu(q.bfloat16(), keys, keys, offsets, tail, tail, 1)
    want = cpu_kernel.ragged_attention_cpu(q, keys, keys, offsets, tail, tail, 1)
    torch.testing.assert_close(cpu_kernel.ragged_attention_cpu(q, keys, keys, offsets.int(), tail, tail, 1), want)


def attention_module(groups: int) -> torch.nn.Module:
    """What transformers' attention functions read of an attention layer: its query groups, causality, mode
    and config (which holds no sliding window)."""
    module = type("Attention", (torch.nn.Module,), {})()
    module.num_key_value_groups, module.is_causal, module.training = groups, True, False
    module.config = type("Config", (), {})()
    return module


@pytest.mark.parametrize("held", [5, 7, 9])  # fewer than layer 0 (PyramidKV), as many, more (KVCompose's rounding)
def test_a_layer_holding_another_number_of_positions_than_layer_0_reads_a_mask_fitted_to_its_keys(held):
    """transformers sizes the mask from layer 0's cache (7 positions + 2 new tokens here); a layer that holds
    ``held`` positions attends to all of them and to the new tokens causally, as SDPA with that mask would."""
    torch.manual_seed(0)
    new, heads, kv_heads, dim = 2, 4, 2, 8
    query = torch.randn(1, heads, new, dim)
    key, value = torch.randn(1, kv_heads, held + new, dim), torch.randn(1, kv_heads, held + new, dim)
    causal = torch.ones(new, new).tril().bool()
    layer_0_mask = torch.cat([torch.ones(new, 7, dtype=torch.bool), causal], dim=1)[None, None]
    module = attention_module(heads // kv_heads)
    output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, layer_0_mask, dropout=0.0, scaling=0.5)
    mask = torch.cat([torch.ones(new, held, dtype=torch.bool), causal], dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.5
    ).transpose(1, 2)
    torch.testing.assert_close(output, expected)
    additive = torch.zeros(layer_0_mask.shape).masked_fill(~layer_0_mask, float("-inf"))
    output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, additive, dropout=0.0, scaling=0.5)
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("hidden", ["left padding", "sliding window"])
@pytest.mark.parametrize("held", [5, 9])
def test_a_mask_hiding_context_is_refused_where_the_layer_holds_another_number_of_positions(hidden, held):
    """Columns of layer 0's context that the mask hides (a padded row's start, keys beyond a sliding window)
    cannot be matched to another layer's kept keys: the wrapper refuses instead of cutting or widening."""
    new, dim = 2, 8
    query, key = torch.randn(2, 4, new, dim), torch.randn(2, 2, held + new, dim)
    causal = torch.ones(new, new).tril().bool()
    mask = torch.cat([torch.ones(new, 7, dtype=torch.bool), causal], dim=1).repeat(2, 1, 1, 1)
    if hidden == "left padding":
        mask[1, :, :, :3] = False
    else:
        mask[:, :, 1, 0] = False  # the second new token's window no longer reaches the first column
    module = attention_module(2)
    for layer_0_mask in (mask, torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)):
        with pytest.raises(ValueError, match="hides some of the context"):
            ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, key, layer_0_mask, dropout=0.0, scaling=0.5)


@pytest.mark.parametrize("option", [{"softcap": 30.0}, {"s_aux": torch.zeros(4)}])
def test_soft_capping_and_attention_sinks_are_refused_where_the_attention_would_apply_them(option):
    """sdpa ignores them (the uncompressed model under sdpa too), so ragged attention there is the same answer;
    FlashAttention applies them, which ragged attention does not: refused."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 12, 8, generator=generator)
    keep = torch.rand(1, 2, 12, generator=generator) < 0.5
    layer = ragged_layer(keys, keys, keep, keys[:, :, :1], keys[:, :, :1], False)
    query = torch.randn(1, 4, 1, 8, generator=generator)
    arguments = (attention_module(2), query, layer.keys, layer.values, None)
    output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](*arguments, scaling=0.5, **option)
    torch.testing.assert_close(output, ragged_attention(query, layer, 0.5))
    with pytest.raises(ValueError, match=f"ragged attention does not apply {next(iter(option))} \\(flash_attention_2"):
        ALL_ATTENTION_FUNCTIONS["flash_attention_2"](*arguments, scaling=0.5, **option)
