"""The budgeted cache (issue 13): streaming anchors, chunked prefill, compression while decoding, chat."""

import pytest
import torch
from test_correctness import generate, tiny_llama, tiny_mistral, until_eos
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nestedkv import NestedKVPress
from nestedkv.budgets import head_adaptive_keep
from nestedkv.cache import RaggedLayer
from nestedkv.chat import Chat
from nestedkv.cli import demo_sample
from nestedkv.scoring import nestedkv_score, normalise_keys, pool_neighbours
from nestedkv.settings import STREAM_POOL, BudgetedSettings, NestedKVConfig
from nestedkv.streaming import (
    BudgetedPress,
    compress_layer,
    held_per_head,
    held_per_row,
    held_scores,
    prefill_in_chunks,
    remember,
)


@pytest.mark.parametrize("arrivals", [(640,), (100, 300, 240), (1,) * 5 + (635,), (127, 1, 512)])
@pytest.mark.parametrize("switches", [{}, {"pool_size": 5, "recency": 0.5}])
def test_streaming_score_before_any_eviction_is_the_one_shot_score(arrivals, switches):
    torch.manual_seed(0)
    keys = torch.randn(1, 3, sum(arrivals), 16) + torch.randn(1, 3, 1, 16)  # a shared direction, as real keys have
    config = NestedKVConfig(block_size=128, value_weight=0.0, **switches)  # a stream scores keys only
    k_hat = normalise_keys(keys, config.eps)[0]
    memory, windows, seen = {}, [], 0
    for t in arrivals:
        windows.append(remember(memory, k_hat[:, seen : seen + t], config))
        seen += t
    window = torch.cat(windows, dim=1)
    positions = torch.arange(seen)
    held = [(keys[0, h], positions, window[h]) for h in range(3)]
    torch.testing.assert_close(held_scores(held, memory, config), nestedkv_score(keys, config)[0],
                               atol=1e-5, rtol=0)


def test_a_stream_ramps_and_pools_its_held_keys_by_their_positions_among_every_token_seen():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 300, 16) + torch.randn(1, 2, 1, 16)
    flat, ramped = (NestedKVConfig(block_size=128, recency=r, value_weight=0.0) for r in (0.0, 0.5))  # keys only
    memory = {}
    window = remember(memory, normalise_keys(keys, flat.eps)[0], flat)
    positions = torch.cat([torch.arange(4), torch.randperm(232)[:60].sort().values + 4, torch.arange(236, 300)])
    held = [(keys[0, h, positions], positions, window[h, positions]) for h in range(2)]
    scored = slice(4, len(positions) - ramped.n_recent)  # neither sinks nor the protected recent window
    expected = (held_scores(held, memory, flat) + 0.5 * positions / 299) / 1.5
    torch.testing.assert_close(held_scores(held, memory, ramped)[:, scored], expected[:, scored])
    # pooling follows the held positions too: away from the pinned ends, the flat scores pooled by position
    pooled = NestedKVConfig(block_size=128, recency=0.0, pool_size=5, value_weight=0.0)
    inner = slice(4 + 5, len(positions) - pooled.n_recent - 5)
    expected = pool_neighbours(held_scores(held, memory, flat), 5, "max", positions)
    torch.testing.assert_close(held_scores(held, memory, pooled)[:, inner], expected[:, inner])
    assert BudgetedPress().config.pool_size == STREAM_POOL > 1  # what a budgeted cache ships with


def test_head_adaptive_keep_caps_each_head_and_never_keeps_an_invalid_candidate():
    torch.manual_seed(1)
    scores = torch.rand(2, 3, 50)
    scores[0, 0] += 1  # head 0 of row 0 would take most of the layer's budget uncapped
    valid = torch.arange(50) < torch.tensor([[50, 40, 30], [20, 50, 45]])[..., None]
    keep = head_adaptive_keep(scores, 12, 0.2, max_per_head=15, valid=valid)
    assert keep.sum(-1).max() <= 15
    assert not (keep & ~valid).any()
    assert keep.sum((1, 2)).tolist() == [36, 36]
    assert head_adaptive_keep(scores, 12, 0.2).sum(-1)[0, 0] > 15  # the cap did something


def held_positions(layer) -> list[set[int]]:
    """Per (row, head) stream, the positions a cache layer holds."""
    tail = layer.keys.shape[-2]
    streams = layer.keys.shape[0] * layer.keys.shape[1]
    seen = layer.context_length if isinstance(layer, RaggedLayer) else 0
    tail_positions = set(range(seen, seen + tail))
    if not isinstance(layer, RaggedLayer):
        return [set(tail_positions) for _ in range(streams)]
    offsets, positions = layer.offsets.tolist(), layer.per_key["position"].tolist()
    return [set(positions[offsets[s] : offsets[s + 1]]) | tail_positions for s in range(streams)]


