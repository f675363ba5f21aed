"""bf16 accuracy of each implementation against the float32 reference, Qwen3-30B-A3B shapes, on the GPU.

    python benchmarks/accuracy.py --build build [--tokens 1 7 4096 16384] [--impls fused grouped_mm liger]
        [--lora-rank 16] [--out accuracy.json]
    TRITON_INTERPRET=1 python benchmarks/accuracy.py --device cpu --dtype float16 --shape small --tokens 64 256 \
        --impls fused grouped_mm --lora-rank 8   # the same comparison without a GPU, in float16

Relative error ‖got − ref‖/‖ref‖ of the output and of the gradients w.r.t. x, top_k_weights, gate_up_proj
and down_proj; ref = this package's reference in float32 on the same (bf16-rounded) inputs. With --lora-rank r,
also LoRA on frozen experts (ours and stock PEFT on grouped_mm): the output and the gradients w.r.t. x,
top_k_weights and the four LoRA factors; ref = stock PEFT in float32 on the same (bf16-rounded) inputs and factors.
"""

import argparse
import json
import os
from pathlib import Path

import torch

import bench_experts
from bench_experts import SHAPES, _implementations, _lora_implementations, _routing

NAMES = ("out", "d_x", "d_top_k_weights", "d_gate_up_proj", "d_down_proj")
LORA_NAMES = ("out", "d_x", "d_top_k_weights", "d_gate_up_A", "d_gate_up_B", "d_down_A", "d_down_B")


def _errors(names, got, ref):
    return {n: ((g.float() - r).norm() / r.norm()).item() for n, g, r in zip(names, got, ref)}


def _lora_rows(kernel, shape, rank, T, x, index, weights, w1, w2, dout, gen):
    """Ours and stock PEFT in bf16 vs stock PEFT in float32, on the same PEFT-wrapped experts module."""
    impls, _, holder = _lora_implementations(kernel, shape, rank, w1, w2, gen)
    factors, module = {}, holder.experts
    while hasattr(module, "parameter_name"):  # PEFT's ParamWrapper chain, one per targeted parameter
        factors[module.parameter_name] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
        module = module.base_layer
    lora = [*factors["gate_up_proj"], *factors["down_proj"]]
    holder.float()
    leaves = [x.float().requires_grad_(), weights.float().requires_grad_()]
    ref_out = holder.experts(leaves[0], index, leaves[1])
    ref = (ref_out, *torch.autograd.grad(ref_out, leaves + lora, dout))
    holder.to(bench_experts.DTYPE)
    rows = []
    for name, fn in impls.items():
        leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_()]
        out = fn(leaves[0], index, leaves[1])
        got = (out, *torch.autograd.grad(out, leaves + lora, dout.to(bench_experts.DTYPE)))
        rows.append({"impl": name, "T": T, **_errors(LORA_NAMES, got, ref)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 4096, 16384])
    parser.add_argument("--impls", nargs="+", default=["fused", "grouped_mm", "liger"],
                        help="Liger's first call compiles and autotunes for minutes on a cold Triton cache")
    parser.add_argument("--lora-rank", type=int, default=0, help="also LoRA of this rank on frozen experts")
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", help="cpu: the kernels in Triton's interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="float16 on cpu: the interpreter's bfloat16 dot is broken")
    parser.add_argument("--out", default="accuracy.json")
    args = parser.parse_args()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu needs TRITON_INTERPRET=1 (without it the kernel runs its torch reference on CPU)")
    bench_experts.DEVICE, bench_experts.DTYPE = args.device, getattr(torch, args.dtype)

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    shape = SHAPES[args.shape]
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    dtype, gen = bench_experts.DTYPE, torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for T in args.tokens:
        x, index, weights = _routing("uniform", T, E, K, H, gen)
        w1 = (torch.randn(E, 2 * I, H, device=args.device, generator=gen) * 0.02).to(dtype)
        w2 = (torch.randn(E, H, I, device=args.device, generator=gen) * 0.02).to(dtype)
        dout = torch.randn(T, H, device=args.device, generator=gen)
        ref_leaves = [t.float().requires_grad_() for t in (x, weights, w1, w2)]
        ref_out = kernel.reference.moe_experts(ref_leaves[0], index, ref_leaves[1], ref_leaves[2], ref_leaves[3])
        ref = (ref_out, *torch.autograd.grad(ref_out, ref_leaves, dout))
        for name, fn in _implementations(kernel, shape, args.impls).items():
            leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_(), torch.nn.Parameter(w1.clone()),
                      torch.nn.Parameter(w2.clone())]
            out = fn(leaves[0], index, leaves[1], leaves[2], leaves[3])
            got = (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))
            rows.append({"impl": name, "T": T, **_errors(NAMES, got, ref)})
            print(json.dumps(rows[-1]), flush=True)
        if args.lora_rank:
            rows += _lora_rows(kernel, shape, args.lora_rank, T, x, index, weights, w1, w2, dout, gen)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    for names in (NAMES, LORA_NAMES):
        chosen = [r for r in rows if set(r) == {"impl", "T", *names}]
        if chosen:
            print("\n| impl | T | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
            for r in chosen:
                print(f"| {r['impl']} | {r['T']} | " + " | ".join(f"{r[n]:.1e}" for n in names) + " |")


if __name__ == "__main__":
    main()
