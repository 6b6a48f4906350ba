"""Speed and memory of KV cache compression: the library behind ``nestedkv bench``.

What is measured, for one model and a batch of contexts of ``N`` tokens (uniformly random token
ids: cost does not depend on what the text says), for no compression, NestedKV with ragged storage, NestedKV
with kvpress's masking, and KeyDiff, at every compression ratio ``r``:

* KV bytes held right after prefill, from :func:`nestedkv.cache.summarize_cache`;
* memory (:class:`PeakMemory`): on CPU each configuration runs once more in a fresh process started
  with ``multiprocessing``'s spawn method, so that its high-water mark is its own. In that
  process glibc is told to hand freed blocks of 64 KiB or more back to the OS at once
  (``mallopt``), the model is loaded, its weights paged in and a short generation run, freed heap
  is handed back (``malloc_trim``), the kernel's RSS high-water mark is reset
  (``/proc/self/clear_refs``), and the configuration prefills and decodes. Figures are bytes
  above the resident memory just before the prefill: KV cache, activations and the press's
  temporaries. On CUDA they come from the CUDA allocator (``max_memory_allocated`` after
  ``reset_peak_memory_stats``, above ``memory_allocated`` before the prefill), exact and
  resettable, so the configurations are measured one after another in the benchmark's process;
* prefill time (median of ``repeats`` runs after ``warmup`` runs), so the press's overhead over
  an uncompressed prefill; decoding speed (batch / median time of one greedy step). On CUDA,
  cuDNN's SDPA is turned off so that the uncompressed baseline runs FlashAttention (see
  :func:`run_bench`). The
  configurations take turns, round after round, rather than each running all its repeats in a
  row: on a shared machine whose load drifts, they are then slowed alike.

Separately, the scorers alone on the same keys (:func:`scoring_times`), and their scaling with
context length on keys of a larger model's shape (:func:`scaling`; Llama-3.2-1B by default, with
random weights for the real-prefill check of cache bytes); decoding from a batch of prompts of
different lengths, left-padded, through ``generate`` (:func:`batched_decoding`); and decoding from
long contexts on the scaling shape, whose caches each press builds from random keys standing for a
prefill too long to run here (:func:`long_decoding`). Times are wall-clock seconds from
``time.perf_counter`` (CUDA synchronised before each reading); bytes are bytes. What a run measures
(lengths, ratios, repeats) is a :class:`~nestedkv.bench.plan.BenchSettings`.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import itertools
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil
import torch
from kvpress import BasePress, KeyDiffPress
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.utils import logging as hf_logging

from nestedkv import scoring_cpu
from nestedkv.bench.methods import make_press
from nestedkv.bench.plan import LONG_DECODING_RATIO, RANDOM_SHAPES, BenchSettings
from nestedkv.bench.replay import Prefill, compress_replay, prefill
from nestedkv.cache import RaggedLayer, cpu_kernel, summarize_cache
from nestedkv.models import attention_modules
from nestedkv.press import NestedKVPress
from nestedkv.scoring import nestedkv_score
from nestedkv.settings import compute_n_kept
from nestedkv.streaming import BudgetedPress, cache_bytes

METHODS = ("none", "nestedkv", "nestedkv-masked", "keydiff")
"""Configurations compared, by their names in the benchmark's registry (:mod:`nestedkv.bench.methods`):
no compression, NestedKV (head-adaptive budget) held ragged (its default) or masked, and kvpress's
KeyDiff (uniform budget, dense cache)."""

VERIFY_RATIO = 0.9
"""Compression ratio of the real prefills that check the scaling table's cache bytes."""

WARMUP_TOKENS = 16
"""Tokens of the short uncompressed generation that warms a fresh process up before measuring."""


def random_config(shape: str) -> LlamaConfig:
    """The Llama config of a shape of :data:`~nestedkv.bench.plan.RANDOM_SHAPES` (built locally: no download)."""
    return LlamaConfig(**RANDOM_SHAPES[shape])


