#!/usr/bin/env bash
# Issue 7's GPU results in one or two device calls: the bf16 convergence-parity tests (200 steps, full and LoRA,
# with and without gradient checkpointing) and the 30b-a3b-4layers training table (16384 tokens/step, every
# implementation, full fine-tune and LoRA r16), each implementation in its own process under its own timeout.
# Logs, train.json files, the parity figures and the merged table/plot go to $OUT.
# Usage (GPU machine, repository root, wheels of kernels/liger-kernel/tomlkit in .whl):
#   [PHASES="parity full lora"] [STEPS=12] [EAGER_STEPS=5] bash benchmarks/gpu_train.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/patch PYTHONUNBUFFERED=1 QWEN3_MOE_FUSED_AUTOTUNE_CACHE=$OUT/autotune.json
export QWEN3_MOE_FUSED_RESULTS=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
for phase in ${PHASES:-parity full lora}; do
  case $phase in
    parity)
      timeout 300 python3 -m pytest tests/test_train.py -m gpu -q -p no:cacheprovider -rs > "$OUT/parity.log" 2>&1
      echo "parity pytest exit $?"; tail -2 "$OUT/parity.log"; cat "$OUT"/parity_*.json 2>/dev/null ;;
    full|lora)
      lora=0; [ "$phase" = lora ] && lora=16
      for impl in fused grouped_mm liger eager; do
        steps=${STEPS:-12}; [ "$impl" = eager ] && steps=${EAGER_STEPS:-5}
        timeout 150 python3 -m qwen3_moe_patch.cli train --preset 30b-a3b-4layers --impl "$impl" --device cuda \
          --dtype bfloat16 --batch 4 --seq 4096 --steps "$steps" --lr 1e-4 --lora-r "$lora" --log-every 4 \
          --no-progress --out "$OUT/${phase}_$impl" > "$OUT/${phase}_$impl.log" 2>&1
        echo "$phase $impl exit $?"; grep -E "step|tokens" "$OUT/${phase}_$impl.log" | tail -2
      done ;;
  esac
done
runs=$(ls "$OUT"/*/train.json 2>/dev/null)
[ -n "$runs" ] && python3 benchmarks/train_table.py $runs --out "$OUT/train_table" | tail -20
