"""Qwen3-MoE experts, forward and forward+backward, every implementation side by side in one GPU run.

    python benchmarks/bench_experts.py --build build --out results.json \
        [--shapes 30b-a3b 235b-a22b] [--tokens 1024 4096 16384 32768] [--routings uniform zipf hot30] [--lora-rank 16]

(with the plugin importable: pip install -e ./patch, or PYTHONPATH=patch as gpu_session.sh sets it)

Each implementation gets the same inputs (bf16, x ~ N(0,1), weights ~ N(0,0.02)) and computes
out = experts(x, top_k_index, top_k_weights); fwd+bwd also takes gradients w.r.t. x, top_k_weights and both
expert weights (full fine-tuning, TFLOP/s counting 6·T·K·H·I fwd and 18·T·K·H·I fwd+bwd). Routings: uniform =
a random router (fp32 softmax -> top-k -> renormalised, as Qwen3's norm_topk_prob); zipf = K distinct experts
per token drawn with P(e) ∝ 1/(e+1); hot30 = 30 % of the tokens send one slot to expert 0, the rest uniform.
With --lora-rank r, LoRA rows follow: stock PEFT (target_parameters on transformers' experts, grouped_mm) and
ours reading the same PEFT modules, experts frozen, gradients w.r.t. x, top_k_weights and the LoRA factors
(TFLOP/s counting 12·T·K·H·I, the frozen-experts work). Times are triton.testing.do_bench medians after one
untimed fwd+bwd (compilation, autotuning). "saved" = bytes per token kept for backward, parameters (and views of
them) excluded. The results JSON and a CSV beside it hold the environment (date, device, driver, versions, the
dense bf16 matmul rate of this run) and one row per (shape, T, routing, implementation).
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import triton

SHAPES = {"30b-a3b": dict(H=2048, I=768, E=128, K=8), "235b-a22b": dict(H=4096, I=1536, E=128, K=8),
          "small": dict(H=128, I=64, E=8, K=2)}  # small: for Triton's interpreter (accuracy.py --device cpu)
# Where and in which dtype the inputs live; accuracy.py --device cpu --dtype float16 changes them (the
# interpreter's bfloat16 dot is broken).
DEVICE, DTYPE = "cuda", torch.bfloat16


ROUTINGS = ("uniform", "zipf", "hot30")


def _routing(kind, T, E, K, H, gen):
    """(x [T, H], top_k_index [T, K], top_k_weights [T, K]) in DTYPE for routing ``kind``."""
    x = torch.randn(T, H, device=DEVICE, generator=gen)
    router = torch.randn(E, H, device=DEVICE, generator=gen) * 0.02
    probs = torch.softmax(x @ router.t(), dim=-1, dtype=torch.float32)
    if kind == "zipf":
        zipf = 1.0 / torch.arange(1, E + 1, device=DEVICE, dtype=torch.float32)
        index = torch.multinomial(zipf.expand(T, E).contiguous(), K, replacement=False, generator=gen)
    elif kind == "hot30":
        index = probs.topk(K, dim=-1).indices
        hot = torch.rand(T, device=DEVICE, generator=gen) < 0.3
        has_zero = (index == 0).any(-1)
        index[hot & ~has_zero, K - 1] = 0  # the token's last slot goes to expert 0 (slots stay distinct)
    else:
        index = probs.topk(K, dim=-1).indices
    weights = probs.gather(1, index)
    weights = weights / weights.sum(-1, keepdim=True)
    return x.to(DTYPE), index, weights.to(DTYPE)


def _implementations(kernel, shape, which):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    impls = {}
    if "fused" in which:
        impls["qwen3-moe-fused"] = lambda x, idx, w, w1, w2: kernel.moe_experts(x, idx, w, w1, w2)
    # "module": ours as a patched model runs it, the experts module's call with experts implementation
    # "qwen3_moe_fused" (transformers' dispatch, then the kernel's layers.Qwen3MoeExperts.forward)
    for name, label in (("module", "qwen3-moe-fused (experts module)"), ("grouped_mm", "transformers grouped_mm"),
                        ("eager", "transformers eager")):
        if name in which:
            cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                                 num_experts_per_tok=shape["K"],
                                 experts_implementation=_fused_experts(kernel) if name == "module" else name)
            module = Qwen3MoeExperts(cfg).to(DEVICE, DTYPE)

            def run(x, idx, w, w1, w2, module=module):
                module.gate_up_proj, module.down_proj = w1, w2  # same Parameters as the others
                return module(x, idx, w)

            impls[label] = run
    if "liger" in which:
        try:
            from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

            impls["liger fused_moe"] = lambda x, idx, w, w1, w2: LigerFusedMoEFunction.apply(x, w1, w2, idx.int(), w)
        except ImportError as err:
            print(f"liger-kernel not available: {err}", file=sys.stderr)
    return impls


def _fused_experts(kernel):
    """transformers experts implementation "qwen3_moe_fused" on ``kernel`` (the plugin's registration)."""
    import qwen3_moe_patch

    return qwen3_moe_patch.register_experts_implementation(kernel=kernel)


def _lora_implementations(kernel, shape, rank, w1, w2, gen, nf4=False):
    """({name: fn(x, index, weights)}, LoRA parameters, the module): stock PEFT and ours on one PEFT-wrapped
    experts module; with ``nf4``, ours alone on the module with its experts in NF4 (nested scales, as
    ``quantize_4bit`` stores them: a frozen ``Tensor4bit`` the kernels dequantize as they load each tile)."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    holder = torch.nn.Module()
    cfg = Qwen3MoeConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], num_experts=shape["E"],
                         num_experts_per_tok=shape["K"], experts_implementation="grouped_mm")
    holder.experts = Qwen3MoeExperts(cfg).to(DEVICE, DTYPE)
    for name, w in (("gate_up_proj", w1), ("down_proj", w2)):
        if nf4:
            import bitsandbytes.functional as bnb

            w = kernel.Tensor4bit(kernel.weights4bit.from_bnb(*bnb.quantize_4bit(
                w.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)))
        setattr(holder.experts, name, torch.nn.Parameter(w.detach(), requires_grad=False))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank,
                                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]), holder)
    lora = [p for n, p in holder.named_parameters() if "lora_" in n]
    with torch.no_grad():  # B starts at zero; give the adapters values
        for p in lora:
            p.copy_(torch.randn(p.shape, device=DEVICE, generator=gen) * 0.02)

    fused_name = _fused_experts(kernel)

    def through(implementation):  # the same PEFT-wrapped module, run by one experts implementation or the other
        def run(x, index, weights):  # ours called as the patched block calls its experts, PEFT's as its block does
            cfg._experts_implementation = implementation
            if implementation == fused_name:
                return kernel.layers.call_experts(holder.experts, x, index, weights)
            return holder.experts(x, index, weights)
        return run

    if nf4:
        return {f"qwen3-moe-fused LoRA r{rank} (NF4 experts)": through(fused_name)}, lora, holder
    impls = {f"qwen3-moe-fused LoRA r{rank}": through(fused_name),
             f"PEFT LoRA r{rank} (grouped_mm)": through("grouped_mm")}
    return impls, lora, holder


def _plain(t):
    """The plain tensors holding ``t`` (a tensor subclass such as Tensor4bit: its inner tensors)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    return [inner for name in t.__tensor_flatten__()[0] for inner in _plain(getattr(t, name))]


def _saved_bytes_per_token(fn, args, params, T):
    param_storages = {q.untyped_storage().data_ptr() for p in params for q in _plain(p)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    seen, total = set(), 0
    for t in (q for s in saved for q in _plain(s)):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / T


def _bench(fn, args, grad_inputs, dout):
    fn(*args).backward(dout)  # compile and autotune outside the timed region
    for t in grad_inputs:
        t.grad = None
    fwd = triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")
    fwd_bwd = triton.testing.do_bench(
        lambda: fn(*args).backward(dout), warmup=25, rep=100, grad_to_none=grad_inputs, return_mode="median"
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
    """Date, device, driver and versions (the plugin's own record, as in its train.json)."""
    from qwen3_moe_patch.train import environment

    return environment("cuda")


FIELDS = ("shape", "routing", "impl", "mode", "T", "H", "I", "E", "K", "max_rows_per_expert", "fwd_ms", "fwd_bwd_ms",
          "fwd_tflops", "fwd_bwd_tflops", "fwd_bwd_vs_dense", "peak_extra_mib", "saved_bytes_per_token",
          "rel_err_vs_first", "error")


def _inputs(shape, routing, T, gen):
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    x, index, weights = _routing(routing, T, E, K, H, gen)
    w1 = (torch.randn(E, 2 * I, H, device=DEVICE, generator=gen) * 0.02).to(DTYPE)
    w2 = (torch.randn(E, H, I, device=DEVICE, generator=gen) * 0.02).to(DTYPE)
    leaves = [t.requires_grad_() for t in (x, weights, torch.nn.Parameter(w1), torch.nn.Parameter(w2))]
    dout = torch.randn(T, H, device=DEVICE, generator=gen).to(DTYPE)
    return leaves, index, dout


def _measure(row, fn, call, grad_inputs, params, flop_factor, dout, reference, dense, profile):
    T, H, I, K = row["T"], row["H"], row["I"], row["K"]
    try:
        with torch.no_grad():
            out = fn(*call).float()
        first = reference.setdefault(row["mode"], out)
        row["rel_err_vs_first"] = ((out - first).norm() / first.norm()).item()
        fwd, fwd_bwd, peak = _bench(fn, call, grad_inputs, dout)
        flops = T * K * H * I
        row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=6 * flops / fwd / 1e9,
                   fwd_bwd_tflops=flop_factor * flops / fwd_bwd / 1e9, peak_extra_mib=peak,
                   saved_bytes_per_token=_saved_bytes_per_token(fn, call, params, T))
        row["fwd_bwd_vs_dense"] = row["fwd_bwd_tflops"] / dense
        if profile:
            _profile(fn, call, grad_inputs, dout, f"{row['impl']} {row['shape']} {row['routing']} T={T}")
    except Exception as err:  # one implementation failing must not hide the others
        row["error"] = f"{type(err).__name__}: {err}"[:300]


def _write(path, env, rows, kernel):
    env["autotune_choices"] = [{"key": list(k), "config": c} for k, c in kernel.tuning._chosen.items()]
    out = Path(path)
    out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build", help="kernel build folder (qwen3-moe-fused build)")
    parser.add_argument("--out", default="results.json", help="results JSON; a CSV with the same rows is written beside")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--shapes", nargs="+", default=["30b-a3b", "235b-a22b"], choices=sorted(SHAPES))
    parser.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS)
    parser.add_argument("--impls", nargs="+", default=["fused", "module", "grouped_mm", "liger", "eager"],
                        help="fused = moe_experts; module = the experts module as a patched model calls it")
    parser.add_argument("--eager-at", default="30b-a3b:4096", help="SHAPE:T, the one size at which the eager loop runs")
    parser.add_argument("--profile-at", default="", help="SHAPE:T: per-kernel breakdown of our rows there (uniform)")
    parser.add_argument("--lora-rank", type=int, default=0, help="also time LoRA of this rank on frozen experts")
    parser.add_argument("--lora-nf4", action="store_true",
                        help="with --lora-rank: also ours on the experts in NF4 (QLoRA; needs bitsandbytes)")
    args = parser.parse_args()

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    env = _environment()
    env["dense_bf16_tflops"] = round(_dense_tflops(), 1)
    env["autotune"] = kernel.tuning.enabled()
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        impls = _implementations(kernel, shape, args.impls)
        for T in args.tokens:
            for routing in args.routings:
                leaves, index, dout = _inputs(shape, routing, T, gen)
                x, weights, w1, w2 = leaves
                runs = [("full", fn, (x, index, weights, w1, w2), leaves, (w1, w2), 18) for fn in impls.items()]
                if args.lora_rank:
                    lora_impls, lora, _ = _lora_implementations(kernel, shape, args.lora_rank, w1, w2, gen)
                    runs += [(f"lora r{args.lora_rank}", fn, (x, index, weights), [x, weights, *lora],
                              (w1, w2, *lora), 12) for fn in lora_impls.items()]
                if args.lora_rank and args.lora_nf4:
                    nf4_impls, nf4_lora, nf4_holder = _lora_implementations(kernel, shape, args.lora_rank, w1, w2,
                                                                            gen, nf4=True)
                    params = (*(p for p in nf4_holder.parameters() if not p.requires_grad), *nf4_lora)
                    runs += [(f"lora r{args.lora_rank} nf4", fn, (x, index, weights), [x, weights, *nf4_lora],
                              params, 12) for fn in nf4_impls.items()]
                counts = torch.bincount(index.flatten(), minlength=shape["E"])
                reference = {}
                for mode, (name, fn), call, grad_inputs, params, flop_factor in runs:
                    if name == "transformers eager" and f"{shape_name}:{T}" != args.eager_at:
                        continue
                    row = {"shape": shape_name, "routing": routing, "impl": name, "mode": mode, "T": T,
                           **{k: shape[k] for k in "HIEK"}, "max_rows_per_expert": int(counts.max())}
                    profile = (name.startswith("qwen3-moe-fused") and routing == "uniform"
                               and f"{shape_name}:{T}" == args.profile_at)
                    _measure(row, fn, call, grad_inputs, params, flop_factor, dout, reference,
                             env["dense_bf16_tflops"], profile)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write(args.out, env, rows, kernel)  # after every row: a run cut short keeps what it measured
                del leaves, x, weights, w1, w2, runs, reference
                torch.cuda.empty_cache()
    print(f"\n{env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}; dense bf16 matmul {env['dense_bf16_tflops']} TFLOP/s")
    print("| shape | routing | impl | T | fwd ms | fwd+bwd ms | TFLOP/s | peak MiB | saved KiB/tok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['shape']} | {r['routing']} | {r['impl']} | {r['T']} |"
        if "error" in r:
            print(f"{head} error: {r['error'][:80]} |")
        else:
            print(f"{head} {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | "
                  f"{r['peak_extra_mib']:.0f} | {r['saved_bytes_per_token'] / 1024:.1f} |")


if __name__ == "__main__":
    main()
