#!/usr/bin/env bash
# The GPU checks of docs/benchmarks_cuda.md in one command, for a GPU machine lent for minutes: the CUDA
# tests, then `nestedkv bench --device cuda --compiled-score` on Llama-3.2-1B's shape (random weights) at 8k
# and at 32k x 8 rows, then the compiled score alone (scripts/score_compiled.py: graphs per length, kernels per
# call). Each step has its own time limit, so a step cut short loses only itself (its progress lines stay in
# the log).
#
#   here:  bash scripts/cuda_wheels.sh          (wheels of the pinned packages into .whl/)
#   there: bash scripts/cuda_session.sh         (the `device` tool: carry .whl; results go to $OUT)
#
# Environment: OUT (results folder; default results/cuda), PYTHON (default python3), DEVICE (default cuda),
# SHAPE (the random model's shape; default llama-3.2-1b), LONG / SHORT (context lengths of the two benchmarks;
# default 32768 / 8192), ROWS (batch of the long one; default 8), STEP_SECONDS (each benchmark's limit;
# default 150, so that the install and the four steps end within the 10 minutes of one `device` call).
# A CPU run with small numbers checks the script itself (about a minute):
#   SHAPE=tiny DEVICE=cpu LONG=512 SHORT=256 ROWS=2 PYTHON=.venv/bin/python bash scripts/cuda_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/cuda}
python=${PYTHON:-python3}
device=${DEVICE:-cuda} shape=${SHAPE:-llama-3.2-1b}
long=${LONG:-32768} short=${SHORT:-8192} rows=${ROWS:-8} step_seconds=${STEP_SECONDS:-150}
mkdir -p "$out"
log="$out/session.log"
exec > >(tee -a "$log") 2>&1

if ! "$python" -c "import kvpress" 2>/dev/null; then
    [ -d .whl ] || { echo "cuda_session: kvpress is missing and there is no .whl/ (run scripts/cuda_wheels.sh here, carry .whl)"; exit 1; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$python" -c "import importlib.metadata as metadata, torch, nestedkv.cache, nestedkv.bench.speed
print(*(f'{name} {metadata.version(name)}' for name in ('torch', 'transformers', 'kvpress')), sep=' | ')
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU')" || exit 1

step() {  # step NAME SECONDS COMMAND...: run one step under its limit, say how it ended
    local name=$1 seconds=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${seconds} s): $*"
    timeout --signal=INT --kill-after=20 "$seconds" "$@"
    echo "== $name: exit $? after $((SECONDS - start)) s"
}
nestedkv=("$python" -c "import sys; from nestedkv.cli import main; sys.exit(main())")  # the CLI, without installing

step tests 180 "$python" -m pytest -q -p no:cacheprovider tests/test_cache.py tests/test_correctness.py \
    tests/test_scoring.py -k cuda -rs
# the short one first: where the eager score costs most of a prefill (70 % at 8k on an H200, 2026-11-27)
step "bench ${short} x 1, batched" "$step_seconds" "${nestedkv[@]}" bench --random-shape "$shape" --device "$device" \
    --length "$short" --batch 1 --ratios 0.9 --scaling-lengths "$((short / 2)),$short" --decode-lengths none --batched-rows 8 \
    --no-peak-memory --compiled-score --out "$out/${shape}-${short}-batched8.json"
step "bench ${long} x ${rows}" "$step_seconds" "${nestedkv[@]}" bench --random-shape "$shape" --device "$device" \
    --length "$long" --batch "$rows" --ratios 0.9 --scaling-lengths "$short,$long" --decode-lengths "$short,$long" \
    --batched-rows 0 --compiled-score --out "$out/${shape}-${long}-batch${rows}.json"
step "compiled score" 60 "$python" scripts/score_compiled.py --device "$device" \
    --lengths "$short,$((short + 1000)),$long,$((long * 4))"