def hidden_key_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention for one unpadded sequence: dense causal softmax in float64 in which the keys
    ``module.hidden_keys`` (bool ``(B, H_kv, K)``, True = hidden) get no weight."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
    logits = query.double() @ key.transpose(-1, -2) * scaling
    q, k = logits.shape[-2:]
    hidden = torch.ones(q, k, dtype=torch.bool).triu(k - q + 1)
    window = getattr(module.config, "sliding_window", None)
    if window is not None:  # a key at least ``window`` positions before the query is out of its reach
        hidden = hidden | torch.ones(q, k, dtype=torch.bool).tril(k - q - window)
    if getattr(module, "hidden_keys", None) is not None:
        hidden = hidden | module.hidden_keys.repeat_interleave(groups, 1)[..., None, :k]
    weights = logits.masked_fill(hidden, -torch.inf).softmax(-1)
    return (weights @ value).to(query.dtype).transpose(1, 2).contiguous(), weights


AttentionInterface.register("hidden_keys", hidden_key_attention)
AttentionMaskInterface.register("hidden_keys", sdpa_mask)


@pytest.mark.parametrize(
    ("make_model", "budget"),
    [(tiny_llama, dict(budget=80)), (lambda: tiny_mistral(sliding_window=48), dict(budget=80)),
     (tiny_llama, dict(compression_ratio=0.6))],
    ids=["full", "sliding", "ratio"],
)
def test_compressions_give_what_the_masked_computation_gives_for_the_held_positions(make_model, budget):
    """Chunked prefill then decoding under a small budget (or a ratio of the tokens seen), step by step
    against a dense cache in which a reference attention hides what the budgeted cache had evicted before
    each forward pass (and, for a sliding-window model, what the window hides)."""
    model, reference = make_model(), make_model()
    reference.config._attn_implementation = "hidden_keys"
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, 260))
    steps = [ids[:, s : s + 50] for s in range(0, 200, 50)] + [ids[:, s : s + 1] for s in range(200, 260)]
    press = BudgetedPress(**budget, interval=6, head_slack=8)
    budgeted, dense, compressed = DynamicCache(), DynamicCache(), 0
    heads = model.config.num_key_value_heads
    with torch.no_grad():
        for step in steps:
            expected = reference(step, past_key_values=dense).logits
            with press(model):
                got = model(step, past_key_values=budgeted).logits
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            seen = budgeted.get_seq_length()
            for layer, module in zip(budgeted.layers, reference.model.layers, strict=True):
                hidden = torch.ones(1, heads, seen + 50, dtype=torch.bool)  # room for the next step's keys
                hidden[..., seen:] = False
                for stream, kept in enumerate(held_positions(layer)):
                    hidden[stream // heads, stream % heads, sorted(kept)] = False
                module.self_attn.hidden_keys = hidden
                average, most = held_per_head(layer)
                assert average <= press.target(seen) + max(press.interval, 50)
                assert most <= press.target(seen) + press.head_slack + max(press.interval, 50)
            compressed += isinstance(budgeted.layers[0], RaggedLayer)
    assert seen == ids.shape[1]
    assert compressed > 50  # compressed while prefilling and while decoding, not only at the end
    longest = max(len(kept) for kept in held_positions(budgeted.layers[0]))
    assert longest <= press.target(seen) + 8 + 6
    if press.compression_ratio is not None:  # 40 % of 260 tokens: more than a fixed budget of 80 would hold
        assert press.target(seen) == 104 and held_per_head(budgeted.layers[0])[0] > 80


@pytest.fixture(scope="module")
def demo_ids(tokenizer):
    return tokenizer(demo_sample()["context"], return_tensors="pt").input_ids


def test_chunked_prefill_equals_ordinary_prefill_when_the_budget_holds_everything(model, demo_ids):
    ids = demo_ids[:, :700]
    with torch.no_grad():
        expected = model(ids, past_key_values=DynamicCache()).logits[:, -1]
        with BudgetedPress(budget=1000)(model):
            cache = prefill_in_chunks(model, ids[:, :-1], chunk_size=128)
            got = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_cache_stays_within_budget_through_a_long_generation(model, demo_ids):
    press = BudgetedPress(budget=128, interval=16, head_slack=16)
    cache, held, nbytes = DynamicCache(), [], []

    def watch(input_ids, scores):  # after every generated token
        held.append(max(held_per_head(layer)[1] for layer in cache.layers))
        nbytes.append(sum(layer.nbytes for layer in cache.layers))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = demo_ids[:, :300]
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, min_new_tokens=600,
                             max_new_tokens=600, do_sample=False, stopping_criteria=[watch])
    assert out.shape[1] == 900 and cache.get_seq_length() == 899 and len(nbytes) == 600
    assert max(held) <= press.budget + press.head_slack + press.interval
    layer, config = cache.layers[0], press.config
    streams, d = layer.heads * len(cache.layers), layer.keys.shape[-1]
    float_bytes = layer.keys.element_size()
    kv_bytes = 2 * d * float_bytes * (press.budget + press.interval)
    per_key_bytes = (8 + 4) * (press.budget + press.interval)  # position (int64), window anomaly (float32)
    blocks = 900 // 128 + 1
    anchor_bytes = (config.window + 1 + blocks) * d * 4 + blocks * 8
    assert max(nbytes) <= streams * (kv_bytes + per_key_bytes + anchor_bytes)
    assert max(nbytes[300:]) <= 1.02 * max(nbytes[:300])  # flat: it does not grow with the tokens generated