def random_model(
    config: LlamaConfig, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A randomly initialised Llama of ``config``'s shape (seed 0) with SDPA attention, in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model initialises in seconds on a GPU
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# --- prefill and decode ---------------------------------------------------------------------------


def random_input_ids(model: PreTrainedModel, length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """``(batch, length)`` token ids drawn uniformly from the model's vocabulary, on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.get_input_embeddings().num_embeddings, (batch, length), generator=generator)
    return ids.to(model.device)


def prefill_greedy(
    model: PreTrainedModel, input_ids: torch.Tensor, press: BasePress | None
) -> tuple[DynamicCache, torch.Tensor]:
    """:func:`~nestedkv.bench.replay.prefill` ``input_ids (B, N)`` under ``press`` (none: no compression),
    then the output head on the last position: returns the cache and the greedy next tokens ``(B, 1)``."""
    cache, hidden = prefill(model, input_ids, press)
    with torch.no_grad():
        return cache, model.get_output_embeddings()(hidden).argmax(dim=-1)


def decode_step(model: PreTrainedModel, cache: DynamicCache, token: torch.Tensor, position: int) -> torch.Tensor:
    """Feed ``token (B, 1)`` at ``position`` and return the greedy next tokens ``(B, 1)``."""
    with torch.no_grad():
        position_ids = torch.full_like(token, position)
        logits = model(input_ids=token, past_key_values=cache, position_ids=position_ids).logits
    return logits[:, -1:].argmax(dim=-1)


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes (CUDA synchronised before and after), and its result."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def interleaved_medians(
    calls: Mapping[Hashable, Callable[[], Any]], repeats: int, warmup: int, device: torch.device | str
) -> dict[Hashable, float]:
    """Median seconds of every call over ``repeats`` rounds, after ``warmup`` untimed rounds.

    Within a round the calls take turns, so that load drifting on a shared machine slows them all
    alike instead of whichever ran at the wrong moment. Results are dropped.
    """
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    for round_ in range(warmup + repeats):
        for key, fn in calls.items():
            seconds, _ = timed(fn, device)
            if round_ >= warmup:
                times[key].append(seconds)
    return {key: statistics.median(seconds) for key, seconds in times.items()}


# --- memory in a fresh process ----------------------------------------------------------------


@dataclass(frozen=True)
class PeakMemory:
    """Memory of one configuration, in bytes above what was resident just before its prefill.

    prefill_peak: high-water mark during the prefill. peak: high-water mark over prefill and
    decoding. retained_after_prefill: still resident once the prefill is over (cache and small
    change). CPU: process RSS; CUDA: bytes allocated by the CUDA caching allocator.
    """

    prefill_peak: int
    peak: int
    retained_after_prefill: int


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _release_freed_memory_at_once() -> None:
    """Have glibc give every allocation of 64 KiB or more its own mapping and trim its heap on every free.

    Freed tensors then leave the RSS at once, so the RSS high-water mark follows the memory really
    in use, the same from run to run (glibc's default adaptive thresholds keep some freed blocks
    resident, depending on the order of earlier frees). Other C libraries are left as they are.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's ``malloc_trim``, where there is one)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def check_peak_memory_supported(device: str) -> None:
    """CPU peak memory needs Linux's resettable RSS high-water mark; raise a clear ``ValueError`` without it."""
    if device == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        raise ValueError("peak memory on CPU needs Linux (/proc/self/clear_refs); turn it off (--no-peak-memory)")


class _MemoryProbe:
    """Reads memory above a baseline: RSS and its high-water mark on CPU, the allocator on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        _trim_heap()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
            self.baseline = _status_bytes("VmRSS")
        self.device = device

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _status_bytes("VmHWM") - self.baseline

    def current(self) -> int:
        _trim_heap()
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) - self.baseline
        return _status_bytes("VmRSS") - self.baseline


def _memory_of_one_configuration(
    model_dir: str, dtype: torch.dtype, attn_implementation: str, device: str, threads: int, method: str,
    ratio: float, length: int, batch: int, decode_tokens: int, seed: int,
) -> PeakMemory:
    """Runs in a fresh process: load the saved model, warm up, then measure one configuration."""
    _release_freed_memory_at_once()
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():  # page in weights that loading left memory-mapped
            tensor.sum()
    input_ids = random_input_ids(model, length, seed, batch)
    cache, token = prefill_greedy(model, input_ids[:, :WARMUP_TOKENS], None)
    decode_step(model, cache, token, WARMUP_TOKENS)
    del cache, token
    return _peak_memory(model, input_ids, method, ratio, decode_tokens)


def _peak_memory(
    model: PreTrainedModel, input_ids: torch.Tensor, method: str, ratio: float, decode_tokens: int
) -> PeakMemory:
    """Prefill ``input_ids`` under ``(method, ratio)`` and decode ``decode_tokens`` steps, reading memory."""
    length = input_ids.shape[1]
    press = make_press(method, ratio)
    probe = _MemoryProbe(model.device)
    cache, token = prefill_greedy(model, input_ids, press)
    prefill_peak = probe.peak()
    retained = probe.current()
    for step in range(decode_tokens):
        token = decode_step(model, cache, token, length + step)
    # The kernel batches its RSS counters per CPU (some hundred KiB), so a later reading of the
    # high-water mark can come out a little lower than an earlier one.
    return PeakMemory(prefill_peak, max(prefill_peak, probe.peak()), retained)


def measure_memory(
    model: PreTrainedModel, configurations: Sequence[tuple[str, float]], length: int, decode_tokens: int,
    seed: int = 0, batch: int = 1,
) -> list[PeakMemory]:
    """:class:`PeakMemory` of each ``(method, ratio)``: on CPU each measured in its own fresh spawned process.

    The model is saved once to a temporary directory for the processes to load. Every process
    prefills the same ``length`` random tokens (``seed``) and decodes ``decode_tokens`` greedily.
    On CUDA the allocator's counters are exact and resettable, so the configurations are measured
    one after the other in this process, each cache freed before the next.
    """
    device = str(model.device)
    check_peak_memory_supported(device)
    if model.device.type == "cuda":
        input_ids = random_input_ids(model, length, seed, batch)
        return [_peak_memory(model, input_ids, method, ratio, decode_tokens) for method, ratio in configurations]
    context = multiprocessing.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="nestedkv-bench-") as model_dir:
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(model_dir)
        finally:
            hf_logging.enable_progress_bar()
        for method, ratio in configurations:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                job = pool.submit(
                    _memory_of_one_configuration, model_dir, model.dtype, model.config._attn_implementation, device,
                    torch.get_num_threads(), method, ratio, length, batch, decode_tokens, seed,
                )
                results.append(job.result())
    return results


# --- the memory and time table ----------------------------------------------------------------


@dataclass(frozen=True)
class ConfigurationResult:
    """One row of the memory and time table (``ratio`` 0 for no compression).

    bytes_full / bytes_held: K+V bytes of the uncompressed context / held after prefill.
    kept_fraction: share of (layer, head, position) attention still reads; target_fraction:
    ``compute_n_kept(N, r) / N``, what the budget asks for. prefill_s: median seconds;
    decode_tokens_per_s: tokens generated per second over the batch (batch / median seconds of one
    greedy step). memory: ``None`` when not measured.
    """

    method: str
    ratio: float
    bytes_full: int
    bytes_held: int
    kept_fraction: float
    target_fraction: float
    prefill_s: float
    decode_tokens_per_s: float
    memory: PeakMemory | None = None


@dataclass
class _LiveCache:
    """A configuration's cache while it decodes, with the evicted positions kvpress's masking keeps
    on the attention modules (``masked_key_indices``, one entry per layer; ``None`` without masking)."""

    cache: DynamicCache
    token: torch.Tensor
    masks: list

    @classmethod
    def after_prefill(cls, cache: DynamicCache, token: torch.Tensor, modules: list[torch.nn.Module]) -> _LiveCache:
        """A cache just built, with the masks the press left on ``modules`` (the next press resets them)."""
        return cls(cache, token, [getattr(module, "masked_key_indices", None) for module in modules])


def measure_configurations(
    model: PreTrainedModel, input_ids: torch.Tensor, configs: Sequence[tuple[str, float]], settings: BenchSettings
) -> list[ConfigurationResult]:
    """Bytes held after prefill, prefill time and decoding speed of each ``(method, ratio)`` (memory apart).

    Prefills take turns: ``warmup + repeats`` rounds, each running every configuration once, so that
    load drifting on a shared machine hits them alike. The last round's caches are all kept and
    decoded, again in turns (one greedy step of each configuration per round); a masked
    configuration's ``masked_key_indices`` are put back on the modules before each of its steps.
    """
    length, device = input_ids.shape[1], model.device
    modules = attention_modules(model)
    prefill_times: dict[tuple[str, float], list[float]] = {config: [] for config in configs}
    live, summaries = {}, {}
    for round_ in range(settings.warmup + settings.repeats):
        for config in configs:
            seconds, (cache, token) = timed(partial(prefill_greedy, model, input_ids, make_press(*config)), device)
            if round_ >= settings.warmup:
                prefill_times[config].append(seconds)
            if round_ == settings.warmup + settings.repeats - 1:
                summaries[config] = summarize_cache(model, cache, length)
                live[config] = _LiveCache.after_prefill(cache, token, modules)
            del cache, token
    rates = decode_rates(model, live, length, settings)
    return [
        ConfigurationResult(
            method, ratio, summaries[method, ratio].bytes_full, summaries[method, ratio].bytes_held,
            summaries[method, ratio].kept_fraction, compute_n_kept(length, ratio) / length,
            statistics.median(prefill_times[method, ratio]), rates[method, ratio],
        )
        for method, ratio in configs
    ]


def decode_rates(
    model: PreTrainedModel, live: Mapping[Hashable, _LiveCache], length: int, settings: BenchSettings
) -> dict[Hashable, float]:
    """Greedy decoding speed from each cache of a context of ``length`` tokens, in tokens per second over
    the batch (batch / median seconds of one step, over ``settings.decode_tokens`` steps after
    ``settings.warmup``). The caches take turns, one step each; a masked configuration's
    ``masked_key_indices`` are put back on the modules before each of its steps."""
    modules = attention_modules(model)
    step_times: dict[Hashable, list[float]] = {config: [] for config in live}
    for step in range(settings.warmup + settings.decode_tokens):
        for config, state in live.items():
            for module, masked in zip(modules, state.masks, strict=True):
                module.masked_key_indices = masked
            one_step = partial(decode_step, model, state.cache, state.token, length + step)
            seconds, state.token = timed(one_step, model.device)
            if step >= settings.warmup:
                step_times[config].append(seconds)
    return {config: state.token.shape[0] / statistics.median(step_times[config]) for config, state in live.items()}


def configurations(ratios: Sequence[float]) -> list[tuple[str, float]]:
    """``(method, ratio)`` of every row: no compression once, then each press at each ratio."""
    return [("none", 0.0)] + [(method, ratio) for ratio in ratios for method in METHODS[1:]]


@dataclass(frozen=True)
class ScoringTimes:
    """Seconds to score one prefill's cache, all layers together (medians): the shipped press's score
    (``NestedKVPress().score``: keys turned back to before RoPE, then :func:`~nestedkv.scoring.nestedkv_score`
    with the value norms), the paper's (the cached keys only: what the shipped switches cost) and KeyDiff's
    (``KeyDiffPress.score``) on the same keys; where asked, the shipped score compiled
    (``NestedKVPress(compile_score=True)``), and its first call, compilation included (``compile_s``)."""

    nestedkv_s: float
    keydiff_s: float
    paper_s: float
    compiled_s: float | None = None
    compile_s: float | None = None


def scoring_times(
    modules: Sequence[torch.nn.Module], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
    angles: tuple[torch.Tensor, torch.Tensor] | None, repeats: int, warmup: int, compiled: bool = False,
) -> ScoringTimes:
    """Time the three scorers (four, ``compiled``: the shipped one compiled too) over ``keys`` and ``values`` (one
    ``(B, H, N, d)`` tensor each per layer, of the attention ``modules``), taking turns. ``angles``: the RoPE
    ``(cos, sin)`` of the N positions, as a layer's hook is handed them (``None``: a model without; the shipped
    press then scores the keys as cached)."""
    keydiff = KeyDiffPress()
    hook_inputs = {"position_embeddings": angles}

    def nestedkv(press: NestedKVPress) -> Callable[[], None]:
        def score() -> None:
            for module, layer_keys, layer_values in zip(modules, keys, values, strict=True):
                press.score(module, None, layer_keys, layer_values, None, hook_inputs)

        return score

    def keydiff_score() -> None:
        for layer_keys in keys:
            keydiff.score(None, None, layer_keys, None, None, None)

    scorers = {
        "nestedkv": nestedkv(NestedKVPress()), "paper": nestedkv(NestedKVPress.paper()), "keydiff": keydiff_score,
    }
    compile_s = None
    if compiled:
        scorers["compiled"] = nestedkv(NestedKVPress(compile_score=True))
        compile_s, _ = timed(scorers["compiled"], keys[0].device)  # compiles (or finds the graph already made)
    medians = interleaved_medians(scorers, repeats, warmup, keys[0].device)
    return ScoringTimes(medians["nestedkv"], medians["keydiff"], medians["paper"], medians.get("compiled"), compile_s)


# --- scaling with context length ------------------------------------------------------------


@dataclass(frozen=True)
class ScalingRow:
    """Cost at one context length on a model of the scaling shape.

    nestedkv_s / keydiff_s: scoring all layers (median seconds for one layer's keys, times the
    number of layers). bytes_full: uncompressed K+V; bytes_held: ragged NestedKV cache at each
    ratio, computed (packed K+V plus int64 offsets). verified_bytes_held: measured by
    ``summarize_cache`` after a real prefill at :data:`VERIFY_RATIO` (``None`` above
    ``verify_max_length``); verify_prefill_s: that prefill's seconds (one run).
    """

    length: int
    nestedkv_s: float
    keydiff_s: float
    bytes_full: int
    bytes_held: dict[str, int]
    verified_bytes_held: int | None = None
    verify_prefill_s: float | None = None


def ragged_cache_bytes(config: LlamaConfig, length: int, ratio: float, itemsize: int) -> int:
    """Bytes a ragged NestedKV cache holds after prefilling ``length`` tokens at ``ratio`` (batch 1):
    every layer packs ``kv_heads * compute_n_kept(length, ratio)`` keys and values, plus
    ``kv_heads + 1`` int64 offsets."""
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    if ratio == 0:  # nothing to evict: the press leaves the dense cache in place
        return 2 * layers * kv_heads * length * config.head_dim * itemsize
    packed = 2 * kv_heads * compute_n_kept(length, ratio) * config.head_dim * itemsize
    return layers * (packed + (kv_heads + 1) * torch.int64.itemsize)


def scaling(
    config: LlamaConfig, lengths: Sequence[int], ratios: Sequence[float], *, repeats: int, warmup: int,
    verify_max_length: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> list[ScalingRow]:
    """Scoring time and cache bytes against context length for a model of ``config``'s shape.

    Scorers are timed on random keys (and values) ``(1, kv_heads, N, head_dim)`` of ``dtype``, all lengths and
    both scorers taking turns in each round (:func:`interleaved_medians`). For lengths up to
    ``verify_max_length`` a random model of that shape then prefills N random tokens with NestedKV
    (ragged) at :data:`VERIFY_RATIO`, and the bytes held are measured.
    """
    itemsize, layers, keydiff = dtype.itemsize, config.num_hidden_layers, KeyDiffPress()
    calls = {}
    for length in lengths:
        generator = torch.Generator().manual_seed(seed)
        keys, values = torch.randn(2, 1, config.num_key_value_heads, length, config.head_dim, generator=generator)
        keys, values = keys.to(device=device, dtype=dtype), values.to(device=device, dtype=dtype)
        calls[length, "nestedkv"] = partial(nestedkv_score, keys, None, values)
        calls[length, "keydiff"] = partial(keydiff.score, None, None, keys, None, None, None)
    medians = interleaved_medians(calls, repeats, warmup, device)
    del calls
    verify = [n for n in lengths if n <= verify_max_length]
    model = random_model(config, dtype, device) if verify else None
    rows = []
    for length in lengths:
        verified = prefill_s = None
        if length in verify:
            input_ids = random_input_ids(model, length, seed)
            prefill_s, (cache, _) = timed(partial(prefill, model, input_ids, NestedKVPress(VERIFY_RATIO)), device)
            verified = summarize_cache(model, cache, length).bytes_held
            del cache
        rows.append(ScalingRow(
            length, layers * medians[length, "nestedkv"], layers * medians[length, "keydiff"],
            2 * layers * config.num_key_value_heads * length * config.head_dim * itemsize,
            {str(r): ragged_cache_bytes(config, length, r, itemsize) for r in sorted({*ratios, VERIFY_RATIO})},
            verified, prefill_s,
        ))
    return rows


def fitted_exponent(lengths: Sequence[int], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) against log(length): 1 is linear, 2 quadratic."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)


# --- decoding from long contexts -----------------------------------------------------------------


@dataclass(frozen=True)
class LongDecodingRow:
    """Decoding speed from a context of ``length`` tokens on a model of the scaling shape.

    bytes_held: K+V bytes the cache holds (batch row 0). padding: for ragged storage, the block the
    CPU's gathered attention reads, as a multiple of the kept keys (longest head x heads / kept,
    mean over layers; ``None`` for dense caches, which have none).
    """

    length: int
    method: str
    ratio: float
    bytes_held: int
    padding: float | None
    decode_tokens_per_s: float


def synthetic_prefill(
    config: LlamaConfig, length: int, dtype: torch.dtype, device: str | torch.device, seed: int = 0
) -> Prefill:
    """Random keys and values standing for the prefill of ``length`` tokens by a model of ``config``'s
    shape, with what each layer's press hook receives: a prefill of 32k tokens takes hours on a CPU,
    while decoding from its cache costs what its lengths cost, whatever the keys hold. The hidden
    states are zeros (the presses benchmarked here read only their shape); the RoPE angles are the
    shape's own, so that the shipped press turns the keys back as it would."""
    generator = torch.Generator().manual_seed(seed)
    shape = (1, config.num_key_value_heads, length, config.head_dim)
    layers = config.num_hidden_layers
    keys = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(layers)]
    values = [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(layers)]
    positions = torch.arange(length, device=device)
    hook_kwargs = {
        "hidden_states": torch.zeros(1, 1, config.hidden_size, device=device, dtype=dtype).expand(1, length, -1),
        "cache_position": positions, "attention_mask": None,
        "position_embeddings": LlamaRotaryEmbedding(config, device=device)(keys[0], positions[None]),
    }
    return Prefill(length, keys, values, [hook_kwargs] * layers, [None] * layers)


