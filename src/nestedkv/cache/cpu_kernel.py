"""A variable-length attention kernel for the CPU, the counterpart of FlashAttention's varlen call on CUDA.

PyTorch has no CPU kernel that reads per-head segments of a packed buffer in place; gathering them
into a padded block costs a copy of the whole cache on every decoding step. ``ragged_attention_cpu.c``
(beside this file) reads each stream's context and tail where they lie, split over threads by chunks
of keys, in one call for every stream of a layer; :func:`nestedkv.native.build` compiles it the first time a
process needs it. Where it cannot be built, or ``NESTEDKV_CPU_KERNEL=0`` is set, :func:`kernel` is ``None``
and :mod:`nestedkv.cache.attention` uses its gathered path: same answers, slower.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from nestedkv.native import build

SOURCE = Path(__file__).with_name("ragged_attention_cpu.c")

DTYPES = (torch.float32, torch.bfloat16)
"""Cache dtypes the kernel reads (it computes in float32; bfloat16 widens exactly, float16 does not)."""


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built once per process; ``None`` where it is disabled or cannot be built."""
    loaded = build(SOURCE)
    if loaded is not None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        loaded.ragged_attention_cpu.argtypes = [pointer] * 7 + [size] * 5 + [ctypes.c_int] * 2
        loaded.ragged_attention_cpu.restype = ctypes.c_int
    return loaded


def ragged_attention_cpu(
    q: torch.Tensor, context_keys: torch.Tensor, context_values: torch.Tensor, offsets: torch.Tensor,
    tail_keys: torch.Tensor, tail_values: torch.Tensor, q_len: int,
) -> torch.Tensor:
    """Attention of each stream's query rows over its packed context and, causally, its tail.

    q ``(S, R, d)`` float32, already scaled: stream ``s``'s ``R = group * q_len`` rows, row ``r`` being
    new token ``r % q_len``; context_keys, context_values ``(L, d)``, stream ``s`` at rows
    ``offsets[s]:offsets[s + 1]`` (offsets int64 ``(S + 1,)``); tail_keys, tail_values ``(S, T, d)``, whose
    last ``q_len`` entries are the new tokens; the four in float32, or all four in bfloat16 (read as such,
    computed in float32). ``-> (S, R, d)`` float32. Requires :func:`kernel` to be available.
    """
    streams, rows, dim = q.shape
    # The C side reads raw pointers: a wrong dtype would be read as garbage, not refused.
    stored = (context_keys, context_values, tail_keys, tail_values)
    if (
        q.dtype != torch.float32 or len({tensor.dtype for tensor in stored}) != 1 or stored[0].dtype not in DTYPES
        or any(tensor.device.type != "cpu" for tensor in (q, *stored))
    ):
        raise ValueError(
            "the CPU attention kernel takes a float32 query and float32 or bfloat16 CPU keys and values; "
            "use the gathered path"
        )
    q, context_keys, context_values, tail_keys, tail_values = (tensor.contiguous() for tensor in (q, *stored))
    offsets = offsets.to(torch.int64).contiguous()
    output = q.new_empty(streams, rows, dim)
    status = kernel().ragged_attention_cpu(
        q.data_ptr(), context_keys.data_ptr(), context_values.data_ptr(), offsets.data_ptr(),
        tail_keys.data_ptr(), tail_values.data_ptr(), output.data_ptr(),
        streams, rows, q_len, tail_keys.shape[1], dim, int(context_keys.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its scratch memory")
    return output
