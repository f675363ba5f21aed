"""bf16 accuracy of each implementation against the float32 reference, Qwen3-30B-A3B shapes, on the GPU.

    python benchmarks/accuracy.py --build build [--tokens 1 7 4096 16384] [--out accuracy.json]

Relative error ‖got − ref‖/‖ref‖ of the output and of the gradients w.r.t. x, top_k_weights, gate_up_proj
and down_proj; ref = this package's reference in float32 on the same (bf16-rounded) inputs.
"""

import argparse
import json
from pathlib import Path

import torch

from bench_experts import SHAPES, _implementations, _routing

NAMES = ("out", "d_x", "d_top_k_weights", "d_gate_up_proj", "d_down_proj")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 7, 4096, 16384])
    parser.add_argument("--out", default="accuracy.json")
    args = parser.parse_args()

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    shape = SHAPES["30b-a3b"]
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for T in args.tokens:
        x, index, weights = _routing("uniform", T, E, K, H, gen)
        w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * 0.02).bfloat16()
        w2 = (torch.randn(E, H, I, device="cuda", generator=gen) * 0.02).bfloat16()
        dout = torch.randn(T, H, device="cuda", generator=gen)
        ref_leaves = [t.float().requires_grad_() for t in (x, weights, w1, w2)]
        ref_out = kernel.reference.moe_experts(ref_leaves[0], index, ref_leaves[1], ref_leaves[2], ref_leaves[3])
        ref = (ref_out, *torch.autograd.grad(ref_out, ref_leaves, dout))
        for name, fn in _implementations(kernel, shape, ["fused", "grouped_mm", "liger"]).items():
            leaves = [x.clone().requires_grad_(), weights.clone().requires_grad_(), torch.nn.Parameter(w1.clone()),
                      torch.nn.Parameter(w2.clone())]
            out = fn(leaves[0], index, leaves[1], leaves[2], leaves[3])
            got = (out, *torch.autograd.grad(out, leaves, dout.bfloat16()))
            errors = {n: ((g.float() - r).norm() / r.norm()).item() for n, g, r in zip(NAMES, got, ref)}
            rows.append({"impl": name, "T": T, **errors})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| impl | T | " + " | ".join(NAMES) + " |\n|---|---|" + "---|" * len(NAMES))
    for r in rows:
        print(f"| {r['impl']} | {r['T']} | " + " | ".join(f"{r[n]:.1e}" for n in NAMES) + " |")


if __name__ == "__main__":
    main()
