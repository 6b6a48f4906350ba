"""The speed and memory benchmark (``nestedkv.bench.speed``, ``nestedkv bench``) runs and reports the right bytes.

Nothing here asserts a timing: speed goes in the benchmark, not in the tests. Everything runs on a
tiny random Llama (2 layers, 2 KV heads of 16 dims).
"""

import json
import math

import pytest
import torch

from nestedkv import cli
from nestedkv.bench import speed
from nestedkv.bench.plan import BenchSettings
from nestedkv.bench.speed import (
    METHODS,
    fitted_exponent,
    format_markdown,
    ragged_cache_bytes,
    random_config,
    random_model,
    run_bench,
)
from nestedkv.settings import compute_n_kept

OFFSETS_BYTES = 2 * (2 + 1) * 8  # 2 layers x (2 KV heads + 1) int64 offsets


@pytest.fixture(scope="module")
def tiny_report():
    config = random_config("tiny")
    settings = BenchSettings(
        length=512, ratios=(0.5, 0.9), scaling_lengths=(256, 512, 1024), decode_lengths=(512, 2048), batched_rows=2,
        decode_tokens=2, repeats=1, warmup=0, verify_max_length=512, peak_memory=False, compiled_score=True,
    )
    return run_bench(random_model(config, torch.float32), settings, model_name="tiny", scaling_config=config)


def test_bytes_held_after_prefill(tiny_report):
    rows = {(row["method"], row["ratio"]): row for row in tiny_report["configurations"]}
    assert [method for method, _ in rows] == ["none"] + [m for _ in (0.5, 0.9) for m in METHODS[1:]]
    full = 2 * 2 * 2 * 512 * 16 * 4  # K+V x layers x KV heads x N x head_dim x float32
    assert all(row["bytes_full"] == full for row in rows.values())
    assert rows["none", 0.0]["bytes_held"] == full
    for ratio in (0.5, 0.9):
        kept = compute_n_kept(512, ratio) / 512
        ragged, masked, keydiff = (rows[method, ratio] for method in METHODS[1:])
        # ragged: (1 - r) of the full cache, plus only the offsets bookkeeping
        assert ragged["bytes_held"] == full * kept + OFFSETS_BYTES
        assert ragged["kept_fraction"] == pytest.approx(kept)
        # masked: every byte is still held, though attention reads only the kept positions
        assert masked["bytes_held"] == full and masked["kept_fraction"] == pytest.approx(kept)
        assert keydiff["bytes_held"] == full * kept
    assert rows["nestedkv", 0.9]["bytes_held"] / full == pytest.approx(0.1, abs=0.002)
    for row in rows.values():
        assert row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0 and row["memory"] is None


def test_scoring_and_scaling_report(tiny_report):
    scoring = tiny_report["scoring"]
    assert scoring["nestedkv_s"] > 0 and scoring["keydiff_s"] > 0 and scoring["compiled_s"] > 0
    assert scoring["compile_s"] > 0  # the first call, timed apart from the medians
    scaling = tiny_report["scaling"]
    config = random_config("tiny")
    for row in scaling["rows"]:
        assert row["bytes_full"] == 2 * 2 * 2 * row["length"] * 16 * 2  # bfloat16 keys
        assert row["bytes_held"]["0.9"] == ragged_cache_bytes(config, row["length"], 0.9, 2)
        if row["length"] <= 512:  # a real prefill measured the same bytes as computed
            assert row["verified_bytes_held"] == row["bytes_held"]["0.9"]
        else:
            assert row["verified_bytes_held"] is None
    assert math.isfinite(scaling["nestedkv_exponent"]) and math.isfinite(scaling["keydiff_exponent"])
    text = format_markdown(tiny_report)
    assert "| nestedkv | 0.9 |" in text and "Fitted exponent" in text
    assert "| NestedKV, compiled score (first call" in text
    json.dumps(tiny_report)


def test_long_decoding_report(tiny_report):
    long = tiny_report["long_decoding"]
    assert [(row["length"], row["method"]) for row in long["rows"]] == [(n, m) for n in (512, 2048) for m in METHODS]
    for row in long["rows"]:
        full = 2 * 2 * 2 * row["length"] * 16 * 4  # K+V x layers x KV heads x N x head_dim x float32
        kept = compute_n_kept(row["length"], 0.9) / row["length"]
        expected = {
            "none": full, "nestedkv": full * kept + OFFSETS_BYTES, "nestedkv-masked": full, "keydiff": full * kept,
        }
        assert row["bytes_held"] == expected[row["method"]]
        assert row["ratio"] == (0.0 if row["method"] == "none" else 0.9)
        assert row["decode_tokens_per_s"] > 0
        # only the ragged cache is gathered into a padded block: at least its kept keys, at most every head full
        assert (row["padding"] is None) == (row["method"] != "nestedkv")
        if row["padding"] is not None:
            assert 1.0 <= row["padding"] <= 1 / kept
    assert "| 2048 | nestedkv | 0.9 |" in format_markdown(tiny_report)


