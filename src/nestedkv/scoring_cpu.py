"""Steps 1 to 3 of the NestedKV score fused into one pass per head, for the CPU.

:mod:`nestedkv.scoring` defines the score as tensor functions; computing them op by op reads each head's
``(N, d)`` keys about fifteen times and runs a float32 prefix sum (a serial scan), which made those steps
most of the score's time on CPU. ``scoring_cpu.c`` (beside this file) normalises the keys, forms the
global, block and sliding-window anchors with running sums in double, and writes the three cosine
anomalies in one pass over each head, heads spread over threads. The tests hold it to
:func:`nestedkv.scoring.raw_anomalies`. :func:`kernel` is ``None`` where no C compiler builds it or
``NESTEDKV_CPU_KERNEL=0`` is set; :func:`nestedkv.scoring.nestedkv_score` then uses the tensor functions.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from nestedkv.native import build

SOURCE = Path(__file__).with_name("scoring_cpu.c")

KERNEL_SCALES = ("global", "block", "window")
"""The scales of the kernel's output, in its order."""


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built once per process; ``None`` where it is disabled or cannot be built."""
    loaded = build(SOURCE)
    if loaded is not None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        loaded.nestedkv_anomalies_cpu.argtypes = [pointer] * 3 + [size] * 5 + [ctypes.c_double, ctypes.c_int]
        loaded.nestedkv_anomalies_cpu.restype = ctypes.c_int
    return loaded


def raw_anomalies_cpu(keys: torch.Tensor, bounds: list[int], window: int, eps: float) -> torch.Tensor:
    """Cosine anomalies of every key at the global, block and window scales (:data:`KERNEL_SCALES`).
    ``keys (H, N, d)`` on CPU, any float dtype -> ``(H, 3, N)`` float32.

    ``bounds``: the block edges (:func:`nestedkv.scoring.block_bounds`); ``window``: the window anchor's
    length; ``eps``: the clamp of key and anchor norms. Requires :func:`kernel` to be available.
    """
    heads, n, d = keys.shape
    keys = keys.to(torch.float32).contiguous()
    edges = torch.tensor(bounds, dtype=torch.int64)
    out = keys.new_empty(heads, len(KERNEL_SCALES), n)
    status = kernel().nestedkv_anomalies_cpu(
        keys.data_ptr(), edges.data_ptr(), out.data_ptr(), heads, n, d, len(bounds), window, eps,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU scoring kernel could not allocate its scratch memory")
    return out