def test_multi_turn_needle_answered_from_a_budgeted_cache(model, tokenizer):
    demo = demo_sample()
    chat = Chat(model, tokenizer, BudgetedPress(budget=1024), context=demo["context"], max_new_tokens=24)
    seen_after_context = chat.status().seen
    assert seen_after_context > 2500 and chat.status().held <= 1024 + 16
    chat.say("Hello! Please read the document carefully.")
    answer = chat.say(demo["question"])
    status = chat.status()
    assert demo["answer"] in answer
    assert status.seen > seen_after_context + 20 and status.held <= 1024 + 16 + 16


def test_a_ratio_budget_keeps_a_share_of_the_tokens_seen_never_below_the_protected_positions():
    press = BudgetedPress(compression_ratio=0.75)
    assert press.budget is None and press.protected == 68
    assert [press.target(seen) for seen in (100, 1000, 10000)] == [69, 250, 2500]
    assert BudgetedPress().budget == 512 and BudgetedPress().target(10000) == 512
    with pytest.raises(ValueError, match="give a budget or a compression_ratio, not both"):
        BudgetedPress(budget=256, compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        BudgetedPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="BudgetedPress scores keys only: value_weight must be 0"):
        BudgetedPress(config=NestedKVConfig(value_weight=0.5))
    with pytest.raises(ValueError, match="BudgetedPress scores the keys as cached: scored_keys must be 'cached'"):
        BudgetedPress(config=NestedKVConfig(value_weight=0.0, scored_keys="pre-rope"))


def test_refusals(model, tokenizer):
    with pytest.raises(ValueError, match="budget"):
        BudgetedPress(budget=4)
    with pytest.raises(ValueError, match="interval"):
        BudgetedPress(interval=0)
    ids = tokenizer(demo_sample()["context"], return_tensors="pt").input_ids[:, :200]
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, cached \+ new tokens\) = \(1, 200\)"):
        prefill_in_chunks(model, ids, attention_mask=torch.ones(1, 199, dtype=torch.long))
    cache = DynamicCache()
    with torch.no_grad():
        with NestedKVPress(compression_ratio=0.5)(model):
            model(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="another press"), BudgetedPress(budget=100)(model):
            model(ids[:, :20], past_key_values=cache)


def test_batch_operations_move_each_stream_s_memory_and_kept_keys_with_its_row():
    torch.manual_seed(4)
    layer = DynamicLayer()
    layer.update(torch.randn(3, 2, 30, 8), torch.randn(3, 2, 30, 8))
    config = BudgetedSettings().config
    ragged = compress_layer(layer, budgets=[12] * 3, head_slack=4, alpha_safeguard=0.2, config=config)
    before = {name: tensor.clone() for name, tensor in ragged.per_stream.items()}
    offsets, positions = ragged.offsets.tolist(), ragged.per_key["position"].clone()
    stream_positions = [positions[offsets[s] : offsets[s + 1]] for s in range(6)]
    ragged.reorder_cache(torch.tensor([2, 0, 2]))
    ragged.batch_repeat_interleave(2)
    order = [2, 2, 0, 0, 2, 2]  # rows after both operations, as rows of the original batch
    streams = [row * 2 + head for row in order for head in range(2)]
    for name, tensor in ragged.per_stream.items():
        assert torch.equal(tensor, before[name][streams])
    offsets = ragged.offsets.tolist()
    for new, old in enumerate(streams):
        assert torch.equal(ragged.per_key["position"][offsets[new] : offsets[new + 1]], stream_positions[old])


