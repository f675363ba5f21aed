"""The multi-GPU table (issue 18): every (engine, implementation) row in its own torchrun, one table at the end.

    python benchmarks/scale_out.py --nproc 8 --out runs/scale_out [--preset 30b-a3b] [--layers N]
        [--rows fsdp2:grouped_mm fsdp2:fused ep:fused zero3:fused fsdp2-lora:fused ...] [--steps 20]
        [--batch 1 --seq 4096] [--device cuda --dtype bfloat16] [--timeout 300]

A row is ENGINE:IMPL with ENGINE one of fsdp2 (FSDP2 per decoder layer), ep (transformers expert parallelism over
all ranks, FSDP2 over all), zero3 (DeepSpeed ZeRO-3), fsdp2-lora (FSDP2, LoRA r16 on attention and experts) and
IMPL one of ``qwen3-moe-fused train --impl``'s (grouped_mm, fused, fused-liger, liger, eager). Each row runs
``qwen3-moe-fused train`` under ``torchrun --nproc_per_node N`` with the same seed, so every implementation of an
engine starts from the same weights and every rank sees the same batches across implementations. Per row: tokens/s
per GPU (mean over ranks, steady state), model TFLOP/s per GPU (``train.flops_per_token``: 6 × the matrix
parameters a token passes through + 12 × layers × attention width × sequence), peak memory per GPU (max over
ranks), first-step time (max over ranks) and rank 0's loss agreement with grouped_mm's row of the same engine (max
|Δ| per step and between 20-step means). A row that fails or runs past --timeout is reported as such; the others
still run. Writes OUT/scale_out.json (environment, rows, loss curves) and OUT/scale_out.md, prints the table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = {"fsdp2": ["--fsdp"], "ep": ["--ep", "{nproc}"], "zero3": ["--zero3"], "fsdp2-lora": ["--fsdp", "--lora-r", "16"]}


def _row(engine, impl, args, out):
    """Run one row; its summary (or its error)."""
    folder = out / f"{engine}_{impl}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "-m", "qwen3_moe_patch.cli", "train", "--preset", args.preset, "--impl", impl,
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--lr", str(args.lr), "--no-progress", "--log-every", "0",
               "--out", str(folder), *(a.format(nproc=args.nproc) for a in ENGINES[engine])]
    if args.layers:
        command += ["--layers", str(args.layers)]
    row = {"engine": engine, "impl": impl, "command": " ".join(command[1:])}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"no result within {args.timeout} s"}
    row["wall_seconds"] = time.perf_counter() - start
    result = folder / "train.json"
    if done.returncode or not result.exists():
        text = (done.stderr + done.stdout).splitlines()
        lines = [line for line in text if "qwen3-moe-fused train: error:" in line] or \
            [line for line in text if "Error" in line and "ChildFailedError" not in line]
        return {**row, "error": (lines[-1].strip() if lines else f"exit {done.returncode}")[:300]}
    data = json.loads(result.read_text())
    ranks = [rank[0] for rank in data["ranks"]]
    tokens = sum(r["tokens_per_second"] for r in ranks) / len(ranks)
    return {**row, "environment": data["environment"], "tokens_per_second_per_gpu": tokens,
            "tflops_per_gpu": tokens * data["flops_per_token"] / 1e12, "flops_per_token": data["flops_per_token"],
            "peak_gib_per_gpu": max(r["peak_mib"] for r in ranks) / 1024,
            "first_step_seconds": max(r["first_step_seconds"] for r in ranks), "losses": data["runs"][0]["losses"]}


def _agreement(rows):
    """Rank 0's loss difference from grouped_mm's row of the same engine (same weights, same batches)."""
    from qwen3_moe_patch.train import window_means

    base = {r["engine"]: r for r in rows if r["impl"] == "grouped_mm" and "losses" in r}
    for r in rows:
        ref = base.get(r["engine"])
        if "losses" in r and ref is not None and r is not ref:
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
            means = list(zip(window_means(r["losses"]), window_means(ref["losses"])))
            r["max_mean_diff"] = max((abs(a - b) for a, b in means), default=None)
            r["speedup_vs_grouped_mm"] = r["tokens_per_second_per_gpu"] / ref["tokens_per_second_per_gpu"]


def _table(rows, args):
    lines = [f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {args.nproc} ranks, {args.batch}x"
             f"{args.seq} tokens per rank per step, {args.steps} steps, {args.dtype} on {args.device}", "",
             "| engine | impl | tokens/s/GPU | × grouped_mm | TFLOP/s/GPU | peak GiB/GPU | first step s | "
             "max Δloss | Δ 20-step means |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['impl']} | {r['error']} | | | | | | |")
            continue
        speed = f"{r['speedup_vs_grouped_mm']:.2f}" if "speedup_vs_grouped_mm" in r else "–"
        diff = f"{r['max_loss_diff']:.2e}" if "max_loss_diff" in r else "–"
        mean = f"{r['max_mean_diff']:.2e}" if r.get("max_mean_diff") is not None else "–"
        lines.append(f"| {r['engine']} | {r['impl']} | {r['tokens_per_second_per_gpu']:.0f} | {speed} | "
                     f"{r['tflops_per_gpu']:.1f} | {r['peak_gib_per_gpu']:.1f} | {r['first_step_seconds']:.1f} | "
                     f"{diff} | {mean} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=8, help="ranks (GPUs) per row")
    parser.add_argument("--out", default="runs/scale_out", help="folder for the rows' runs and the table")
    parser.add_argument("--preset", default="30b-a3b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    parser.add_argument("--rows", nargs="+", default=[f"{e}:{i}" for e in ("fsdp2", "ep", "zero3")
                                                      for i in ("grouped_mm", "fused", "fused-liger", "liger")]
                        + ["fsdp2-lora:grouped_mm", "fsdp2-lora:fused"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--timeout", type=int, default=300, help="seconds per row")
    args = parser.parse_args()
    rows_asked = [tuple(row.split(":", 1)) for row in args.rows]
    unknown = [f"{e}:{i}" for e, i in rows_asked if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine in {', '.join(unknown)}; engines: {', '.join(ENGINES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    rows = []
    for engine, impl in rows_asked:
        print(f"{engine}:{impl} ...", file=sys.stderr, flush=True)
        row = _row(engine, impl, args, out)
        rows.append(row)
        done = row.get("error") or f"{row['tokens_per_second_per_gpu']:.0f} tokens/s/GPU"
        print(f"  {done}", file=sys.stderr, flush=True)
    _agreement(rows)
    table = _table(rows, args)
    (out / "scale_out.md").write_text(table + "\n")
    (out / "scale_out.json").write_text(json.dumps({"setup": vars(args), "rows": rows}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
