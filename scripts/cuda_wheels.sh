#!/usr/bin/env bash
# Wheels for a GPU machine that has torch but not this project's other packages, and no network
# (the `device` tool's H200: torch 2.11, transformers 5.17, no kvpress). Run here, after
# scripts/setup.sh; scripts/cuda_session.sh installs them there. The versions are the ones this
# machine's .venv holds (set up from pyproject.toml's pins), so that the GPU runs the libraries the
# CPU tests ran. torch is not among them: its CUDA build is too large to carry, the machine's own is used.
set -euo pipefail
cd "$(dirname "$0")/.."
# What importing nestedkv, kvpress and the tests needs beyond that machine's packages.
names="transformers kvpress datasets dill multiprocess cachetools fire termcolor wonderwords tokenizers typer-slim"
pins=$(.venv/bin/python -m pip freeze --disable-pip-version-check | tr '[:upper:]_' '[:lower:]-')
wanted=()
for name in $names; do
    pin=$(grep -x "$name==.*" <<<"$pins") || { echo "cuda_wheels: $name is not installed in .venv; run scripts/setup.sh" >&2; exit 1; }
    wanted+=("$pin")
done
rm -rf .whl
python3 -m pip download --quiet --disable-pip-version-check --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wanted[@]}"
# A pinned version published only as source (fire 0.6.0) is built into a wheel here: that machine installs
# with no index, so it could not fetch the build's own requirements.
for source in .whl/*.tar.gz; do
    [ -e "$source" ] || continue
    .venv/bin/python -m pip wheel --quiet --disable-pip-version-check --no-deps -w .whl "$source"
    rm "$source"
done
exclude=$(git rev-parse --git-path info/exclude)  # .whl/ travels with the working tree without being tracked
mkdir -p "$(dirname "$exclude")"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
du -sh .whl
