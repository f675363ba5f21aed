"""The host's Python per experts fwd+bwd, without a GPU: kernel builds side by side, launches stubbed.

    python benchmarks/host_python.py BUILD_A/torch-cpu BUILD_B/torch-cpu [--tokens 1024] [--rounds 5]

What it times: ``moe_experts`` forward and backward on CPU tensors (30b-a3b experts, float16, uniform routing; full
fine-tuning and LoRA r16 on frozen experts) through the kernel path the GPU takes — input checks, routing buffers,
the tuner (defaults: ``QWEN3_MOE_FUSED_AUTOTUNE=0``), the launch plans (``launch.py``: key, plan lookup), the
autograd Function — with each plan's compiled launcher replaced by a no-op. So nothing is computed and Triton's
C launcher and cuLaunchKernel (~15 µs a launch on the H200's host), CUDA's allocator and autograd's device-thread
handoff are not in it: it compares the Python of two builds, not host times. The builds load into one process
(each build's id is its own op namespace) and alternate ``--rounds`` times; medians, ms per fwd+bwd. Tells what
a host-side change saves before a GPU call; the GPU's figures come from host_time.py.
"""

import argparse
import os
import time
from pathlib import Path

os.environ["QWEN3_MOE_FUSED_AUTOTUNE"] = "0"
os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, whose launches get plans

import torch  # noqa: E402

SHAPE = dict(E=128, H=2048, I=768, K=8, r=16)


class _NoLaunch:
    """A plan's compiled kernel whose launcher does nothing."""

    function = packed_metadata = None

    @staticmethod
    def run(*args):
        pass


def _stub_launches(kernel):
    """Every launch of ``kernel`` (a loaded build) goes through its launch plans, whose first launch per key makes
    a plan of ``_NoLaunch`` instead of compiling; the build's tensors are then taken for GPU ones."""
    launch = kernel.launch

    def new(jit_function):
        planned = launch.Kernel(jit_function, device=lambda: 0, stream=lambda device: 0, hooks=lambda: False)

        def jit(key, grid, args, options):
            planned.jit_launches += 1
            if key is not None:
                planned.plans[key] = _NoLaunch

        planned.jit = jit
        return planned

    launch._new = new
    kernel.ops._INTERPRET = True  # moe_experts: CPU tensors take the kernels' path (as under the interpreter) ...
    kernel.tuning._INTERPRET = False  # ... with the GPU's tile sizes and tuner


def _step(kernel, T, lora):
    gen = torch.Generator().manual_seed(0)
    E, H, I, K, r = (SHAPE[k] for k in "EHIKr")
    dtype = torch.float16  # bfloat16 under the interpreter flag takes the reference path
    x = torch.randn(T, H, generator=gen, dtype=dtype, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, generator=gen, dtype=dtype, requires_grad=not lora)
    w2 = torch.randn(E, H, I, generator=gen, dtype=dtype, requires_grad=not lora)
    index = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    weights = torch.full((T, K), 1.0 / K, dtype=dtype, requires_grad=True)
    dout = torch.randn(T, H, generator=gen, dtype=dtype)
    factors = None
    leaves = [x, weights] + ([] if lora else [w1, w2])
    if lora:
        shapes = ((E, r, H), (E, 2 * I, r), (E, r, I), (E, H, r))
        tensors = [torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True) for s in shapes]
        leaves += tensors
        factors = kernel.ExpertsLora(*tensors)

    def step():
        for t in leaves:
            t.grad = None
        kernel.moe_experts(x, index, weights, w1, w2, lora=factors).backward(dout)

    return step


def _ms_per_call(step, calls):
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) * 1e3 / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="build folders (qwen3-moe-fused build --out X: X/torch-cpu)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=100, help="fwd+bwd calls per timing")
    args = parser.parse_args()
    import kernels

    loaded = [kernels.get_local_kernel(Path(b)) for b in args.builds]
    rows = {}
    for build, kernel in zip(args.builds, loaded):
        _stub_launches(kernel)
        for T in args.tokens:
            for lora in (False, True):
                step = _step(kernel, T, lora)
                step()  # plans made outside the timing
                rows[(build, T, lora)] = (step, [])
    for _ in range(args.rounds):
        for step, times in rows.values():
            times.append(_ms_per_call(step, args.calls))
    print(f"host Python per fwd+bwd, launches stubbed (ms, median of {args.rounds}; not host times: see the docstring)")
    print("| build | T | full fine-tuning | LoRA r16 |\n|---|---|---|---|")
    for build in args.builds:
        for T in args.tokens:
            full, lora = (sorted(rows[(build, T, x)][1])[args.rounds // 2] for x in (False, True))
            print(f"| {build} | {T} | {full:.3f} | {lora:.3f} |")


if __name__ == "__main__":
    main()
