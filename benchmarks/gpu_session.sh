#!/usr/bin/env bash
# One device call: install the carried wheels (.whl: kernels, liger-kernel, pytest), build the kernel, run the
# whole test suite (GPU tests included), then the benchmark; logs and JSON go to $OUT, a short table comes last.
# Usage (on the GPU machine, repository root): bash benchmarks/gpu_session.sh [benchmark args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/patch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, kernels; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'kernels', kernels.__version__)"
python3 -m qwen3_moe_patch.cli build --out build || exit 1
python3 -m pytest ${PYTEST_TARGETS:-tests} -q -p no:cacheprovider -rs > "$OUT/pytest.log" 2>&1; echo "pytest exit $?"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
python3 benchmarks/bench_experts.py --build build --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
