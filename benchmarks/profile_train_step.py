"""Where one training step's GPU time goes, per implementation: CUDA time by kernel category and the top kernels.

    python benchmarks/profile_train_step.py --build build [--preset 30b-a3b-4layers] [--batch 4] [--seq 4096]
        [--impls fused grouped_mm] [--lora-r 0] [--gradient-checkpointing]
    python benchmarks/profile_train_step.py --build build --preset 30b-a3b --batch 1 --seq 2048 --impls fused-liger \
        --lora-r 16 --gradient-checkpointing --qlora --optim adamw8bit --lora-dtype bfloat16   (the 24 GB row)

Same model, data and optimizer as ``qwen3-moe-fused train`` (qwen3_moe_patch.train): after three untimed steps,
one step (forward, backward, AdamW) runs under the profiler. Categories come from kernel names (experts =
this project's Triton kernels, Liger's or torch's grouped GEMMs, not grouped_mm's gathers and scatters, which
fall under elementwise; attention = the SDPA kernels; gemm = the other matrix
products; optimizer = AdamW; elementwise = everything else). Also the step's wall time (CUDA time well under it:
the host is the bottleneck) and, from one more step under cProfile, the host functions that take the most time.
``--qlora`` / ``--piecewise`` build the model as ``train --qlora`` / ``--piecewise`` do.
"""

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch

import host_time

CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("experts", ("gate_up_swiglu", "grouped_gemm_kernel", "down_dgrad_dswiglu", "expert_wgrad", "combine_kernel",
                 "groupproblemshape", "fused_moe")),  # torch's grouped GEMMs: CUTLASS kernels on GroupProblemShape
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "cublas")),
)


def _category(name):
    lower = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in lower for k in keys)), "elementwise/other")


def profile_step(impl, args, kernel, batches):
    from torch.profiler import ProfilerActivity, profile

    from qwen3_moe_patch.train import build_model, make_optimizer

    model = build_model(impl, preset=args.preset, lora_r=args.lora_r, gradient_checkpointing=args.gradient_checkpointing,
                        device="cuda", dtype="bfloat16", kernel=kernel, qlora=args.qlora, piecewise=args.piecewise,
                        lora_dtype=args.lora_dtype)
    optimizer = make_optimizer(model, lr=1e-4, device="cuda", optim=args.optim)
    model.train()

    def step(input_ids):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for input_ids in batches[:3]:
        step(input_ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batches[3])
        torch.cuda.synchronize()
    events = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    start = time.perf_counter()
    step(batches[3])
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    with host_time._LaunchTimer() as launches:  # Triton's launch path (every Triton kernel: ours, Liger's)
        step(batches[3])
        torch.cuda.synchronize()
    host = cProfile.Profile()
    host.enable()
    step(batches[3])
    torch.cuda.synchronize()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(args.host_top)
    del model, optimizer
    torch.cuda.empty_cache()
    by_category = {}
    for name, ms, _ in events:
        by_category[_category(name)] = by_category.get(_category(name), 0.0) + ms
    events.sort(key=lambda e: -e[1])
    return {"impl": impl, "total_ms": sum(ms for _, ms, _ in events), "wall_ms": wall_ms, "by_category": by_category,
            "triton_launches": launches.launches, "triton_run_ms": launches.run_s * 1e3,
            "triton_launcher_ms": launches.launcher_s * 1e3,
            "top": [{"kernel": n[:120], "ms": ms, "count": c} for n, ms, c in events[:15]],
            "host_profile": text.getvalue()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--preset", default="30b-a3b-4layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--impls", nargs="+", default=["fused", "grouped_mm"])
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--qlora", action="store_true", help="the 4-bit model of train --qlora")
    parser.add_argument("--piecewise", action="store_true", help="the dense model built as train --piecewise does")
    parser.add_argument("--lora-dtype", default="float32")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--host-top", type=int, default=25, help="host functions listed (cProfile, by own time)")
    parser.add_argument("--out", default="train_profile.json")
    args = parser.parse_args()

    import kernels

    from qwen3_moe_patch.train import make_batches, token_stream

    kernel = kernels.get_local_kernel(Path(args.build))
    batches = [b.cuda() for b in make_batches(token_stream(), 4, args.batch, args.seq, seed=0)]
    results = [profile_step(impl, args, kernel, batches) for impl in args.impls]
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    for r in results:
        print(f"\n{r['impl']} (lora r{args.lora_r}, checkpointing {args.gradient_checkpointing}): "
              f"{r['total_ms']:.1f} ms of CUDA time in one step of {r['wall_ms']:.1f} ms; {r['triton_launches']} Triton "
              f"launches took {r['triton_run_ms']:.1f} ms of host time (C launcher {r['triton_launcher_ms']:.1f} ms)")
        for cat, ms in sorted(r["by_category"].items(), key=lambda kv: -kv[1]):
            print(f"  {cat:18s} {ms:8.1f} ms")
        for e in r["top"][:10]:
            print(f"    {e['ms']:7.2f} ms x{e['count']:<4d} {e['kernel'][:100]}")
        print(r["host_profile"])


if __name__ == "__main__":
    main()
