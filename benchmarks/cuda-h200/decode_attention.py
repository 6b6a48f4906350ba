"""One layer's decoding attention on CUDA: what each way of reading a ragged cache costs, launched
eagerly and replayed from a CUDA graph. Evidence for issue 14's next step (run on a lent GPU).

Shapes are one Llama-3.2-1B layer (8 KV heads, 4 query heads each, head_dim 64, bfloat16) at
``N`` = 32768 context tokens, ``r`` = 0.9, with 16 tokens already decoded. Head-adaptive kept
lengths are drawn at random around 0.1 N per stream (their sum per row is 0.1 N H, as a
head-adaptive budget keeps). Ways compared, one decoding step of one layer each:

* ``dense``: SDPA (FlashAttention; cuDNN's SDPA off, as ``nestedkv bench`` does) over the whole
  uncompressed cache ``(B, 8, N + 16, 64)`` with grouped-query attention: the uncompressed model;
* ``ragged``: today's :func:`nestedkv.cache.attention.ragged_attention` on a :class:`RaggedLayer`
  (varlen FlashAttention over the packed context, the dense tail attended apart, a log-sum-exp merge);
* ``one call``: each stream's kept keys followed by room for the tokens still to come, in one
  buffer; the new token's key and value are written in place (one ``index_copy_`` each) and one
  FlashAttention call reads every stream from its start (``cum_seq_k``) for its used length
  (``seqused_k``), context and tail alike, no merge (``aten::_flash_attention_forward``);
* ``split call``: the same buffer, each stream read as ``SPLITS`` equal parts, so that the GPU gets
  enough sequences, and the parts merged by their log-sum-exps.

The ``one call`` and ``split call`` outputs are checked against ``ragged``'s (same kept keys, same tail). Eager times
are wall-clock per call over ``CALLS`` calls; graph times replay one captured call ``CALLS``
times (the used lengths stay fixed, so every replay is the same step). Usage:
``python benchmarks/cuda-h200/decode_attention.py`` on a machine with a GPU; prints a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from nestedkv.cache import RaggedLayer
from nestedkv.cache.attention import ragged_attention

KV_HEADS, GROUP, HEAD_DIM, TAIL, ROOM = 8, 4, 64, 16, 64
SPLITS = 8  # parts of each stream read in parallel by the split call
CALLS, WARMUP = 200, 20


def kept_lengths(batch: int, n: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Head-adaptive kept lengths ``(B * H,)`` summing to ``(1 - ratio) n H`` per row, each in ``[1, n]``."""
    shares = torch.rand(batch, KV_HEADS, generator=generator) + 0.25
    lengths = (shares / shares.sum(-1, keepdim=True) * (1 - ratio) * n * KV_HEADS).round().long()
    return lengths.clamp(1, n).flatten()


def per_call_seconds(step, graphed: bool) -> float | str:
    """Mean wall time of one ``step()`` over :data:`CALLS` calls (eager or graph replay)."""
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    if graphed:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        except Exception as error:  # report, not hide: which way cannot be captured, and why
            return f"not capturable: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        step = graph.replay
        step()
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS


