"""Qwen3-MoE experts, forward and forward+backward, all implementations side by side in one GPU run.

    python benchmarks/bench_experts.py --build build --out results.json [--tokens 4096 16384] [--shape 30b-a3b]

Each implementation gets the same inputs (bf16, x ~ N(0,1), weights ~ N(0,0.02), routing from a random
router: fp32 softmax -> top-k -> renormalised, as Qwen3-30B-A3B's norm_topk_prob) and computes
out = experts(x, top_k_index, top_k_weights); fwd+bwd also takes gradients w.r.t. x, top_k_weights and both
expert weights (full fine-tuning, TFLOP/s counting 6·T·K·H·I fwd and 18·T·K·H·I fwd+bwd). With --lora-rank r,
LoRA rows follow: stock PEFT (target_parameters on transformers' experts, grouped_mm) and ours reading the same
PEFT modules, experts frozen, gradients w.r.t. x, top_k_weights and the LoRA factors (TFLOP/s counting
12·T·K·H·I, the frozen-experts work). Times are triton.testing.do_bench medians. "saved" = bytes per token kept
for backward, parameters (and views of them) excluded.
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import triton

SHAPES = {"30b-a3b": dict(H=2048, I=768, E=128, K=8), "235b-a22b": dict(H=4096, I=1536, E=128, K=8)}


def _routing(T, E, K, H, gen):
    router = torch.randn(E, H, device="cuda", generator=gen) * 0.02
    x = torch.randn(T, H, device="cuda", generator=gen)
    probs = torch.softmax(x @ router.t(), dim=-1, dtype=torch.float32)
    weights, index = probs.topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x.bfloat16(), index, weights.bfloat16()


def _implementations(kernel, shape, which):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    impls = {}
    if "fused" in which:
        impls["qwen3-moe-fused"] = lambda x, idx, w, w1, w2: kernel.moe_experts(x, idx, w, w1, w2)
    for name in ("grouped_mm", "eager"):
        if name in which:
            cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                                 num_experts_per_tok=shape["K"], experts_implementation=name)
            module = Qwen3MoeExperts(cfg).to("cuda", torch.bfloat16)

            def run(x, idx, w, w1, w2, module=module):
                module.gate_up_proj, module.down_proj = w1, w2  # same Parameters as the others
                return module(x, idx, w)

            impls[f"transformers {name}"] = run
    if "liger" in which:
        try:
            from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

            impls["liger fused_moe"] = lambda x, idx, w, w1, w2: LigerFusedMoEFunction.apply(x, w1, w2, idx.int(), w)
        except ImportError as err:
            print(f"liger-kernel not available: {err}", file=sys.stderr)
    return impls


def _lora_implementations(kernel, shape, rank, w1, w2, gen):
    """({name: fn(x, index, weights)}, LoRA parameters): stock PEFT and ours on one PEFT-wrapped experts module."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    holder = torch.nn.Module()
    cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                         num_experts_per_tok=shape["K"], experts_implementation="grouped_mm")
    holder.experts = Qwen3MoeExperts(cfg).to("cuda", torch.bfloat16)
    holder.experts.gate_up_proj = torch.nn.Parameter(w1.detach(), requires_grad=False)
    holder.experts.down_proj = torch.nn.Parameter(w2.detach(), requires_grad=False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank,
                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]), holder)
    lora = [p for n, p in holder.named_parameters() if "lora_" in n]
    with torch.no_grad():  # B starts at zero; give the adapters values
        for p in lora:
            p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * 0.02)

    def fused(x, index, weights):
        experts, factors = kernel.layers.peft_experts_lora(holder.experts)
        return kernel.moe_experts(x, index, weights, experts.gate_up_proj, experts.down_proj, lora=factors)

    impls = {f"qwen3-moe-fused LoRA r{rank}": fused,
             f"PEFT LoRA r{rank} (grouped_mm)": lambda x, index, weights: holder.experts(x, index, weights)}
    return impls, lora


def _saved_bytes_per_token(fn, args, params, T):
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    seen, total = set(), 0
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / T


