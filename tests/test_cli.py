"""The command line as a user runs it (the model is the session's real default model)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from nestedkv import cli
from nestedkv.bench import runner
from nestedkv.press import NestedKVPress


@pytest.fixture
def session_model(monkeypatch, default_model):
    """Let the CLI reuse the session's already loaded default model instead of loading it again."""
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: default_model)


def test_generate_demo_answers_and_reports_the_cache(session_model, capsys):
    assert cli.main(["generate"]) == 0
    out = capsys.readouterr().out
    assert cli.demo_sample()["answer"] in out.split("answer:")[1].splitlines()[0]
    assert "compression ratio 0.75 (head-adaptive budget, ragged)" in out
    assert "layer 29:" in out
    held = float(out.split("MiB held (")[1].split("%")[0])
    assert 24.9 <= held <= 25.2  # ragged storage really frees 75 % of the bytes


def test_generate_with_a_context_file_and_ablation_switches(session_model, capsys, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(cli.demo_sample()["context"], encoding="utf-8")
    argv = [
        "generate",
        "--context",
        str(context),
        "--question",
        "What is the special magic number?",
        "--ratio",
        "0.5",
        "--scales",
        "global,window",
        "--budget",
        "uniform",
        "--max-new-tokens",
        "4",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "(uniform budget" in out
    kept = [line for line in out.splitlines() if line.strip().startswith("layer")]
    assert len(kept) == 30 and all(len(set(line.split("per head")[1].strip("[] ").split(", "))) == 1 for line in kept)


def test_generate_options_start_from_the_shipped_default_or_the_papers():
    def press(*options):
        return cli.press_from_args(cli.build_parser().parse_args(["generate", *options]))

    shipped = (press().n_recent, press().recency, press().value_weight, press().block_size, press().scored_keys)
    assert shipped == (64, 0.5, 0.25, 64, "pre-rope")
    assert press("--paper") == NestedKVPress.paper(0.75)
    assert (press("--paper").value_weight, press("--paper").block_size, press("--paper").scored_keys) == (
        0.0, None, "cached")
    assert press("--paper", "--scored-keys", "pre-rope").scored_keys == "pre-rope"
    # --block-size auto is the paper's rule (None), not the option left unset (the shipped 64)
    assert press("--block-size", "auto").block_size is None and press("--block-size", "96").block_size == 96
    # a switch given with --paper overrides the paper's value, even when it equals the shipped default
    assert (press("--paper", "--n-recent", "64").n_recent, press("--paper", "--n-recent", "64").recency) == (64, 0.0)
    assert press("--recency", "0", "--window", "32") == NestedKVPress(0.75, recency=0.0, window=32)


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be refused before the model loads: loading it fails the test (fast)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.fixture
def bad_files(tmp_path, monkeypatch):
    """Paths of files that are wrong in one way each, by name; ``datasets``' cache kept in ``tmp_path``."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    row = {"context": "c", "question": "q", "answer_prefix": "a", "answer": ["x"], "task": "vt", "max_new_tokens": 8}
    contents = {  # name in the tests: (file name, bytes)
        "latin1": ("latin1.txt", b"caf\xe9 au lait"),
        "empty": ("empty.txt", b"\n"),
        "empty_jsonl": ("empty.jsonl", b""),
        "binary": ("binary.jsonl", b"\x00\x01\xffgarbage"),
        "nulls": ("nulls.jsonl", (json.dumps(row) + "\n" + json.dumps({**row, "context": None})).encode()),
        "columns": ("columns.jsonl", json.dumps({k: row[k] for k in ("context", "question", "answer")}).encode()),
        "tokens": ("tokens.jsonl", json.dumps({**row, "max_new_tokens": "ten"}).encode()),
        "fake_gguf": ("fake.gguf", b"hello"),
        "squad": ("squad.json", b"{}"),
        "afile": ("afile", b"x"),
        "results": ("results/results.jsonl", json.dumps({"model": "m"}).encode()),
    }
    paths = {"tmp": str(tmp_path)}
    for name, (file_name, content) in contents.items():
        path = tmp_path / file_name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        paths[name] = str(path)
    return paths


RULER_FILE = str(Path(__file__).parent / "data" / "hub" / "ruler_4096.jsonl")


BAD_INPUTS = [
    (["generate", "--ratio", "1.5"], "compression_ratio must be in [0, 1)"),
    (["generate", "--ratio", "abc"], "argument --ratio: invalid float value: 'abc'"),
    (["generate", "--mixing", "foo"], "unknown mixing 'foo'"),
    (["generate", "--scales", "global,hourly"], "unknown scale 'hourly'"),
    (["generate", "--scored-keys", "rotated"], "unknown scored_keys 'rotated'"),
    (["generate", "--question", ""], "--question is empty"),
    (["generate", "--question", "  "], "--question is empty"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "--context", "/nonexistent/context.txt", "--question", "q"],
     "cannot read context file /nonexistent/context.txt: no such file"),
    (["generate", "--context", "{latin1}", "--question", "q"], "cannot read context file {latin1}: not UTF-8"),
    (["generate", "--context", "{tmp}", "--question", "q"], "cannot read context file {tmp}: it is a directory"),
    (["generate", "--context", "{empty}", "--question", "q"], "context file {empty} is empty"),
    (["generate", "--context", __file__], "--question is required"),
    (["generate", "--model", "/nonexistent/model.gguf"], "no GGUF file at /nonexistent/model.gguf"),
    (["generate", "--model", "/nonexistent/dir"], "no model directory or file at /nonexistent/dir"),
    (["generate", "--model", "./no/such/model"], "no model directory or file at ./no/such/model"),
    (["generate", "--model", "{tmp}"], "{tmp} is not a model directory: it holds no config.json"),
    (["generate", "--model", "{fake_gguf}"], "{fake_gguf} is not a GGUF file"),
    (["generate", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["eval", "--shard", "3/2"], "shard 3/2: need 0 <= k < n"),
    (["eval", "--lengths", "0"], "context lengths must be positive"),
    (["eval", "--lengths", "16384"],
     "context length 16384 does not fit the model's context window of 8192 tokens (max_position_embeddings)"),
    (["eval", "--methods", "h2o"], "unknown method 'h2o'"),
    (["eval", "--tasks", "nope"], "unknown task(s) nope"),
    (["eval", "--ratios", "0.5,1.2"], "compression_ratio must be in [0, 1)"),
    (["eval", "--samples", "0"], "samples must be >= 1"),
    (["eval", "--split", "test", "--seed", "3"], "--split test is seed 1: give --split or --seed, not both"),
    (["eval", "--split", "holdout"], "argument --split: invalid choice: 'holdout'"),
    (["eval", "--benchmark", "documents", "--seed", "7"], "the documents benchmark has two splits, not seeds"),
    (["eval", "--preset", "documents", "--tasks", "niah_single_1"], "unknown documents task 'niah_single_1'"),
    (["eval", "--model", "/nonexistent/dir"], "no model directory or file at /nonexistent/dir"),
    (["eval", "--squad", "/nonexistent/squad.json"], "cannot read SQuAD file /nonexistent/squad.json: no such"),
    (["eval", "--squad", "{squad}"], "SQuAD file {squad} does not have the dataset's JSON layout"),
    (["eval", "--out", "{afile}"], "--out {afile} is a file, not a directory"),
    (["eval", "--benchmark", "ruler", "--data-files", "/nonexistent/x.jsonl"],
     "cannot read data file /nonexistent/x.jsonl: no such file"),
    (["eval", "--benchmark", "ruler", "--data-files", "{tmp}"], "cannot read data file {tmp}: it is a directory"),
    (["eval", "--benchmark", "ruler", "--data-files", "{empty_jsonl}"], "data file {empty_jsonl} is empty"),
    (["eval", "--benchmark", "ruler", "--data-files", "{binary}"],
     "cannot read data file {binary} as JSON / JSON lines"),
    (["eval", "--benchmark", "ruler", "--data-files", "{nulls}"],
     "data file {nulls}: row 2 has no value for 'context'"),
    (["eval", "--benchmark", "ruler", "--data-files", "{columns}"],
     "data file {columns} lacks columns ['answer_prefix', 'max_new_tokens', 'task']"),
    (["eval", "--benchmark", "ruler", "--data-files", "{tokens}"],
     "row 1: max_new_tokens must be a positive integer, got 'ten'"),
    (["eval", "--benchmark", "ruler", "--data-files", RULER_FILE, "--tasks", "cwe,vt"],
     f"no sample of task(s) cwe in {RULER_FILE}"),
    (["report", "--results", "{tmp}/results", "--out", "{afile}"], "--out {afile} is a file, not a directory"),
    (["bench", "--out", "{afile}"], "--out {afile} already exists"),
    (["bench", "--out", "{tmp}"], "--out {tmp} is a directory"),
    (["bench", "--length", "9000"], "--length 9000 plus"),
    (["chat", "--budget", "4"], "budget 4 must be above the 68 sink + recent positions"),
    (["chat", "--interval", "0"], "interval must be"),
    (["chat", "--ratio", "1"], "compression_ratio must be in [0, 1)"),
    (["chat", "--ratio", "0.5", "--budget", "100"], "argument --budget: not allowed with argument --ratio"),
    (["chat", "--chunk-size", "0"], "--chunk-size must be"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["chat", "--context", "{empty}"], "context file {empty} is empty"),
    (["chat", "--context", "/nonexistent/doc.txt"], "cannot read context file /nonexistent/doc.txt: no such file"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_a_one_line_error(argv, message, bad_files, no_model_load, capsys):
    argv = [arg.format(**bad_files) for arg in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestedkv: error:") and message.format(**bad_files) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_input_is_refused_before_torch_is_imported(bad_files, tmp_path):
    """Every bad input above is refused without importing torch, transformers or kvpress (seconds each), in a
    fresh interpreter as a user runs the command."""
    cases = [[arg.format(**bad_files) for arg in argv] for argv, _ in BAD_INPUTS]
    script = (
        "import json, sys\n"
        "from nestedkv.cli import main\n"
        "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "heavy = [name for name in ('torch', 'transformers', 'kvpress') if name in sys.modules]\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    environment = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          env=environment, check=True)
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert outcome["codes"] == [2] * len(cases)
    assert outcome["heavy"] == []


def test_unreachable_hub_is_one_line_naming_data_files(no_model_load, monkeypatch, capsys):
    """Offline, a hub benchmark or a hub model is refused at once, with what to do instead."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["eval", "--benchmark", "longbench", "--subset", "qasper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestedkv: error: cannot reach the Hugging Face hub") and "--data-files" in err
    assert err.count("\n") == 1
    assert cli.main(["generate", "--model", "org/name"]) == 2
    assert capsys.readouterr().err == (
        "nestedkv: error: cannot find model 'org/name' locally and the hub is unreachable (offline)\n"
    )


def test_ctrl_c_during_eval_keeps_the_results(tmp_path, monkeypatch, capsys):
    def interrupted_run(config, model, tokenizer, store, **kwargs):
        store.add(dict(model="m", benchmark="b", length=1, task="t", index=0, seed=0, method="none", ratio=0.0,
                       query_aware=False, score=100.0))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(runner, "run", interrupted_run)
    assert cli.main(["eval", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.endswith(
        "nestedkv: interrupted, 1 results kept, run the same command to resume\n"
    )
    monkeypatch.setattr(cli, "write_report", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["report", "--results", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "nestedkv: interrupted\n"


def test_report_of_some_methods(tmp_path, capsys):
    rows = [dict(model="m", benchmark="b", length=1, task="t", index=i, seed=0, method=method, ratio=ratio,
                 query_aware=False, score=50.0 * i) for i in range(3) for method, ratio in
            (("none", 0.0), ("nestedkv", 0.5), ("knorm", 0.5)) if (method, i) != ("knorm", 2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "some"),
                     "--methods", "nestedkv"]) == 0
    out = capsys.readouterr().out
    assert "3 sample(s) per task" in out and "| nestedkv | 50.0 ± " in out and "knorm" not in out
    assert cli.main(["report", "--results", str(tmp_path), "--methods", "nestedkv, tova"]) == 2
    assert capsys.readouterr().err == (
        "nestedkv: error: --methods tova: no results in this store; measured: knorm, nestedkv\n"
    )


def test_chat_reads_one_turn_per_line_and_reports_the_cache_after_each(session_model, capsys, tmp_path, monkeypatch):
    context = tmp_path / "doc.txt"
    context.write_text(cli.demo_sample()["context"], encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n\nWhat is this text about?\n"))
    assert cli.main(["chat", "--budget", "256", "--context", str(context), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    statuses = [line.split() for line in out.splitlines() if line.startswith("seen ")]
    assert len(statuses) == 3 and out.count("assistant> ") == 2 and "you> Hello!" in out  # blank line skipped
    seen = [int(status[1]) for status in statuses]
    assert seen[0] > 2500 and seen[0] < seen[1] < seen[2]
    assert all(int(status[3]) <= 256 + 16 + 16 for status in statuses)


def test_chat_with_a_ratio_keeps_that_share_of_the_conversation(session_model, capsys, tmp_path, monkeypatch):
    context = tmp_path / "doc.txt"
    context.write_text(cli.demo_sample()["context"], encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello!\n"))
    assert cli.main(["chat", "--ratio", "0.8", "--context", str(context), "--max-new-tokens", "4"]) == 0
    statuses = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("seen ")]
    for status in statuses:
        seen, held = int(status[1]), int(status[3])
        assert int(0.2 * seen) <= held <= int(0.2 * seen) + 16 + 16


def test_context_longer_than_the_window_is_refused(session_model, capsys, tmp_path):
    context = tmp_path / "long.txt"
    context.write_text(cli.demo_sample()["context"] * 3, encoding="utf-8")  # ~8.7k tokens
    assert cli.main(["generate", "--context", str(context), "--question", "Which number?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokens) plus 48 tokens to generate does not fit" in err
    assert "context window of 8192 tokens (max_position_embeddings)" in err


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "unknown device 'tpu'"), ("cuda:7", "torch sees")],
)
def test_unusable_device_is_named(device, message, capsys):
    assert cli.main(["generate", "--device", device]) == 2
    assert message in capsys.readouterr().err
