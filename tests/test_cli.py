"""The command line as a user runs it (the model is the session's real default model)."""

import pytest

from nestedkv import cli


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--ratio", "1.5"], "compression_ratio must be in [0, 1)"),
        (["generate", "--mixing", "foo"], "unknown mixing 'foo'"),
        (["generate", "--scales", "global,hourly"], "unknown scale 'hourly'"),
        (["generate", "--context", "/nonexistent/context.txt", "--question", "q"], "cannot read context file"),
        (["generate", "--context", __file__], "--question is required"),
        (["generate", "--model", "/nonexistent/model.gguf"], "no GGUF file at /nonexistent/model.gguf"),
        (["eval", "--shard", "3/2"], "shard 3/2: need 0 <= k < n"),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestedkv: error:") and message in err
    assert "Traceback" not in err


def test_empty_context_file_is_refused(session_model, capsys, tmp_path):
    context = tmp_path / "empty.txt"
    context.write_text("\n", encoding="utf-8")
    assert cli.main(["generate", "--context", str(context), "--question", "q"]) == 2
    assert "context is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "unknown device 'tpu'"), ("cuda:7", "torch sees")],
)
def test_unusable_device_is_named(device, message, capsys):
    assert cli.main(["generate", "--device", device]) == 2
    assert message in capsys.readouterr().err