def layer_ways(batch: int, n: int = 32768, ratio: float = 0.9) -> tuple[str, dict[str, Callable[[], torch.Tensor]]]:
    """One decoding step of one layer at ``batch`` rows, each way as a call returning ``(B, 1, Hq, d)``."""
    device, dtype, scale = "cuda", torch.bfloat16, HEAD_DIM**-0.5
    generator = torch.Generator().manual_seed(batch)
    streams = batch * KV_HEADS
    lengths = kept_lengths(batch, n, ratio, generator).to(device)
    total = int(lengths.sum())
    context_keys = torch.randn(total, HEAD_DIM, device=device, dtype=dtype)
    context_values = torch.randn(total, HEAD_DIM, device=device, dtype=dtype)
    tail_keys = torch.randn(batch, KV_HEADS, TAIL, HEAD_DIM, device=device, dtype=dtype)
    tail_values = torch.randn(batch, KV_HEADS, TAIL, HEAD_DIM, device=device, dtype=dtype)
    query = torch.randn(batch, KV_HEADS * GROUP, 1, HEAD_DIM, device=device, dtype=dtype)

    layer = RaggedLayer(context_keys, context_values, RaggedLayer.offsets_of(lengths), batch, KV_HEADS, n)
    layer.keys, layer.values, layer.tail_length = tail_keys, tail_values, TAIL

    # one call: stream s owns rows starts[s] : starts[s] + lengths[s] + TAIL + ROOM, its tail after its context.
    capacity = lengths + TAIL + ROOM
    starts = RaggedLayer.offsets_of(capacity)
    buffer_keys = torch.zeros(int(starts[-1]), 1, HEAD_DIM, device=device, dtype=dtype)
    buffer_values = torch.zeros_like(buffer_keys)
    shift = torch.repeat_interleave(starts[:-1] - layer.offsets[:-1], lengths)  # packed row -> its row in the buffer
    context_rows = torch.arange(total, device=device) + shift
    buffer_keys[context_rows, 0], buffer_values[context_rows, 0] = context_keys, context_values
    tail_rows = ((starts[:-1] + lengths)[:, None] + torch.arange(TAIL, device=device)).flatten()
    buffer_keys[tail_rows, 0] = tail_keys.reshape(-1, HEAD_DIM)
    buffer_values[tail_rows, 0] = tail_values.reshape(-1, HEAD_DIM)
    used = (lengths + TAIL).to(torch.int32)
    write_rows = starts[:-1] + lengths + TAIL - 1  # the newest tail token's row, written again every step
    cum_seq_k = starts.to(torch.int32)
    cum_seq_q = torch.arange(0, (streams + 1) * GROUP, GROUP, device=device, dtype=torch.int32)
    max_k = int(capacity.max())

    def write_newest_token() -> None:
        """A decoding step's write of the new token's key and value into each stream's room."""
        buffer_keys.index_copy_(0, write_rows, tail_keys[:, :, -1].reshape(streams, 1, HEAD_DIM))
        buffer_values.index_copy_(0, write_rows, tail_values[:, :, -1].reshape(streams, 1, HEAD_DIM))

    def one_call() -> torch.Tensor:
        write_newest_token()
        output = torch.ops.aten._flash_attention_forward(
            query.reshape(streams * GROUP, 1, HEAD_DIM), buffer_keys, buffer_values, cum_seq_q, cum_seq_k,
            GROUP, max_k, 0.0, False, False, scale=scale, seqused_k=used,
        )[0]
        return output.view(batch, KV_HEADS * GROUP, 1, HEAD_DIM).transpose(1, 2).contiguous()

    dense_keys = torch.randn(batch, KV_HEADS, n + TAIL, HEAD_DIM, device=device, dtype=dtype)
    dense_values = torch.randn_like(dense_keys)

    def dense() -> torch.Tensor:
        # The uncompressed model also writes the new token into its cache first (DynamicLayer.update
        # concatenates): left out here, in dense's favour.
        return torch.nn.functional.scaled_dot_product_attention(
            query, dense_keys, dense_values, scale=scale, enable_gqa=True
        ).transpose(1, 2).contiguous()

    # split call: the same buffer, each stream read as SPLITS equal parts (more sequences for the GPU's
    # multiprocessors, as split-KV decoding kernels do); the parts' softmaxes merged by their log-sum-exps.
    part = (used + SPLITS - 1) // SPLITS  # (streams,)
    first = torch.arange(SPLITS, device=device) * part[:, None]  # (streams, SPLITS) offsets in the stream
    part_used = (used[:, None] - first).clamp(0, None).minimum(part[:, None]).to(torch.int32).flatten()
    part_starts = torch.cat([(starts[:-1, None] + first).flatten(), starts[-1:]]).to(torch.int32)
    part_empty = (part_used == 0).view(streams, SPLITS, 1)
    cum_seq_q_parts = torch.arange(0, (streams * SPLITS + 1) * GROUP, GROUP, device=device, dtype=torch.int32)
    max_part = int(part.max())

    def split_call() -> torch.Tensor:
        write_newest_token()
        queries = query.reshape(streams, 1, GROUP, HEAD_DIM).expand(-1, SPLITS, -1, -1).reshape(-1, 1, HEAD_DIM)
        output, lse = torch.ops.aten._flash_attention_forward(
            queries, buffer_keys, buffer_values, cum_seq_q_parts, part_starts,
            GROUP, max_part, 0.0, False, False, scale=scale, seqused_k=part_used,
        )[:2]
        lse = lse.view(streams, SPLITS, GROUP).masked_fill(part_empty, float("-inf"))
        weights = torch.softmax(lse, dim=1)[..., None]  # each part's share of the stream's exp-sum
        merged = (weights * output.view(streams, SPLITS, GROUP, HEAD_DIM).float()).sum(1).to(query.dtype)
        return merged.view(batch, KV_HEADS * GROUP, 1, HEAD_DIM).transpose(1, 2).contiguous()

    described = f"kept {total} of {n * streams} keys"
    return described, {"dense": dense, "ragged": lambda: ragged_attention(query, layer, scale), "one call": one_call,
                       "split call": split_call}


def main() -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    schema = str(torch.ops.aten._flash_attention_forward.default._schema)
    print(torch.__version__, torch.cuda.get_device_name(), "seqused_k in aten::_flash_attention_forward:",
          "seqused_k" in schema)
    rows = []
    for batch in (1, 8):
        described, ways = layer_ways(batch)
        differences = [(ways[name]().float() - ways["ragged"]().float()).abs().max().item()
                       for name in ("one call", "split call")]
        print(f"batch {batch}: {described}; max |one call - ragged| {differences[0]:.2e}, "
              f"|split call - ragged| {differences[1]:.2e}")
        for name, step in ways.items():
            rows.append((batch, name, per_call_seconds(step, False), per_call_seconds(step, True)))
    print("| rows | way | eager (us per layer call) | CUDA graph replay (us per layer call) |")
    print("|---|---|---|---|")
    for batch, name, eager, graphed in rows:
        cells = [f"{value * 1e6:.1f}" if isinstance(value, float) else value for value in (eager, graphed)]
        print(f"| {batch} | {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
