"""Time one ragged attention call of many new tokens: the CPU kernel against the gathered path.

Sets where ``nestedkv.cache.attention.CPU_KERNEL_TOKENS`` should stand. A ragged layer of the default
model's shape (3 KV heads, 9 query heads, d = 64) keeps half of N random keys per head, then takes
q new tokens; both paths run on it (median of 5 calls each) and must agree. Prints one line per
(batch, N, q) with both times and their ratio; ``--dtype bfloat16`` stores the cache in bfloat16 and
``--decoding`` times decoding steps (q = 1) at 4k and 32k keys instead:

    PYTHONPATH=src .venv/bin/python scripts/cpu_kernel_tokens.py [--dtype bfloat16] [--decoding]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from nestedkv.cache import RaggedLayer, attention

HEADS, GROUP, DIM = 3, 3, 64
CASES = [(1, 4096, q) for q in (128, 256, 512, 1024)] + [(8, 2048, q) for q in (128, 256, 512, 1024)]
DECODING_CASES = [(1, 4096, 1), (8, 4096, 1), (1, 32768, 1), (8, 32768, 1)]


def ragged_layer(batch: int, n: int, new_tokens: int, generator: torch.Generator, dtype: torch.dtype) -> RaggedLayer:
    """Half of ``n`` random keys kept per head, then ``new_tokens`` more in the tail."""
    keys, values = torch.randn(2, batch, HEADS, n, DIM, generator=generator).to(dtype)
    layer = RaggedLayer.from_keep(keys, values, torch.rand(batch, HEADS, n, generator=generator) < 0.5)
    layer.update(*torch.randn(2, batch, HEADS, new_tokens, DIM, generator=generator).to(dtype))
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--decoding", action="store_true", help="decoding steps at 4k and 32k keys")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype} cache")
    for batch, n, new_tokens in DECODING_CASES if args.decoding else CASES:
        layer = ragged_layer(batch, n, new_tokens, generator, dtype)
        query = torch.randn(batch, HEADS * GROUP, new_tokens, DIM, generator=generator).to(dtype)
        kernel_s, kernel_out = median_call(query, layer, new_tokens)
        gathered_s, gathered_out = median_call(query, layer, 0)
        # both compute in float32; each bfloat16 output is rounded once, so the two may differ by one step
        # (a bfloat16 ulp: 2^-8 to 2^-7 of the value)
        tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(kernel_out, gathered_out, atol=1e-5, rtol=tolerance)
        print(f"batch {batch}, N {n}, {new_tokens} new tokens: kernel {kernel_s * 1e3:.1f} ms, "
              f"gathered {gathered_s * 1e3:.1f} ms, gathered / kernel {gathered_s / kernel_s:.2f}x", flush=True)


if __name__ == "__main__":
    main()
