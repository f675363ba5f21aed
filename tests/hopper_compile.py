"""Compile every Triton launch of one experts fwd+bwd for Hopper (sm_90) without a GPU; prints one JSON line.

    python tests/hopper_compile.py BUILD_DIR

(run without TRITON_INTERPRET: the kernels must be Triton JIT functions). Each launch the ops make — LoRA r16 on
bf16 experts at the defaults (``CANDIDATES[kind][0]``), and on NF4 experts (nested scales) at every candidate
of the kinds that read a 4-bit weight — is bound, specialised and compiled as Triton's own launcher would on an
H100/H200 (``triton.compile`` for target cuda:90, ptxas included), but not run: CPU tensors stand in for the
inputs, so nothing is computed. Reported per compile: the kernel, whether it reads a 4-bit weight, the kind and
candidate index, its shared memory, or the compiler's error. The interpreter (the CPU tests) accepts programs
the GPU compiler rejects; this is what catches those.
"""

import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
KINDS_4BIT = ("gate_up_4bit", "grouped_gemm_4bit", "dgrad")  # the kinds whose launches read a 4-bit weight


def main(build):
    import kernels

    moe = kernels.get_local_kernel(Path(build))
    ops, tuning, weights4bit = moe.ops, moe.tuning, moe.weights4bit
    backend = make_backend(TARGET)
    launches = []  # (JIT function, args, kwargs, label)
    label = {}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, dict(label)))

    JITFunction.run = record  # every launch is recorded, none runs
    E, T, K, H, I, R = 4, 512, 8, 2048, 768, 16
    gen = torch.Generator().manual_seed(0)

    def nf4(shape):  # bitsandbytes' storage layout (values are irrelevant: nothing runs)
        n = shape[0] * shape[1] * shape[2]
        blocks = n // 64
        return weights4bit.Weight4bit(
            packed=torch.randint(0, 255, (n // 2,), dtype=torch.uint8, generator=gen),
            absmax=torch.randint(0, 255, (blocks,), dtype=torch.uint8, generator=gen), code=torch.randn(16),
            shape=shape, dtype=torch.bfloat16, blocksize=64, absmax2=torch.rand(-(-blocks // 256)),
            code2=torch.randn(256), offset=torch.tensor(0.01), blocksize2=256)

    def step(w1, w2):
        x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
        w = torch.rand(T, K, dtype=torch.bfloat16, requires_grad=True)
        index = torch.rand(T, E).topk(min(K, E), dim=-1).indices.repeat(1, K // min(K, E))
        factors = [torch.randn(*s, dtype=torch.bfloat16, requires_grad=True)
                   for s in ((E, R, H), (E, 2 * I, R), (E, R, I), (E, H, R))]
        block_m = ops.block_m_for(T * K, E)
        routing = ops.route(index, E, block_m)  # its kernels do not run either: give it in-range values
        for t in routing:
            t.copy_(torch.arange(t.numel()) % t.numel() if t.numel() == T * K else torch.zeros_like(t))
        operands = [(weights4bit.stacked(q)[0], ops.q_list(q), [q.blocksize, q.blocksize2])
                    if isinstance(q, weights4bit.Weight4bit) else (q, [], [64, 256]) for q in (w1, w2)]
        (a, a_q, a_b), (b, b_q, b_b) = operands
        out = ops.experts(x, w, a, b, *routing, block_m, *factors, 2.0, 2.0, a_q, b_q, a_b + b_b)[0]
        out.backward(torch.randn(T, H, dtype=torch.bfloat16))

    dense = [torch.randn(E, 2 * I, H, dtype=torch.bfloat16), torch.randn(E, H, I, dtype=torch.bfloat16)]
    label.update(weights="bf16", candidate=0)
    with moe.launch.jit_path():  # every launch through JITFunction.run, which records it (no launch plans)
        with tuning.forced(**{kind: configs[0] for kind, configs in tuning.CANDIDATES.items()}):
            step(*dense)
        quantized = [nf4((E, 2 * I, H)), nf4((E, H, I))]
        for i in range(max(len(tuning.CANDIDATES[kind]) for kind in KINDS_4BIT)):
            label.update(weights="nf4", candidate=i)
            configs = {kind: c[min(i, len(c) - 1)] for kind, c in tuning.CANDIDATES.items()}
            with tuning.forced(**configs):
                step(*quantized)

    results, seen = [], set()
    for fn, args, kwargs, where in launches:
        bound_args, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
            *args, **kwargs)
        w4bit = bool(bound_args.get("W4BIT", False))
        if where["weights"] == "nf4" and not w4bit:
            continue  # the 4-bit pass is about the launches that read the 4-bit weight
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (fn.fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())),
               str(sorted(options.__dict__.items())))
        if key in seen:
            continue
        seen.add(key)
        row = dict(kernel=fn.fn.__name__, w4bit=w4bit, k_contig=bool(bound_args.get("W4_K_CONTIG", False)),
                   candidate=where["candidate"],
                   blocks={k: v for k, v in bound_args.items() if k.startswith("BLOCK_")},
                   num_warps=options.num_warps, num_stages=options.num_stages)
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
            row["shared"] = compiled.metadata.shared
        except Exception as err:  # report every failure, not only the first
            row["error"] = f"{type(err).__name__}: {err}"[-1500:]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