def gathered_padding(cache: DynamicCache) -> float | None:
    """Mean over a cache's ragged layers of (longest stream x streams / kept keys); ``None`` if none is ragged."""
    factors = [
        layer.longest * layer.batch * layer.heads / max(layer.context_keys.shape[0], 1)
        for layer in cache.layers if isinstance(layer, RaggedLayer)
    ]
    return statistics.fmean(factors) if factors else None


def long_decoding(
    config: LlamaConfig, lengths: Sequence[int], ratio: float, settings: BenchSettings, *,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> list[LongDecodingRow]:
    """Decoding speed of every configuration of :data:`METHODS` at ``ratio`` from each context length.

    A randomly initialised model of ``config``'s shape decodes greedily from caches built by replaying
    each press on :func:`synthetic_prefill` (:func:`~nestedkv.bench.replay.compress_replay`, the
    press's own hook); the caches of one length take turns (:func:`decode_rates`).
    """
    model = random_model(config, dtype, device)
    modules = attention_modules(model)
    rows = []
    for length in lengths:
        prefill = synthetic_prefill(config, length, dtype, device, settings.seed)
        token = random_input_ids(model, 1, settings.seed)
        live, summaries = {}, {}
        for method in METHODS:
            key = (method, 0.0 if method == "none" else ratio)
            cache = compress_replay(model, prefill, make_press(*key))
            summaries[key] = (summarize_cache(model, cache, length).bytes_held, gathered_padding(cache))
            live[key] = _LiveCache.after_prefill(cache, token, modules)
        del prefill
        rates = decode_rates(model, live, length, settings)
        rows += [LongDecodingRow(length, method, r, *summaries[method, r], rates[method, r]) for method, r in live]
        del live
        gc.collect()
    return rows


# --- a batch of prompts of different lengths --------------------------------------------------------


@dataclass(frozen=True)
class BatchedRow:
    """Decoding speed of ``rows`` prompts of different lengths generated together.

    lengths: real tokens of each row (left-padded to the longest). bytes_held: K+V bytes the cache
    holds for the whole batch after the prefill. decode_tokens_per_s: tokens generated per second over
    the batch (rows / median seconds between two generated tokens).
    """

    method: str
    ratio: float
    lengths: tuple[int, ...]
    bytes_held: int
    decode_tokens_per_s: float


class _TokenClock(BaseStreamer):
    """Times ``generate``: it calls :meth:`put` with the prompt, then once with each step's tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:  # generate hands over tokens already on the CPU: synchronised
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


BUDGETED = "nestedkv-budgeted"
"""The budgeted cache's name in the batched-decoding table."""


def batched_lengths(length: int, rows: int) -> tuple[int, ...]:
    """Real lengths of ``rows`` prompts spread evenly from ``length`` down towards half of it."""
    return tuple(length - i * length // (2 * rows) for i in range(rows))


def batched_decoding(
    model: PreTrainedModel, rows: int, ratio: float, settings: BenchSettings, progress: Callable[[str], None],
) -> list[BatchedRow]:
    """Generated tokens per second from a batch of ``rows`` random prompts of different lengths, left-padded,
    uncompressed, under NestedKV (ragged and masked storage) at ``ratio``, and under the budgeted cache
    keeping ``1 - ratio`` of each row's tokens (:class:`~nestedkv.streaming.BudgetedPress`, which
    re-compresses every ``interval`` generated tokens), through ``generate``.

    KeyDiff is left out: kvpress's dense compression of a padded batch would keep padding positions.
    Each configuration generates ``warmup + decode_tokens`` tokens per row, ``repeats`` times, taking
    turns; the step times after the ``warmup`` first tokens of every run are pooled. The bytes held are
    the cache's after a prefill alone (one more ``generate`` of one token, in the first round).
    """
    lengths = batched_lengths(settings.length, rows)
    input_ids = random_input_ids(model, settings.length, settings.seed, rows)
    attention_mask = torch.ones_like(input_ids)
    for row, real in enumerate(lengths):
        attention_mask[row, : settings.length - real] = 0
    new_tokens = settings.warmup + settings.decode_tokens
    configs = [("none", 0.0), ("nestedkv", ratio), ("nestedkv-masked", ratio), (BUDGETED, ratio)]
    steps: dict[tuple[str, float], list[float]] = {config: [] for config in configs}
    held = {}

    def generate(config: tuple[str, float], tokens: int, streamer: BaseStreamer | None = None) -> DynamicCache:
        press = BudgetedPress(compression_ratio=config[1]) if config[0] == BUDGETED else make_press(*config)
        with torch.no_grad(), press(model) if press is not None else nullcontext():
            return model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=tokens, min_new_tokens=tokens,
                do_sample=False, streamer=streamer, return_dict_in_generate=True, pad_token_id=0,
            ).past_key_values

    for round_ in range(settings.repeats):
        for config in configs:
            progress(f"batched decoding: {config[0]}, round {round_ + 1} of {settings.repeats}")
            if round_ == 0:  # the same bytes every round
                held[config] = cache_bytes(generate(config, 1))
            clock = _TokenClock()
            generate(config, new_tokens, clock)
            # times[1] is the first token, after the prefill; every later one is a decoding step
            steps[config] += [b - a for a, b in itertools.pairwise(clock.times[1 + settings.warmup :])]
    return [
        BatchedRow(method, r, lengths, held[method, r], rows / statistics.median(steps[method, r]))
        for method, r in configs
    ]


# --- the whole benchmark ----------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "not installed"


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU (and GPU) name, cores, memory, torch threads, library versions and the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "transformers", "kvpress", "nestedkv")},
        "device": str(device),
        # which path float32 and bfloat16 ragged attention takes on the CPU (nestedkv.cache.attention)
        "cpu_ragged_attention": "C kernel" if cpu_kernel.kernel() is not None else "gathered",
        # which path the score's steps 1 to 3 take on the CPU (nestedkv.scoring.nestedkv_score)
        "cpu_scoring": "C kernel" if scoring_cpu.kernel() is not None else "tensor functions",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_bench(
    model: PreTrainedModel, settings: BenchSettings, *, model_name: str, scaling_config: LlamaConfig | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run the whole benchmark on ``model`` (on its device) and return a JSON-ready report.

    scaling_config: shape of the scaling model (default: :func:`random_config` of ``llama-3.2-1b``). progress
    receives one line before each stage.
    """
    device = model.device
    if device.type == "cuda":
        # torch 2.11's cuDNN attention, which SDPA prefers on Hopper, rebuilds its plan for every new key
        # length: ~2.5 ms of CPU per layer and decoding step (measured, docs/benchmarks_cuda.md). The
        # uncompressed baseline would be slowed by that, not by its cache: use FlashAttention instead.
        torch.backends.cuda.enable_cudnn_sdp(False)
    length = settings.length
    if length + settings.warmup + settings.decode_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"--length {length} plus {settings.warmup + settings.decode_tokens} decoded tokens exceeds the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    if settings.peak_memory:
        check_peak_memory_supported(device.type)
    report: dict[str, Any] = {"machine": machine_info(device), "settings": asdict(settings)}
    report["model"] = {
        "name": model_name, "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
        "kv_heads": model.config.num_key_value_heads, "head_dim": model.config.head_dim,
    }
    input_ids = random_input_ids(model, length, settings.seed, settings.batch)
    configs = configurations(settings.ratios)
    progress(f"prefill and decode: {len(configs)} configurations taking turns")
    rows = measure_configurations(model, input_ids, configs, settings)
    progress("scoring time on the uncompressed keys")
    cache, _ = prefill(model, input_ids)
    keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    rotary = getattr(model.model, "rotary_emb", None)
    angles = None if rotary is None else rotary(keys[0], torch.arange(length, device=device)[None])
    scoring = scoring_times(
        attention_modules(model), keys, values, angles, settings.repeats, settings.warmup, settings.compiled_score
    )
    report["scoring"] = asdict(scoring)
    del keys, values, cache
    if settings.peak_memory:
        progress(f"memory: {len(rows)} configurations" + (" in fresh processes" if device.type == "cpu" else ""))
        memories = measure_memory(model, configs, length, settings.decode_tokens, settings.seed, settings.batch)
        rows = [replace(row, memory=memory) for row, memory in zip(rows, memories, strict=True)]
    report["configurations"] = [asdict(row) for row in rows]
    scaling_config = scaling_config or random_config("llama-3.2-1b")
    scaling_dtype = torch.bfloat16
    progress(f"scaling: {', '.join(map(str, settings.scaling_lengths))} tokens")
    scaling_rows = scaling(
        scaling_config, settings.scaling_lengths, settings.ratios, repeats=settings.repeats, warmup=settings.warmup,
        verify_max_length=settings.verify_max_length, device=device, dtype=scaling_dtype, seed=settings.seed,
    )
    lengths = [row.length for row in scaling_rows]
    report["scaling"] = {
        "shape": {key: getattr(scaling_config, key) for key in
                  ("num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size", "num_attention_heads")},
        "dtype": str(scaling_dtype).removeprefix("torch."),
        "verify_ratio": VERIFY_RATIO,
        "rows": [asdict(row) for row in scaling_rows],
        "nestedkv_exponent": fitted_exponent(lengths, [row.nestedkv_s for row in scaling_rows]),
        "keydiff_exponent": fitted_exponent(lengths, [row.keydiff_s for row in scaling_rows]),
    }
    if settings.batched_rows:
        rows = batched_decoding(model, settings.batched_rows, LONG_DECODING_RATIO, settings, progress)
        report["batched_decoding"] = [asdict(row) for row in rows]
    if settings.decode_lengths:
        progress(f"decoding from long contexts: {', '.join(map(str, settings.decode_lengths))} tokens")
        long_rows = long_decoding(
            scaling_config, settings.decode_lengths, LONG_DECODING_RATIO, settings, device=device, dtype=model.dtype
        )
        report["long_decoding"] = {
            "shape": report["scaling"]["shape"], "dtype": str(model.dtype).removeprefix("torch."),
            "rows": [asdict(row) for row in long_rows],
        }
    return report


# --- Markdown -----------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header line, the memory and time table, scoring, scaling."""
    machine, model, settings = report["machine"], report["model"], report["settings"]
    hardware = machine.get("gpu") or (
        f"{machine['cpu']}, {machine['torch_threads']} torch thread(s), "
        f"ragged attention: {machine.get('cpu_ragged_attention', 'gathered')}, "
        f"scoring: {machine.get('cpu_scoring', 'tensor functions')}"
    )
    length = settings["length"]
    lines = [
        f"{model['name']} ({model['parameters'] / 1e6:.1f} M parameters, {model['dtype']}) on {machine['device']} "
        f"({hardware}); context {length} random tokens x batch {settings.get('batch', 1)}; {machine['date']}",
        "",
        "| method | r | KV held (MiB) | held / full | target (1 - r, rounded) | peak prefill (MiB) "
        "| peak prefill+decode (MiB) | retained after prefill (MiB) | prefill (s) | vs no compression "
        "| decode (tok/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["configurations"]
    baseline = next(row for row in rows if row["method"] == "none")
    for row in rows:
        memory = row["memory"] or {}
        peaks = [_mib(memory[key]) if memory else "-" for key in ("prefill_peak", "peak", "retained_after_prefill")]
        overhead = "-" if row is baseline else f"{row['prefill_s'] / baseline['prefill_s'] - 1:+.1%}"
        lines.append(
            f"| {row['method']} | {row['ratio']:g} | {_mib(row['bytes_held'])} "
            f"| {row['bytes_held'] / row['bytes_full']:.4f} "
            f"| {row['target_fraction']:.4f} | {' | '.join(peaks)} | {row['prefill_s']:.3f} | {overhead} "
            f"| {row['decode_tokens_per_s']:.1f} |"
        )
    scoring = report["scoring"]
    plain = baseline["prefill_s"]
    lines += [
        "",
        f"Scoring the {length}-token prefill's keys ({model['layers']} layers x {model['kv_heads']} KV heads x "
        f"{model['head_dim']} dims), median:",
        "",
        "| scorer | time (ms) | share of an uncompressed prefill | vs KeyDiff |",
        "|---|---|---|---|",
        f"| NestedKV | {scoring['nestedkv_s'] * 1e3:.2f} | {scoring['nestedkv_s'] / plain:.1%} "
        f"| {scoring['nestedkv_s'] / scoring['keydiff_s']:.1f}x |",
        *(
            [f"| NestedKV, paper's settings | {scoring['paper_s'] * 1e3:.2f} | {scoring['paper_s'] / plain:.1%} "
             f"| {scoring['paper_s'] / scoring['keydiff_s']:.1f}x |"]
            if "paper_s" in scoring else []  # reports written before the shipped default changed
        ),
        *(
            [f"| NestedKV, compiled score (first call {scoring['compile_s']:.1f} s) "
             f"| {scoring['compiled_s'] * 1e3:.2f} | {scoring['compiled_s'] / plain:.1%} "
             f"| {scoring['compiled_s'] / scoring['keydiff_s']:.1f}x |"]
            if scoring.get("compiled_s") is not None else []
        ),
        f"| KeyDiff | {scoring['keydiff_s'] * 1e3:.2f} | {scoring['keydiff_s'] / plain:.1%} | 1.0x |",
    ]
    scale = report["scaling"]
    shape = scale["shape"]
    ratios = list(scale["rows"][0]["bytes_held"])
    lines += [
        "",
        f"Scaling: {shape['num_hidden_layers']} layers x {shape['num_key_value_heads']} KV heads x {shape['head_dim']} "
        f"dims, {scale['dtype']} keys; scoring time = one layer's median x {shape['num_hidden_layers']}; ragged "
        f"bytes computed, and measured on a real prefill (random weights, r={scale['verify_ratio']}) where shown:",
        "",
        "| N | NestedKV (ms) | us / token | local exponent | KeyDiff (ms) | KV full (MiB) | "
        + " | ".join(f"held r={r} (MiB)" for r in ratios) + " | measured held (MiB) | real prefill (s) |",
        "|---" * (8 + len(ratios)) + "|",
    ]
    previous = None
    for row in scale["rows"]:
        local = "-" if previous is None else (
            f"{math.log(row['nestedkv_s'] / previous['nestedkv_s']) / math.log(row['length'] / previous['length']):.2f}"
        )
        verified = "-" if row["verified_bytes_held"] is None else _mib(row["verified_bytes_held"])
        prefill_s = "-" if row["verify_prefill_s"] is None else f"{row['verify_prefill_s']:.2f}"
        lines.append(
            f"| {row['length']} | {row['nestedkv_s'] * 1e3:.1f} | {row['nestedkv_s'] / row['length'] * 1e6:.2f} "
            f"| {local} | {row['keydiff_s'] * 1e3:.1f} | {_mib(row['bytes_full'])} | "
            + " | ".join(_mib(row["bytes_held"][r]) for r in ratios) + f" | {verified} | {prefill_s} |"
        )
        previous = row
    lines += [
        "",
        f"Fitted exponent of scoring time against N: NestedKV {scale['nestedkv_exponent']:.2f}, "
        f"KeyDiff {scale['keydiff_exponent']:.2f} (1 = linear).",
    ]
    if "batched_decoding" in report:
        lines += _batched_markdown(report["batched_decoding"])
    if "long_decoding" in report:
        lines += _long_decoding_markdown(report["long_decoding"])
    return "\n".join(lines)


def _batched_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lengths = rows[0]["lengths"]
    none = next(row for row in rows if row["method"] == "none")
    lines = [
        "",
        f"A batch of {len(lengths)} prompts of different lengths ({', '.join(map(str, lengths))} tokens, left-padded) "
        "generated together by `generate`:",
        "",
        "| method | r | KV held, whole batch (MiB) | decode (tok/s, whole batch) | vs none |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        rate = row["decode_tokens_per_s"]
        lines.append(
            f"| {row['method']} | {row['ratio']:g} | {_mib(row['bytes_held'])} | {rate:.1f} "
            f"| {rate / none['decode_tokens_per_s']:.2f}x |"
        )
    return lines


def _long_decoding_markdown(long: dict[str, Any]) -> list[str]:
    shape = long["shape"]
    lines = [
        "",
        f"Decoding from long contexts: {shape['num_hidden_layers']} layers x {shape['num_key_value_heads']} KV heads x "
        f"{shape['head_dim']} dims, random weights, {long['dtype']}; each cache built by the press's own hook from "
        "random keys and values standing for the prefill (decode time depends on the lengths kept, not on the "
        "keys); padding = what the gathered CPU attention reads per kept key (the C kernel reads the kept keys only):",
        "",
        "| N | method | r | KV held (MiB) | padding | decode (tok/s) | vs none | vs keydiff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(row["length"], row["method"]): row for row in long["rows"]}
    for row in long["rows"]:
        none, keydiff = by_key[row["length"], "none"], by_key[row["length"], "keydiff"]
        padding = "-" if row["padding"] is None else f"{row['padding']:.2f}"
        rate = row["decode_tokens_per_s"]
        lines.append(
            f"| {row['length']} | {row['method']} | {row['ratio']:g} | {_mib(row['bytes_held'])} | {padding} "
            f"| {rate:.2f} | {rate / none['decode_tokens_per_s']:.2f}x | {rate / keydiff['decode_tokens_per_s']:.2f}x |"
        )
    return lines