def test_beam_search_over_a_batch_equals_each_row_alone():
    """Beam search reorders, repeats and selects rows: the per-stream memory must move with them."""
    model = tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 150))
    press = BudgetedPress(budget=80, interval=6, head_slack=8)
    options = {"max_new_tokens": 30, "num_beams": 3, "num_return_sequences": 2, "do_sample": False,
               "pad_token_id": 0}
    with torch.no_grad(), press(model):
        together = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        alone = [model.generate(ids[row : row + 1], attention_mask=torch.ones_like(ids[:1]), **options)
                 for row in range(2)]
    assert torch.equal(together, torch.cat(alone))


def test_padding_enters_no_anchor_and_each_stream_counts_its_own_tokens():
    """Memory fed a padded batch, chunk by chunk, equals memory fed each stream's tokens alone."""
    torch.manual_seed(5)
    config = NestedKVConfig(block_size=16, window=8)
    chunks = [torch.randn(3, 12, 8) for _ in range(3)]
    real = [torch.rand(3, 12) > 0.4 for _ in range(3)]
    real[0][2] = False  # a stream that has only seen padding after the first chunk
    batched = {}
    windows = [remember(batched, keys, config, mask) for keys, mask in zip(chunks, real, strict=True)]
    for s in range(3):
        alone = {}
        for keys, mask, window in zip(chunks, real, windows, strict=True):
            expected = remember(alone, keys[s : s + 1, mask[s]], config)[0]
            torch.testing.assert_close(window[s, mask[s]], expected)
            assert not window[s, ~mask[s]].any()
        assert int(batched["seen"][s]) == int(alone["seen"][0]) == sum(int(mask[s].sum()) for mask in real)
        torch.testing.assert_close(batched["global_sum"][s], alone["global_sum"][0])
        torch.testing.assert_close(batched["recent_keys"][s], alone["recent_keys"][0])
        known = torch.isin(batched["block_ids"][s], alone["block_ids"][0])
        torch.testing.assert_close(batched["block_sums"][s, known], alone["block_sums"][0])
        assert not batched["block_sums"][s, ~known].any()


def test_a_padded_batch_keeps_and_answers_what_each_row_does_alone():
    """Rows of different lengths, left-padded, then a second turn padded in the middle of the cache: each row
    holds the positions it holds alone and gets the same logits. Both rows start above the budget, so the
    layer's shared compression schedule is each row's own."""
    model = tiny_llama()
    torch.manual_seed(6)
    lengths, turn_lengths = (150, 110), (20, 12)
    contexts = [torch.randint(1, model.config.vocab_size, (1, n)) for n in lengths]
    turns = [torch.randint(1, model.config.vocab_size, (1, n)) for n in turn_lengths]
    decoded = torch.randint(1, model.config.vocab_size, (2, 20))

    def left_padded(parts):
        width = max(part.shape[1] for part in parts)
        ids, mask = torch.zeros(len(parts), width, dtype=torch.long), torch.zeros(len(parts), width, dtype=torch.long)
        for row, part in enumerate(parts):
            ids[row, width - part.shape[1] :], mask[row, width - part.shape[1] :] = part[0], 1
        return ids, mask

    def run(steps):
        """Feed (ids, mask over the new columns) steps into a budgeted cache; logits of each step's last token."""
        press, cache, mask, logits = BudgetedPress(budget=80, interval=6, head_slack=8), DynamicCache(), None, []
        with torch.no_grad(), press(model):
            for ids, new_mask in steps:
                mask = new_mask if mask is None else torch.cat([mask, new_mask], dim=1)
                positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
                out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
                logits.append(out.logits[:, -1])
        return logits, cache

    def steps_of(prompt, turn, rows):
        decode = [(decoded[rows, i : i + 1], torch.ones(len(rows), 1, dtype=torch.long)) for i in range(20)]
        return [prompt, *decode[:10], turn, *decode[10:]]

    batch_logits, batch_cache = run(steps_of(left_padded(contexts), left_padded(turns), [0, 1]))
    heads = model.config.num_key_value_heads
    for row in range(2):
        alone = [(ids, torch.ones_like(ids)) for ids in (contexts[row], turns[row])]
        alone_logits, alone_cache = run(steps_of(alone[0], alone[1], [row]))
        for got, expected in zip(batch_logits, alone_logits, strict=True):
            torch.testing.assert_close(got[row], expected[0], atol=1e-4, rtol=1e-4)
        for together, single in zip(batch_cache.layers, alone_cache.layers, strict=True):
            assert isinstance(together, RaggedLayer) and together.tail_length == single.tail_length
            for head in range(heads):
                stream = row * heads + head
                start, end = together.offsets[stream], together.offsets[stream + 1]
                assert torch.equal(together.per_key["position"][start:end],
                                   single.per_key["position"][single.offsets[head] : single.offsets[head + 1]])
    assert max(held_per_head(layer)[1] for layer in batch_cache.layers) <= 80 + 8 + 6


