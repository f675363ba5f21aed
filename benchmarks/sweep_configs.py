"""Coordinate sweep of the kernels' launch configurations (tuning.CANDIDATES and the M-tile height) on the GPU.

    python benchmarks/sweep_configs.py --build build [--tokens 4096 16384]

For each kernel in turn, tries its candidate configurations with the others at their current best and keeps
the fastest by fwd+bwd median over the given token counts (summed); prints every measurement and the final
table, whose winners become the defaults (first entries) of tuning.CANDIDATES with a note in benchmarks/NOTES.md.
Where the autotuner picks the fastest config per kernel, this sweep ranks them by the end-to-end fwd+bwd time.
Inputs as in bench_experts.py.
"""

import argparse
import json
from pathlib import Path

import torch
import triton

from bench_experts import SHAPES, _routing


def _configs(keys, rows):
    return [dict(zip(keys, row)) for row in rows]


NKWS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
CANDIDATES = {
    "block_m": [64, 128],
    "gate_up": _configs(NKWS, [(128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 5), (256, 64, 8, 3), (128, 32, 8, 5),
                               (64, 64, 8, 4), (128, 128, 8, 3)]),
    "grouped_gemm": _configs(NKWS, [(256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 4), (256, 64, 16, 3),
                                    (128, 64, 8, 4), (256, 128, 8, 2)]),
    "dgrad": _configs(NKWS, [(128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 5), (256, 64, 8, 3), (128, 128, 8, 3),
                             (64, 64, 8, 4)]),
    "wgrad": _configs(("BLOCK_M",) + NKWS, [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 4),
                                            (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES))
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    ops = kernel.ops
    shape = SHAPES[args.shape]
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    problems = []
    for T in args.tokens:
        x, index, weights = _routing("uniform", T, E, K, H, gen)
        w1 = torch.nn.Parameter((torch.randn(E, 2 * I, H, device="cuda", generator=gen) * 0.02).bfloat16())
        w2 = torch.nn.Parameter((torch.randn(E, H, I, device="cuda", generator=gen) * 0.02).bfloat16())
        leaves = [x.requires_grad_(), weights.requires_grad_(), w1, w2]
        problems.append((leaves, index, torch.randn(T, H, device="cuda", generator=gen).bfloat16()))
    reference = [kernel.moe_experts(p[0][0], p[1], p[0][1], p[0][2], p[0][3]).detach() for p in problems]

    def measure():
        total = 0.0
        for (leaves, index, dout), ref in zip(problems, reference):
            with kernel.tuning.forced(**chosen):
                out = kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3])
            assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2  # still correct
            with kernel.tuning.forced(**chosen):
                total += triton.testing.do_bench(
                    lambda: kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3]).backward(dout),
                    warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
        return total

    log = []
    best = measure()
    print(f"start: {best:.3f} ms (sum over T={args.tokens})", flush=True)
    block_m = None  # None: ops.block_m_for's choice
    original_block_m_for = ops.block_m_for
    for kind, candidates in CANDIDATES.items():
        best_config = block_m if kind == "block_m" else chosen[kind]
        for config in candidates:
            if kind == "block_m":
                ops.block_m_for = lambda rows, experts, m=config: m
            else:
                chosen[kind] = config
            try:
                ms = measure()
            except Exception as err:  # e.g. out of shared memory
                print(f"{kind} {config}: {type(err).__name__}", flush=True)
                continue
            log.append({"kernel": kind, "config": config, "ms": ms})
            print(f"{kind} {config}: {ms:.3f} ms", flush=True)
            if ms < best:
                best, best_config = ms, config
        if kind == "block_m":
            block_m = best_config
            ops.block_m_for = original_block_m_for if block_m is None else (lambda rows, experts, m=block_m: m)
        else:
            chosen[kind] = best_config
    print(f"block_m: {block_m if block_m is not None else 'block_m_for default'}")
    print(f"\nbest: {best:.3f} ms\n" + "\n".join(f"  {k}: {v}" for k, v in chosen.items()))
    Path(args.out).write_text(json.dumps({"log": log, "best_ms": best, "best": chosen, "block_m": block_m}, indent=1))

if __name__ == "__main__":
    main()
