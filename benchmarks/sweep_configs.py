"""Launch-configuration sweep on the GPU: per-kernel CUDA time, fwd+bwd time and compiled resources per config.

    python benchmarks/sweep_configs.py --build build [--tokens 4096 16384] [--kinds dgrad wgrad] [--out sweep.json]
    python benchmarks/sweep_configs.py --build build --nf4 [--tokens 2048] [--kinds gate_up_4bit grouped_gemm_4bit]

Coordinate descent over the kernel kinds of tuning.CANDIDATES (and the M-tile height): for each kind in turn,
each candidate below runs with the other kinds at their current best; it is checked against the default
configs' output and gradients (relative error < 1e-2 in bf16), timed per kernel (CUDA time of each Triton
kernel from the profiler, mean of three fwd+bwd, summed over the token counts) and end to end (do_bench median
of fwd+bwd), and the one with the least CUDA time in the Triton kernels is kept. (The end-to-end medians moved
by up to 15 % between identical configs in one run on the H100, 2026-11-25; the profiler sums by under 2 %.)
Last: registers, spills and shared memory of every compiled variant (the compiler's report: spills point at an
epilogue that does not fit), then the summary. Winners become the defaults (first entries) of
tuning.CANDIDATES, with a note in benchmarks/NOTES.md. Inputs as in bench_experts.py.
--nf4: the QLoRA layer instead: experts frozen in NF4 (nested scales, bitsandbytes' quantize_4bit), LoRA r16 on
both projections (the gradients are those of the input, the routing weights and the factors), and the kinds
that read a 4-bit weight (dgrad's candidates are the same lists for both).
"""

import argparse
import json
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

from bench_experts import SHAPES, _environment, _routing

NKWS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def _configs(keys, rows):
    return [dict(zip(keys, row)) for row in rows]


CANDIDATES = {
    "dgrad": _configs(NKWS, [(64, 64, 8, 4), (64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4),
                             (128, 128, 16, 3), (128, 64, 16, 4), (256, 64, 16, 3)])
             + _configs(("BLOCK_M",) + NKWS, [(64, 64, 64, 8, 4), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3)]),
    "wgrad": _configs(("BLOCK_M",) + NKWS, [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                                            (256, 128, 64, 8, 3), (128, 128, 128, 8, 2), (128, 128, 32, 8, 6),
                                            (64, 128, 64, 4, 4), (256, 128, 64, 16, 3), (128, 256, 64, 16, 3)]),
    "gate_up": _configs(NKWS, [(128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 16, 3), (64, 64, 8, 4),
                               (64, 128, 4, 3)]),
    "grouped_gemm": _configs(NKWS, [(256, 64, 8, 4), (256, 64, 8, 3), (128, 64, 8, 4), (256, 64, 16, 3),
                                    (128, 128, 8, 3)]),
    "gate_up_4bit": _configs(NKWS, [(128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 4), (64, 64, 8, 3),
                                    (64, 64, 8, 4), (128, 64, 4, 3), (64, 128, 8, 3)]),
    "grouped_gemm_4bit": _configs(NKWS, [(64, 64, 4, 4), (128, 64, 8, 4), (64, 64, 8, 4), (64, 64, 4, 3),
                                         (128, 64, 4, 4), (64, 128, 4, 3)]),
    "block_m": [128, 64],
}
DENSE_KINDS = ("dgrad", "wgrad", "gate_up", "grouped_gemm", "block_m")
NF4_KINDS = ("gate_up_4bit", "grouped_gemm_4bit", "dgrad", "block_m")
KERNELS = {"gate_up": "gate_up_swiglu_kernel", "grouped_gemm": "grouped_gemm_kernel",
           "dgrad": "down_dgrad_dswiglu_kernel", "wgrad": "expert_wgrad_", "combine": "combine_kernel"}  # name prefixes