def test_batched_decoding_report(tiny_report):
    rows = {row["method"]: row for row in tiny_report["batched_decoding"]}
    assert list(rows) == ["none", "nestedkv", "nestedkv-masked", "nestedkv-budgeted"]
    assert all(tuple(row["lengths"]) == (512, 384) for row in rows.values())
    full_row = 2 * 2 * 2 * 512 * 16 * 4  # K+V x layers x KV heads x N x head_dim x float32, one padded row
    assert rows["none"]["bytes_held"] == rows["nestedkv-masked"]["bytes_held"] == 2 * full_row
    # ragged: each row keeps (1 - r) of its own real tokens per head, pads never; plus 2 x 2 + 1 offsets per layer
    kept = compute_n_kept(512, 0.9) + compute_n_kept(384, 0.9)
    assert rows["nestedkv"]["bytes_held"] == 2 * 2 * 2 * kept * 16 * 4 + 2 * (2 * 2 + 1) * 8
    # budgeted: 1 - r of each row's tokens but never fewer than the 68 protected + 1 per head, plus the scorer's memory
    budgeted_kv = 2 * 2 * 2 * 2 * 69 * 16 * 4
    assert budgeted_kv < rows["nestedkv-budgeted"]["bytes_held"] < rows["none"]["bytes_held"]
    assert all(row["decode_tokens_per_s"] > 0 for row in rows.values())
    assert "A batch of 2 prompts of different lengths (512, 384 tokens" in format_markdown(tiny_report)


def test_fitted_exponent():
    lengths = [1024, 2048, 4096, 8192]
    assert fitted_exponent(lengths, [3e-6 * n for n in lengths]) == pytest.approx(1.0)
    assert fitted_exponent(lengths, [1e-9 * n * n for n in lengths]) == pytest.approx(2.0)


def test_cli_quick_end_to_end_with_memory(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    assert cli.main(["bench", "--random-shape", "tiny", "--quick", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "| method | r | KV held (MiB) |" in out and "| NestedKV |" in out and "| 8192 |" in out
    report = json.loads(out_file.read_text())
    assert report["command"] == f"nestedkv bench --random-shape tiny --quick --out {out_file}"
    for key in ("date", "cpu", "cpu_cores", "torch", "transformers", "kvpress", "torch_threads"):
        assert key in report["machine"]
    assert report["settings"]["length"] == 1024 and report["settings"]["ratios"] == [0.9]
    rows = {row["method"]: row for row in report["configurations"]}
    assert list(rows) == list(METHODS)
    assert rows["nestedkv"]["bytes_held"] / rows["nestedkv"]["bytes_full"] == pytest.approx(0.1, abs=2e-3)
    assert rows["nestedkv-masked"]["bytes_held"] == rows["nestedkv-masked"]["bytes_full"]
    for row in rows.values():  # each measured in its own fresh process
        memory = row["memory"]
        assert set(memory) == {"prefill_peak", "peak", "retained_after_prefill"}
        assert memory["peak"] >= memory["prefill_peak"] > 0
    assert [row["length"] for row in report["scaling"]["rows"]] == [1024, 2048, 4096, 8192]
    assert "long_decoding" not in report and "batched_decoding" not in report  # --quick skips both
    assert {"nestedkv_s", "keydiff_s"} <= set(report["scoring"]) and report["scoring"]["compiled_s"] is None


def test_cli_compiled_score_option_reaches_the_benchmark(monkeypatch):
    seen = []

    def record(model, settings, **kwargs):
        seen.append(settings)
        raise KeyboardInterrupt  # stop before anything is measured

    monkeypatch.setattr(speed, "run_bench", record)
    for argv, compiled in (([], False), (["--compiled-score"], True)):
        assert cli.main(["bench", "--random-shape", "tiny", "--quick", *argv]) == 130
        assert seen[-1].compiled_score is compiled


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--device", "tpu"], "unknown device 'tpu'"),
        (["bench", "--device", "mps"], "unknown device 'mps'"),
        (["bench", "--ratios", "0.5,1.0"], "compression_ratio must be in [0, 1)"),
        (["bench", "--ratios", "-0.1"], "compression_ratio must be in [0, 1)"),
        (["bench", "--length", "64"], "fewer than the 4 sink positions that are always kept"),
        (["bench", "--scaling-lengths", "1024,16"], "keeps 1 of 16 positions per head"),
        (["bench", "--scaling-lengths", "1024"], "at least two different scaling lengths"),
        (["bench", "--decode-lengths", "200000"], "--decode-lengths 200000 plus 33 decoded tokens does not fit"),
        (["bench", "--decode-lengths", "8192,x"], "expected a comma-separated list of int"),
        (["bench", "--batched-rows", "-1"], "batched_rows must be between 0 and half the length, got -1"),
        (["bench", "--length", "256", "--batched-rows", "200"], "batched_rows must be between 0 and half the length"),
        (["bench", "--out", "/nonexistent/dir/bench.json"], "no directory /nonexistent/dir"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestedkv: error:") and message in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "torch sees 0 CUDA device(s)" in capsys.readouterr().err
