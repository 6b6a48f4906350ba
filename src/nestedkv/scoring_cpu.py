"""Steps 1 to 3 of the NestedKV score fused into one pass per head, for the CPU, keys turned back to before RoPE
in the same pass where asked.

:mod:`nestedkv.scoring` defines the score as tensor functions; computing them op by op reads each head's
``(N, d)`` keys about fifteen times and runs a float32 prefix sum (a serial scan), which made those steps
most of the score's time on CPU. ``scoring_cpu.c`` (beside this file) normalises the keys, forms the
global, block and sliding-window anchors with running sums in double, and writes the three cosine
anomalies in one pass over each head, heads spread over threads; given the angles, it undoes the rotation of
each key as it reads it (:func:`nestedkv.scoring.undo_rotary` would cost more than the score itself: several
elementwise passes over a fresh copy of the keys). The tests hold it to :func:`nestedkv.scoring.raw_anomalies`
of the undone keys. :func:`kernel` is ``None`` where no C compiler builds it or
``NESTEDKV_CPU_KERNEL=0`` is set; :func:`nestedkv.scoring.nestedkv_score` then uses the tensor functions.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nestedkv.native import build

if TYPE_CHECKING:
    from nestedkv.scoring import Rotary

SOURCE = Path(__file__).with_name("scoring_cpu.c")

KERNEL_SCALES = ("global", "block", "window")
"""The scales of the kernel's output, in its order."""


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built once per process; ``None`` where it is disabled or cannot be built."""
    loaded = build(SOURCE)
    if loaded is not None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        loaded.nestedkv_anomalies_cpu.argtypes = (
            [pointer] * 3 + [size] * 5 + [ctypes.c_double] + [pointer] * 4 + [size] * 2 + [ctypes.c_int]
        )
        loaded.nestedkv_anomalies_cpu.restype = ctypes.c_int
    return loaded


def raw_anomalies_cpu(
    keys: torch.Tensor, bounds: list[int], window: int, eps: float, rotary: Rotary | None = None
) -> torch.Tensor:
    """Cosine anomalies of every key at the global, block and window scales (:data:`KERNEL_SCALES`).
    ``keys (H, N, d)`` on CPU, any float dtype -> ``(H, 3, N)`` float32.

    ``bounds``: the block edges (:func:`nestedkv.scoring.block_bounds`); ``window``: the window anchor's
    length; ``eps``: the clamp of key and anchor norms; ``rotary``: the keys are scored as they were before it
    (:func:`nestedkv.scoring.undo_rotary`), its ``(B or 1, N, r)`` angles read by ``H / B`` heads each (the
    keys laid out as ``(B, H / B)``). Requires :func:`kernel` to be available.
    """
    heads, n, d = keys.shape
    keys = keys.to(torch.float32).contiguous()
    edges = torch.tensor(bounds, dtype=torch.int64)
    out = keys.new_empty(heads, len(KERNEL_SCALES), n)
    if rotary is None:
        angles, rotated_dims, heads_per_row = (None,) * 4, 0, heads
    else:
        cos, sin = (angle.to(torch.float32).contiguous() for angle in (rotary.cos, rotary.sin))
        perm, sign = rotary.perm.to(torch.int64).contiguous(), rotary.sign.to(torch.float32).contiguous()
        angles, rotated_dims, heads_per_row = (cos, sin, perm, sign), cos.shape[-1], heads // cos.shape[0]
    status = kernel().nestedkv_anomalies_cpu(
        keys.data_ptr(), edges.data_ptr(), out.data_ptr(), heads, n, d, len(bounds), window, eps,
        *(None if angle is None else angle.data_ptr() for angle in angles), rotated_dims, heads_per_row,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("the CPU scoring kernel could not allocate its scratch memory")
    return out
