#!/usr/bin/env bash
# Issue 17's GPU results: QLoRA r16 on the full-depth Qwen3-30B-A3B architecture (48 layers, random weights built
# layer by layer, NF4 with nested scales; LoRA on experts and attention in bf16, bitsandbytes' 8-bit AdamW, gradient
# checkpointing, 1 sequence per step) under a memory cap that proves it fits a 24 GB card, against our bf16 LoRA
# on the same (unquantized) weights. Each row is its own process under its own timeout; then one table.
# LAYER=1 first times one experts layer (30B shape, LoRA r16) on bf16 vs NF4 experts, with a per-kernel profile.
# Usage (GPU machine, repository root, wheels of kernels/tomlkit/liger-kernel/bitsandbytes in .whl):
# SWEEP=1 last runs sweep_configs.py --nf4 (the 4-bit kinds' candidates and the M-tile height, SWEEP_KINDS) at
# SWEEP_TOKENS. TESTS_AUTOTUNE=0 runs the tests at the default configs (the sweep checks the other candidates).
#   [ROWS="qlora-liger:2048 lora-liger:2048 qlora:2048"] [STEPS=12] [CAP=22] [BATCH=1] [OPTIM=adamw8bit]
#   [LORA_DTYPE=bfloat16] [TESTS=1] [TEST_TARGETS=... TEST_K=...]
#   [TESTS_AUTOTUNE=1] [LAYER=0] [SWEEP=0] bash benchmarks/qlora.sh
# The same rows at other settings rerun issue 16's full-depth LoRA rows (4x4096 tokens, fused AdamW, float32
# adapters; peft-gmm = stock PEFT on grouped_mm, liger-peft = all-Liger, its experts too, + PEFT):
#   ROWS="lora-liger:4096 lora:4096 peft-gmm:4096 liger-peft:4096" BATCH=4 OPTIM=adamw LORA_DTYPE=float32 TESTS=0
set -uo pipefail
: "${QWEN3_MOE_FUSED_COMMIT:?set QWEN3_MOE_FUSED_COMMIT=<the commit measured> (the copy of .git on the GPU machine can be stale)}"
export QWEN3_MOE_FUSED_COMMIT
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/runs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/patch PYTHONUNBUFFERED=1 QWEN3_MOE_FUSED_AUTOTUNE_CACHE=/tmp/autotune.json
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
if [ "${LAYER:-0}" = 1 ]; then
  SECONDS=0
  python3 -m qwen3_moe_patch.cli build --out build > /dev/null &&
    timeout "${LAYER_TIMEOUT:-180}" python3 benchmarks/bench_experts.py --build build --out "$OUT/layer_nf4.json" \
      --shapes 30b-a3b --tokens ${LAYER_TOKENS:-2048 16384} --routings uniform --impls fused --lora-rank 16 \
      --lora-nf4 --profile-at "30b-a3b:${LAYER_PROFILE:-2048}" > "$OUT/layer_nf4.log" 2>&1
  echo "layer exit $? (${SECONDS} s)"; grep -vE '^\{|Warning|warn' "$OUT/layer_nf4.log" | tail -40
fi
if [ "${TESTS:-1}" = 1 ]; then
  SECONDS=0
  QWEN3_MOE_FUSED_AUTOTUNE=${TESTS_AUTOTUNE:-1} timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest ${TEST_TARGETS:-tests/test_weights4bit.py tests/test_qlora.py} \
    ${TEST_K:+-k "$TEST_K"} -q -p no:cacheprovider -rs --tb=short > "$OUT/qlora_tests.log" 2>&1
  echo "tests exit $? (${SECONDS} s)"; grep -E "passed|failed|error|^(FAILED|ERROR)|^E  " "$OUT/qlora_tests.log" | head -12
fi
common="--preset 30b-a3b --lora-r 16 --lora-dtype ${LORA_DTYPE:-bfloat16} --optim ${OPTIM:-adamw8bit}
        --gradient-checkpointing --batch ${BATCH:-1} --dtype bfloat16 --device cuda --steps ${STEPS:-12} --lr 1e-4 --no-progress --log-every 0"
for row in ${ROWS-qlora-liger:2048 lora-liger:2048 qlora:2048}; do  # ROWS="" runs none
  kind=${row%%:*}; seq=${row##*:}; SECONDS=0
  case $kind in
    qlora-liger) args="--qlora --impl fused-liger --memory-cap-gib ${CAP:-22}";;
    qlora)       args="--qlora --impl fused --memory-cap-gib ${CAP:-22}";;
    lora-liger)  args="--piecewise --impl fused-liger";;
    lora)        args="--piecewise --impl fused";;
    peft-gmm)    args="--piecewise --impl grouped_mm";;
    liger-peft)  args="--piecewise --impl liger";;
  esac
  timeout "${TIMEOUT:-170}" python3 -m qwen3_moe_patch.cli train $common --seq "$seq" $args --out "/tmp/runs/$row" \
    > "/tmp/runs/$kind-$seq.log" 2>&1
  rc=$?; echo "$row: exit $rc (${SECONDS} s)"; grep -vE "Warning|warn" "/tmp/runs/$kind-$seq.log" | tail -4
  [ $rc = 0 ] || tail -25 "/tmp/runs/$kind-$seq.log" >> "$OUT/failures.log"
  python3 - "/tmp/runs/$row/train.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["runs"][0]
except (OSError, KeyError, IndexError):
    sys.exit()
print(f"  {r['tokens_per_second']:.0f} tok/s, peak {r['peak_mib']:.0f} MiB, losses {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, memory {r.get('memory_mib')}")
PY
done
if [ "${SWEEP:-0}" = 1 ]; then
  SECONDS=0
  python3 -m qwen3_moe_patch.cli build --out build > /dev/null &&
    timeout "${SWEEP_TIMEOUT:-240}" python3 benchmarks/sweep_configs.py --build build --nf4 --tokens ${SWEEP_TOKENS:-2048} \
      ${SWEEP_KINDS:+--kinds $SWEEP_KINDS} --out "$OUT/sweep_nf4.json" > "$OUT/sweep_nf4.log" 2>&1
  echo "sweep exit $? (${SECONDS} s)"; grep -vE 'Warning|warn' "$OUT/sweep_nf4.log" | tail -30
fi
ls /tmp/runs/*/train.json > /dev/null 2>&1 && python3 benchmarks/train_table.py /tmp/runs/*/train.json --out "$OUT/qlora" > /dev/null
cp /tmp/autotune.json "$OUT/" 2>/dev/null; true