def _bench(fn, args, grad_inputs, dout):
    fwd = triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")
    fwd_bwd = triton.testing.do_bench(
        lambda: fn(*args).backward(dout), warmup=25, rep=200, grad_to_none=grad_inputs, return_mode="median"
    )
    for t in grad_inputs:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args).backward(dout)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in grad_inputs:
        t.grad = None
    return fwd, fwd_bwd, peak


def _profile(fn, args, grad_inputs, dout, label):
    """CUDA time per kernel over one fwd+bwd (after warm-up), largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn(*args).backward(dout)
        for t in grad_inputs:
            t.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args).backward(dout)
        torch.cuda.synchronize()
    for t in grad_inputs:
        t.grad = None
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"\nper-kernel CUDA time, one fwd+bwd of {label}: {total / 1e3:.2f} ms")
    for e in events[:14]:
        print(f"  {e.device_time_total / 1e3:7.3f} ms  x{e.count:<3d} {e.key[:90]}")


def _dense_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def _environment():
    import transformers

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "driver": driver, "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build", help="kernel build folder (qwen3-moe-fused build)")
    parser.add_argument("--out", default="results.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES))
    parser.add_argument("--impls", nargs="+", default=["fused", "grouped_mm", "liger", "eager"])
    parser.add_argument("--eager-tokens", type=int, default=4096, help="the one T at which the eager loop runs")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of each timed fwd+bwd")
    parser.add_argument("--lora-rank", type=int, default=0, help="also time LoRA of this rank on frozen experts")
    args = parser.parse_args()

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    shape = SHAPES[args.shape]
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    env = _environment()
    env["dense_bf16_tflops"] = round(_dense_tflops(), 1)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for T in args.tokens:
        x, index, weights = _routing(T, E, K, H, gen)
        w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * 0.02).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda", generator=gen) * 0.02).bfloat16()
        leaves = [t.requires_grad_() for t in (x, weights, torch.nn.Parameter(w1), torch.nn.Parameter(w2))]
        x, weights, w1, w2 = leaves
        dout = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        runs = [("full", fn, (x, index, weights, w1, w2), leaves, (w1, w2), 18)
                for fn in _implementations(kernel, shape, args.impls).items()]
        if args.lora_rank:
            lora_impls, lora = _lora_implementations(kernel, shape, args.lora_rank, w1, w2, gen)
            runs += [(f"lora r{args.lora_rank}", fn, (x, index, weights), [x, weights, *lora], (w1, w2, *lora), 12)
                     for fn in lora_impls.items()]
        reference = {}
        for mode, (name, fn), call, grad_inputs, params, flop_factor in runs:
            if name == "transformers eager" and T != args.eager_tokens:
                continue
            row = {"impl": name, "mode": mode, "T": T, **{k: shape[k] for k in "HIEK"}}
            try:
                with torch.no_grad():
                    out = fn(*call).float()
                first = reference.setdefault(mode, out)
                row["rel_err_vs_first"] = ((out - first).norm() / first.norm()).item()
                fwd, fwd_bwd, peak = _bench(fn, call, grad_inputs, dout)
                flops = T * K * H * I
                row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=6 * flops / fwd / 1e9,
                           fwd_bwd_tflops=flop_factor * flops / fwd_bwd / 1e9, peak_extra_mib=peak,
                           saved_bytes_per_token=_saved_bytes_per_token(fn, call, params, T))
                if args.profile:
                    _profile(fn, call, grad_inputs, dout, f"{name} at T={T}")
            except Exception as err:  # one implementation failing must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    print(f"\n{env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}; dense bf16 matmul {env['dense_bf16_tflops']} TFLOP/s")
    print("| impl | T | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | peak extra MiB | saved KiB/token | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['T']} | error: {r['error'][:80]} |")
        else:
            print(f"| {r['impl']} | {r['T']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | "
                  f"{r['peak_extra_mib']:.0f} | {r['saved_bytes_per_token'] / 1024:.1f} | {r['rel_err_vs_first']:.1e} |")


if __name__ == "__main__":
    main()
