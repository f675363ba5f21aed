#!/usr/bin/env bash
# One device call: install the carried wheels (.whl: kernels, liger-kernel, pytest), build the kernel, run the
# tests (GPU tests included), then the accuracy table, the config sweep, the benchmark and the host times, in
# that order (a call cut off at its limit keeps the earlier steps' results); logs and JSON go to $OUT.
# Usage (GPU machine, repository root): [PYTEST_TARGETS=tests] [BENCH=1] [ACCURACY=0] [HOST_TIME="fused module"]
#   [HOST_TIME_BASELINE=build_old] [SWEEP="wgrad"] bash benchmarks/gpu_session.sh [bench args...]
# HOST_TIME: host_time.py for those implementations (T = 1024, 4096); HOST_TIME_BASELINE: a carried build of an
# earlier commit whose host_time.py runs (ours only) before and after this build's, so the host's drift between
# processes shows; SWEEP: sweep_configs.py over those kinds (T = 4096 + 16384).
set -uo pipefail
: "${QWEN3_MOE_FUSED_COMMIT:?set QWEN3_MOE_FUSED_COMMIT=<the commit measured> (the copy of .git on the GPU machine can be stale)}"
export QWEN3_MOE_FUSED_COMMIT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/patch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'kernels', kernels.__version__)"
python3 -m qwen3_moe_patch.cli build --out build || exit 1
python3 -m pytest ${PYTEST_TARGETS:-tests} -q -p no:cacheprovider -rs > "$OUT/pytest.log" 2>&1; echo "pytest exit $?"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
cd benchmarks
if [ "${ACCURACY:-0}" = 1 ]; then
  python3 accuracy.py --build ../build --out "$OUT/accuracy.json" 2>&1 | tee "$OUT/accuracy.log" | grep -v '^{'
fi
if [ -n "${SWEEP:-}" ]; then
  python3 sweep_configs.py --build ../build --kinds $SWEEP --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  python3 bench_experts.py --build ../build --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
fi
host_time() {  # BUILD IMPLS NAME: host_time.py of that build, results in $OUT/NAME.json and .log
  python3 host_time.py --build "$1" --impls $2 --out "$OUT/$3.json" 2>&1 | tee "$OUT/$3.log" | grep -v '^{'
}
if [ -n "${HOST_TIME_BASELINE:-}" ]; then host_time "../$HOST_TIME_BASELINE" fused host_time_baseline; fi
if [ -n "${HOST_TIME:-}" ]; then host_time ../build "$HOST_TIME" host_time; fi
if [ -n "${HOST_TIME_BASELINE:-}" ]; then host_time "../$HOST_TIME_BASELINE" fused host_time_baseline_again; fi
