"""Time one ragged attention call of many new tokens: the CPU kernel against the gathered path.

Sets where ``nestedkv.cache.attention.CPU_KERNEL_TOKENS`` should stand. A ragged layer of the default
model's shape (3 KV heads, 9 query heads, d = 64) keeps half of N random keys per head, then takes
q new tokens; both paths run on it (median of 5 calls each) and must agree. Prints one line per
(batch, N, q) with both times and their ratio:

    PYTHONPATH=src .venv/bin/python scripts/cpu_kernel_tokens.py
"""

from __future__ import annotations

import statistics
import time
from unittest import mock

import torch

from nestedkv.cache import RaggedLayer, attention

HEADS, GROUP, DIM = 3, 3, 64
CASES = [(1, 4096, q) for q in (128, 256, 512, 1024)] + [(8, 2048, q) for q in (128, 256, 512, 1024)]


def ragged_layer(batch: int, n: int, new_tokens: int, generator: torch.Generator) -> RaggedLayer:
    """Half of ``n`` random keys kept per head, then ``new_tokens`` more in the tail."""
    keys, values = torch.randn(2, batch, HEADS, n, DIM, generator=generator)
    layer = RaggedLayer.from_keep(keys, values, torch.rand(batch, HEADS, n, generator=generator) < 0.5)
    layer.update(*torch.randn(2, batch, HEADS, new_tokens, DIM, generator=generator))
    return layer


def median_call(query: torch.Tensor, layer: RaggedLayer, kernel_tokens: int) -> tuple[float, torch.Tensor]:
    """Median seconds of 5 calls with the kernel serving up to ``kernel_tokens`` new tokens, and the output."""
    with mock.patch.object(attention, "CPU_KERNEL_TOKENS", kernel_tokens):
        output = attention.ragged_attention(query, layer, DIM**-0.5)
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            attention.ragged_attention(query, layer, DIM**-0.5)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), output


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for batch, n, new_tokens in CASES:
        layer = ragged_layer(batch, n, new_tokens, generator)
        query = torch.randn(batch, HEADS * GROUP, new_tokens, DIM, generator=generator)
        kernel_s, kernel_out = median_call(query, layer, new_tokens)
        gathered_s, gathered_out = median_call(query, layer, 0)
        torch.testing.assert_close(kernel_out, gathered_out, atol=1e-5, rtol=1e-5)
        print(f"batch {batch}, N {n}, {new_tokens} new tokens: kernel {kernel_s * 1e3:.1f} ms, "
              f"gathered {gathered_s * 1e3:.1f} ms, gathered / kernel {gathered_s / kernel_s:.2f}x", flush=True)


if __name__ == "__main__":
    main()