def test_a_ratio_budget_keeps_a_share_of_each_padded_row_s_own_tokens():
    model = tiny_llama()
    torch.manual_seed(10)
    ids = torch.randint(1, model.config.vocab_size, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # 200 tokens
    cache, press = DynamicCache(), BudgetedPress(compression_ratio=0.6)
    with torch.no_grad(), press(model):
        prefill_in_chunks(model, ids, cache, chunk_size=300, attention_mask=mask)
    assert [press.target(300), press.target(200)] == [120, 80]
    for layer in cache.layers:
        assert (layer.context_lengths.sum(dim=-1) / layer.heads).tolist() == [120, 80]


def test_a_single_padded_token_is_dropped_at_once_not_kept_as_a_token_later():
    model = tiny_llama()
    torch.manual_seed(9)
    ids = torch.randint(1, model.config.vocab_size, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, -1] = 0  # row 1's last token is padding, fed alone like a decoding step
    cache = DynamicCache()
    with torch.no_grad(), BudgetedPress(budget=80, interval=64, head_slack=8)(model):  # no compression due
        model(ids[:, :20], attention_mask=mask[:, :20], past_key_values=cache)
        model(ids[:, 20:], attention_mask=mask, position_ids=torch.tensor([[20], [20]]), past_key_values=cache)
    for layer in cache.layers:
        assert isinstance(layer, RaggedLayer) and layer.tail_length == 0
        assert layer.context_lengths.tolist() == [[21, 21], [20, 20]]


def test_a_row_above_its_budget_is_compressed_whatever_the_other_rows_hold():
    """A long row and a short one (below the budget) decoding together: the long row must stay within its
    budget although the layer's average is below it."""
    model = tiny_llama()
    torch.manual_seed(8)
    ids = torch.randint(1, model.config.vocab_size, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, :120] = 0  # 30 tokens
    press, cache, held = BudgetedPress(budget=80, interval=6, head_slack=8), DynamicCache(), []

    def watch(input_ids, scores):  # after every generated token
        held.append([held_per_row(layer) for layer in cache.layers])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.no_grad(), press(model):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=40, min_new_tokens=40,
                       do_sample=False, pad_token_id=0, stopping_criteria=[watch])
    assert len(held) == 40
    assert max(long for step in held for long, _ in step) <= 80 + 6
    assert min(short for short_row in held[-1] for short in short_row[1:]) == 30 + 39  # all it has seen


def test_chunked_prefill_of_a_padded_batch_equals_ordinary_prefill_when_the_budget_holds_everything():
    model = tiny_llama()
    torch.manual_seed(7)
    ids = torch.randint(1, model.config.vocab_size, (2, 90))
    mask = torch.ones_like(ids)
    mask[1, :35] = 0  # a left-padded row, longer than the first chunk
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        with BudgetedPress(budget=200)(model):
            cache = prefill_in_chunks(model, ids[:, :-1], chunk_size=32, attention_mask=mask[:, :-1])
            got = model(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache)
    torch.testing.assert_close(got.logits[:, -1], expected, atol=1e-4, rtol=1e-4)
    layer = cache.layers[0]
    assert isinstance(layer, RaggedLayer)
    assert (layer.context_lengths[:, 0] + layer.tail_length).tolist() == [90, 55]  # every token, no padding


def test_generate_over_a_padded_batch_of_needle_contextsgives_each_row_what_it_gets_alone(model, tokenizer, prompts):
    """The real model, three prompts of ~300/500/700 tokens left-padded, a budget below each."""
    batch, _ = generate(model, tokenizer, prompts, BudgetedPress(budget=128))
    eos = model.generation_config.eos_token_id
    for row, text in enumerate(prompts):
        alone, _ = generate(model, tokenizer, [text], BudgetedPress(budget=128))
        assert until_eos(batch[row], eos) == until_eos(alone[0], eos), f"row {row}"