def _per_kernel_ms(step, leaves):
    """CUDA milliseconds of one ``step()`` per kernel kind (profiler), plus 'other' for the torch ops. Gradients
    are cleared between steps, so no accumulation kernel is counted."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
            for t in leaves:
                t.grad = None
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_time_total <= 0:
            continue
        kind = next((k for k, name in KERNELS.items() if event.key.startswith(name)), "other")
        times[kind] = times.get(kind, 0.0) + event.device_time_total / 1e3 / 3
    return times


def _resources(kernel):
    """One line per compiled variant of each Triton kernel: block sizes, warps, stages, registers, spills, smem."""
    lines = []
    for module_name in ("gate_up_swiglu", "grouped_gemm", "down_dgrad_dswiglu", "expert_wgrad", "combine"):
        module = getattr(kernel.kernels, module_name)
        caches = [cache for name in dir(module) if name.endswith("_kernel")
                  for cache in getattr(module, name).device_caches.values()]
        for cache in caches:
            for compiled in cache[0].values():
                src = compiled.src
                named = {src.fn.arg_names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
                shown = {k: v for k, v in named.items() if k.startswith(("BLOCK", "LORA_R", "GATHER", "STORE"))}
                meta = compiled.metadata
                try:
                    compiled._init_handles()  # loads the binary: registers and spills are known from here on
                except OutOfResources:  # a candidate that does not fit (reported above)
                    lines.append(f"{src.fn.__name__:32s} {shown} warps {meta.num_warps} stages {meta.num_stages} "
                                 f"does not fit: smem {meta.shared // 1024} KiB")
                    continue
                lines.append(f"{src.fn.__name__:32s} {shown} warps {meta.num_warps} stages {meta.num_stages} "
                             f"regs {compiled.n_regs} spills {compiled.n_spills} smem {meta.shared // 1024} KiB")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--shape", default="30b-a3b", choices=sorted(SHAPES))
    parser.add_argument("--kinds", nargs="+", choices=list(CANDIDATES),
                        help="default: all the kinds of the mode (dense, or --nf4)")
    parser.add_argument("--nf4", action="store_true", help="frozen NF4 experts with LoRA r16 (needs bitsandbytes)")
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()
    args.kinds = args.kinds or list(NF4_KINDS if args.nf4 else DENSE_KINDS)

    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    ops, tuning = kernel.ops, kernel.tuning
    shape = SHAPES[args.shape]
    H, I, E, K = shape["H"], shape["I"], shape["E"], shape["K"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    problems = []
    for T in args.tokens:
        x, index, weights = _routing("uniform", T, E, K, H, gen)
        w1 = torch.nn.Parameter((torch.randn(E, 2 * I, H, device="cuda", generator=gen) * 0.02).bfloat16())
        w2 = torch.nn.Parameter((torch.randn(E, H, I, device="cuda", generator=gen) * 0.02).bfloat16())
        dout = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        if args.nf4:
            import bitsandbytes.functional as bnb

            frozen = [kernel.weights4bit.from_bnb(*bnb.quantize_4bit(w.detach(), blocksize=64, quant_type="nf4",
                                                                     compress_statistics=True)) for w in (w1, w2)]
            factors = [(torch.randn(*dims, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
                       for dims in ((E, 16, H), (E, 2 * I, 16), (E, 16, I), (E, H, 16))]
            lora = kernel.ExpertsLora(*factors, gate_up_scale=2.0, down_scale=2.0)
            problems.append(([x.requires_grad_(), weights.requires_grad_(), *factors], index, dout, frozen, lora))
        else:
            problems.append(([x.requires_grad_(), weights.requires_grad_(), w1, w2], index, dout, None, None))

    chosen = {kind: tuning.CANDIDATES[kind][0] for kind in CANDIDATES if kind in tuning.CANDIDATES}  # defaults
    block_m = {"value": None}  # None: tuning.block_m_for's own choice
    original_block_m_for = ops.block_m_for

    def use_block_m(value):
        block_m["value"] = value
        ops.block_m_for = original_block_m_for if value is None else (lambda rows, experts: value)

    def experts(leaves, index, frozen, lora):
        if frozen is None:
            return kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3])
        return kernel.moe_experts(leaves[0], index, leaves[1], *frozen, lora=lora)

    def run(problem):
        leaves, index, dout, frozen, lora = problem
        with tuning.forced(**chosen):
            out = experts(leaves, index, frozen, lora)
            out.backward(dout)
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return [out.detach(), *grads]

    reference = [run(p) for p in problems]

    def measure():
        """(Triton kernels' CUDA ms, end-to-end ms, CUDA ms per kernel kind), summed over the token counts."""
        total, per_kernel = 0.0, {}
        for problem, ref in zip(problems, reference):
            for got, want in zip(run(problem), ref):
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                assert err < 1e-2, f"relative error {err:.2e} against the default configs"
            leaves, index, dout, frozen, lora = problem

            def step():
                with tuning.forced(**chosen):
                    experts(leaves, index, frozen, lora).backward(dout)

            total += triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
            for t in leaves:
                t.grad = None
            for kind, ms in _per_kernel_ms(step, leaves).items():
                per_kernel[kind] = per_kernel.get(kind, 0.0) + ms
        return sum(ms for kind, ms in per_kernel.items() if kind != "other"), total, per_kernel

    log = []
    best, total, per_kernel = measure()
    print(f"start: kernels {best:.3f} ms, end to end {total:.3f} ms (sums over T={args.tokens}) "
          + json.dumps({k: round(v, 3) for k, v in per_kernel.items()}), flush=True)
    for kind in args.kinds:
        best_config = block_m["value"] if kind == "block_m" else chosen[kind]
        for config in CANDIDATES[kind]:
            if kind == "block_m":
                use_block_m(config)
            else:
                chosen[kind] = config
            try:
                ms, total, per_kernel = measure()
            except Exception as err:  # e.g. out of shared memory, or a config that computes wrong results
                print(f"{kind} {config}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            log.append({"kernel": kind, "config": config, "kernels_ms": ms, "end_to_end_ms": total,
                        "per_kernel_ms": per_kernel})
            own = per_kernel.get(kind.removesuffix("_4bit"), 0.0)  # a 4-bit kind's kernel is the dense one's
            print(f"{kind} {config}: kernels {ms:.3f} ms ({kind} {own:.3f}), end to end "
                  f"{total:.3f} ms", flush=True)
            if ms < best:
                best, best_config = ms, config
        if kind == "block_m":
            use_block_m(best_config)
        else:
            chosen[kind] = best_config
    resources = _resources(kernel)
    print("\ncompiled variants:\n" + "\n".join(resources))
    print(f"\nbest: kernels {best:.3f} ms; block_m {block_m['value'] or 'block_m_for default'}\n"
          + "\n".join(f"  {k}: {v}" for k, v in chosen.items()))
    Path(args.out).write_text(json.dumps({"environment": _environment(), "tokens": args.tokens, "shape": args.shape,
                                          "log": log, "best_kernels_ms": best, "best": chosen,
                                          "block_m": block_m["value"], "resources": resources}, indent=1))


if __name__ == "__main__":
    main()
