#!/usr/bin/env bash
# The GPU check (issue 8): `pytest -m gpu`, then `flowgrove bench-model` on FLUX.1-dev's shape (random weights, no
# download) at 720² and 1024², with the JSON, the table and the logs under $OUT. Sized for about 8 minutes on one
# H200: the tests get at most 2 minutes, the benchmark at most 5.5 (it writes its JSON after every row, so a cut-off
# run keeps what it measured).
#
#   scripts/gpu_check.sh fetch    here, once: the wheels the device image lacks (diffusers, omegaconf,
#                                 importlib_metadata) into .whl/, which .git/info/exclude then ignores
#   scripts/gpu_check.sh          there: device run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   scripts/gpu_check.sh --tiny   on a CPU, to try the script: the same steps with `bench-model --tiny`
#
# Environment: OUT (default runs/gpu-check), PYTHON (default python3), PIP (fetch only; default "$PYTHON -m pip").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS="diffusers==0.42.1 omegaconf==2.4.0 importlib_metadata==10.2.0"  # pure Python; the versions tested on the CPU

if [ "${1:-}" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    exec ${PIP:-$PYTHON -m pip} download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
fi

BENCH=(--resolutions 720,1024 --rollout-batches 1,2,4,8,16 --decode-batches 1,4 --train-batch 1 --warmup 2 --iters 5)
if [ "${1:-}" = --tiny ]; then
    BENCH=(--tiny --device cpu)
elif [ -n "${1:-}" ]; then
    echo "usage: scripts/gpu_check.sh [fetch | --tiny]" >&2
    exit 2
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flowgrove-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/flowgrove-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PYTHON" -c "import torch, diffusers, peft, omegaconf, flowgrove; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| peft', peft.__version__,
'| flowgrove', flowgrove.__file__)"
} 2>&1 | tee "$OUT/env.txt"

timeout 120 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}
timeout 330 "$PYTHON" -m flowgrove bench-model "${BENCH[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench_model.log"
bench=${PIPESTATUS[0]}

echo "gpu_check: pytest -m gpu exit $tests, bench-model exit $bench (124 = cut off by its time limit); files in $OUT"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
