#!/usr/bin/env bash
# Issue 7's GPU results in a few device calls on one warm machine: the 30b-a3b-4layers training table (16384
# tokens/step, full fine-tune and LoRA r16, every implementation in its own process under its own timeout; 200
# steps for fused, grouped_mm and Liger, whose curves are then compared step by step, 5 for eager) and the GPU
# tests (the bf16 200-step convergence-parity tests among them, which write their agreement figures); full32 and
# lora32 run the float32 grouped_mm reference the table compares the bfloat16 curves with (more than an H100's
# 80 GB at 16384 tokens/step: on an H200, or with smaller --batch/--seq for every phase).
# $OUT gets at most 8 files (the device tool's limit): one log per phase, the merged table/plot of every run so
# far (train.json files and the autotuner's cache stay in /tmp, so a later call on the same machine adds to them)
# and the parity figures in one file.
# Usage (GPU machine, repository root, wheels of kernels/liger-kernel/tomlkit in .whl):
#   [PHASES="full lora tests full32 lora32"] [IMPLS="fused grouped_mm liger eager"] [STEPS=200] [EAGER_STEPS=5] [TIMEOUT=150] bash benchmarks/gpu_train.sh
set -uo pipefail
: "${QWEN3_MOE_FUSED_COMMIT:?set QWEN3_MOE_FUSED_COMMIT=<the commit measured> (the copy of .git on the GPU machine can be stale)}"
export QWEN3_MOE_FUSED_COMMIT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/patch PYTHONUNBUFFERED=1 QWEN3_MOE_FUSED_AUTOTUNE_CACHE=/tmp/autotune.json
export QWEN3_MOE_FUSED_RESULTS=/tmp/parity; mkdir -p /tmp/parity /tmp/runs
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
for phase in ${PHASES:-full lora tests}; do
  case $phase in
    tests)
      SECONDS=0
      timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs > "$OUT/gpu_tests.log" 2>&1
      echo "gpu tests exit $? (${SECONDS} s)"; grep -E "passed|failed|error|^(FAILED|ERROR)" "$OUT/gpu_tests.log" | tail -12
      python3 - "$OUT/parity.json" <<'PY'
import json, pathlib, sys
runs = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/parity").glob("parity_*.json"))}
pathlib.Path(sys.argv[1]).write_text(json.dumps(runs))
for name, d in runs.items():
    print(name, " ".join(f"{k} {d[k]:.2e}" for k in ("fused_vs_fp32", "grouped_mm_vs_fp32", "fused_vs_grouped_mm_raw_max")))
PY
      ;;
    full|lora|full32|lora32)  # *32: the float32 reference curve (grouped_mm) for the bfloat16 runs' agreement
      lora=0; [ "${phase#lora}" != "$phase" ] && lora=16
      dtype=bfloat16 impls=${IMPLS:-fused grouped_mm liger eager}
      [ "${phase%32}" != "$phase" ] && dtype=float32 impls=grouped_mm
      for impl in $impls; do
        steps=${STEPS:-200}; limit=${TIMEOUT:-150}
        [ "$impl" = eager ] && steps=${EAGER_STEPS:-5} && limit=100
        SECONDS=0
        timeout "$limit" python3 -m qwen3_moe_patch.cli train --preset 30b-a3b-4layers --impl "$impl" --device cuda \
          --dtype $dtype --batch 4 --seq 4096 --steps "$steps" --lr 1e-4 --lora-r "$lora" --log-every 50 \
          --no-progress --out "/tmp/runs/${phase}_$impl" > "/tmp/runs/${phase}_$impl.log" 2>&1
        echo "$phase $impl exit $? (${SECONDS} s)"; grep -E "step [0-9]|Error|error" "/tmp/runs/${phase}_$impl.log" | tail -3
        { echo "### $phase $impl"; cat "/tmp/runs/${phase}_$impl.log"; } >> "$OUT/$phase.log"
      done ;;
  esac
done
cp /tmp/autotune.json "$OUT/" 2>/dev/null
runs=$(ls /tmp/runs/*/train.json 2>/dev/null)
[ -n "$runs" ] && python3 benchmarks/train_table.py $runs --out "$OUT/train_table" | tail -24
