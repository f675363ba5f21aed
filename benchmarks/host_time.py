"""Host time of one MoE experts call: eager vs CUDA-graph replay, and the time to enqueue calls without syncing.

    python benchmarks/host_time.py --build build --out host.json [--impls fused module grouped_mm liger]
        [--tokens 1024 4096] [--profile fused:1024]

Every implementation runs in its own process (a failed CUDA-graph capture must not poison the next one) on the
inputs of bench_experts.py (30b-a3b shape, bf16, uniform routing, full fine-tuning: gradients of x, top_k_weights
and both weights). Per implementation and T:

- eager fwd / fwd+bwd ms: ``triton.testing.do_bench`` medians, as bench_experts.py times them;
- graph fwd / fwd+bwd ms: the same work captured once in a CUDA graph and replayed (the GPU's time with no host
  in the way);
- enqueue fwd / fwd+bwd ms: host wall time per call of 20 calls issued back to back, without synchronising,
  behind a GPU sleep long enough that the host never waits for the GPU: what the host needs to hand one call to
  the GPU (median of 5 such runs). The eager time is roughly the larger of it and the graph time.

Gradients are set to None before every fwd+bwd (as do_bench's grad_to_none does) and before capture, so no
measurement includes accumulating into .grad.

- chain (ours and Liger's): the enqueue fwd+bwd per layer of CHAIN calls chained as layers are (each call's output
  the next one's input) with one backward, as a model's step runs them: ``backward()`` hands the graph to
  autograd's device thread once per step, not once per layer, so this is a layer's host time inside a step,
  where the fwd+bwd column above also holds that handoff.

- split (Triton kernels only): the enqueue fwd+bwd again with Triton's launch path timed from inside — host ms
  per call spent in ``JITFunction.run`` (binding, specialising, cache lookup; with launch plans, ``launch.py``,
  only a plan's first launch goes there), in the compiled kernels' launcher (argument parsing and cuLaunchKernel;
  every launch, a part of ``JITFunction.run``'s time where that path launches), the launches per call, and the
  enqueue with the launcher skipped (everything else: Triton's Python path or the plans, our Python, torch ops,
  autograd). The three timed runs are separate, so the parts need not add up exactly.

- plans vs Triton's path (our kernels, builds with ``launch.py``): the enqueue fwd and fwd+bwd again, through the
  launch plans and through Triton's own launch path, alternating 7 times in the same process (medians): the
  host's speed drifts between processes and calls, so only this pair compares the two launch paths.

``--profile IMPL:T`` also prints the cProfile of 20 such fwd+bwd calls (top functions by own time, then by
cumulative time).
"""

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

import bench_experts

CALLS = 20
CHAIN = 20  # layers per backward in the chain column (400 launches per call: CUDA's launch queue holds them)
LABELS = {"fused": "qwen3-moe-fused", "module": "qwen3-moe-fused (experts module)",
          "grouped_mm": "transformers grouped_mm", "liger": "liger fused_moe"}


def _enqueue_ms(step, calls=CALLS, runs=5):
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the calls: the host never waits for it
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) * 1e3 / calls)
        torch.cuda.synchronize()
    return sorted(times)[runs // 2]


def _graph_ms(step):
    """Median replay time of ``step`` captured in a CUDA graph (after warm-up on a side stream, as torch advises)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


class _LaunchTimer:
    """Within the block, the host time spent in Triton's ``JITFunction.run`` (with launch plans, only each plan's
    first launch) and in the compiled kernels' launcher (``CudaLauncher.__call__``, which every launch passes), and
    the number of launches; ``skip`` returns from the launcher before anything runs."""

    def __init__(self, skip=False):
        from triton.backends.nvidia.driver import CudaLauncher
        from triton.runtime.jit import JITFunction

        self.classes = JITFunction, CudaLauncher
        self.skip, self.run_s, self.launcher_s, self.launches = skip, 0.0, 0.0, 0

    def __enter__(self):
        jit, launcher = self.classes
        self.saved = jit.run, launcher.__call__
        run, call = self.saved

        def timed_run(fn, *args, **kwargs):
            start = time.perf_counter()
            try:
                return run(fn, *args, **kwargs)
            finally:
                self.run_s += time.perf_counter() - start

        def timed_call(obj, *args, **kwargs):
            self.launches += 1
            if self.skip:
                return None
            start = time.perf_counter()
            try:
                return call(obj, *args, **kwargs)
            finally:
                self.launcher_s += time.perf_counter() - start

        jit.run, launcher.__call__ = timed_run, timed_call
        return self

    def __exit__(self, *exc):
        self.classes[0].run, self.classes[1].__call__ = self.saved


def _split(step, calls=CALLS):
    """Host ms per call in Triton's run and its launcher, launches per call, and the enqueue ms with launches
    skipped (see the module docstring)."""
    with _LaunchTimer() as timer:
        _enqueue_ms(step, calls=calls, runs=1)
    with _LaunchTimer(skip=True):
        skipped = _enqueue_ms(step, calls=calls)
    torch.cuda.synchronize()
    return dict(triton_run_ms=timer.run_s * 1e3 / calls, launcher_ms=timer.launcher_s * 1e3 / calls,
                launches=timer.launches / calls, enqueue_without_launches_ms=skipped)


def _plans_vs_triton_path(steps, kernel, rounds=7):
    """Enqueue ms per call of each step through the kernel's launch plans and through Triton's own launch path
    (``launch.jit_path``), alternating in this process so that both see the same host: medians of ``rounds``."""
    row = {}
    for name, step in steps.items():
        planned, triton_path = [], []
        for _ in range(rounds):
            planned.append(_enqueue_ms(step, runs=1))
            with kernel.launch.jit_path():
                triton_path.append(_enqueue_ms(step, runs=1))
        row[f"enqueue_{name}_plans_ms"] = sorted(planned)[rounds // 2]
        row[f"enqueue_{name}_triton_path_ms"] = sorted(triton_path)[rounds // 2]
    return row


def measure(impl, T, profile=False):
    """One row: eager, graph and enqueue milliseconds of ``impl`` at T tokens (errors are kept, not raised)."""
    kernel = _kernel()
    shape = bench_experts.SHAPES["30b-a3b"]
    fn = bench_experts._implementations(kernel, shape, [impl])[LABELS[impl]]
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves, index, dout = bench_experts._inputs(shape, "uniform", T, gen)
    x, weights, w1, w2 = leaves
    args = (x, index, weights, w1, w2)
    row = {"impl": LABELS[impl], "T": T}

    def forward():
        with torch.no_grad():
            fn(*args)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*args).backward(dout)

    def chain_forward_backward():
        for t in leaves:
            t.grad = None
        hidden = x
        for _ in range(CHAIN):
            hidden = fn(hidden, *args[1:])
        hidden.backward(dout)

    try:
        forward_backward()  # compile and autotune outside every measurement
        for t in leaves:
            t.grad = None
        row["eager_fwd_ms"] = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
        row["eager_fwd_bwd_ms"] = triton.testing.do_bench(forward_backward, warmup=25, rep=100, grad_to_none=leaves,
                                                          return_mode="median")
        row["enqueue_fwd_ms"] = _enqueue_ms(forward)
        row["enqueue_fwd_bwd_ms"] = _enqueue_ms(forward_backward)
        if impl in ("fused", "module", "liger"):
            chain_forward_backward()
            row["enqueue_chain_fwd_bwd_ms"] = _enqueue_ms(chain_forward_backward, calls=2) / CHAIN
        if impl in ("fused", "module") and hasattr(kernel, "launch"):
            row.update(_plans_vs_triton_path({"fwd": forward, "fwd_bwd": forward_backward}, kernel))
        if impl in ("fused", "module", "liger"):
            try:
                row.update(_split(forward_backward))
            except Exception as err:  # e.g. host code reading values of a skipped launch's output
                row["split_error"] = f"{type(err).__name__}: {err}"[:300]
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            _enqueue_ms(forward_backward, runs=1)
            profiler.disable()
            print(f"\ncProfile of {CALLS} fwd+bwd calls of {row['impl']} at T={T} (host only)", file=sys.stderr)
            for order in ("tottime", "cumulative"):
                pstats.Stats(profiler, stream=sys.stderr).sort_stats(order).print_stats(30)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        return row
    for name, step in (("graph_fwd_ms", forward), ("graph_fwd_bwd_ms", forward_backward)):
        try:
            row[name] = _graph_ms(step)
        except Exception as err:  # capture refused: say so in the row, keep the eager figures
            row[name] = None
            row.setdefault("graph_error", f"{type(err).__name__}: {err}"[:300])
            break  # the capturing stream may be unusable after a failed capture
    return row


_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        import kernels

        _KERNEL = kernels.get_local_kernel(Path(ARGS.build))
    return _KERNEL


def _table(rows):
    lines = ["| impl | T | eager fwd | graph fwd | enqueue fwd | eager fwd+bwd | graph fwd+bwd | enqueue fwd+bwd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['T']} | error: {r['error'][:90]} | | | | | |")
            continue
        cells = [r.get(k) for k in ("eager_fwd_ms", "graph_fwd_ms", "enqueue_fwd_ms", "eager_fwd_bwd_ms",
                                    "graph_fwd_bwd_ms", "enqueue_fwd_bwd_ms")]
        lines.append(f"| {r['impl']} | {r['T']} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    chain = [r for r in rows if "enqueue_chain_fwd_bwd_ms" in r]
    if chain:
        lines += ["", f"Enqueue ms per layer, fwd+bwd of {CHAIN} chained calls with one backward (a layer inside a "
                  "step) against one call per backward", "", "| impl | T | chained, per layer | one call |",
                  "|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['T']} | {r['enqueue_chain_fwd_bwd_ms']:.3f} | {r['enqueue_fwd_bwd_ms']:.3f} |"
                  for r in chain]
    split = [r for r in rows if "triton_run_ms" in r]
    if split:
        lines += ["", "Host ms per fwd+bwd: in Triton's run (of which its C launcher), launches, enqueue without launches",
                  "", "| impl | T | Triton run | C launcher | launches | enqueue without launches |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['T']} | {r['triton_run_ms']:.3f} | {r['launcher_ms']:.3f} | {r['launches']:.0f} | "
                  f"{r['enqueue_without_launches_ms']:.3f} |" for r in split]
    ab = [r for r in rows if "enqueue_fwd_bwd_plans_ms" in r]
    if ab:
        lines += ["", "Enqueue ms per call, launch plans vs Triton's own launch path (alternating in one process)",
                  "", "| impl | T | fwd: plans | fwd: Triton's path | fwd+bwd: plans | fwd+bwd: Triton's path |",
                  "|---|---|---|---|---|---|"]
        cells = ("enqueue_fwd_plans_ms", "enqueue_fwd_triton_path_ms", "enqueue_fwd_bwd_plans_ms",
                 "enqueue_fwd_bwd_triton_path_ms")
        lines += [f"| {r['impl']} | {r['T']} | " + " | ".join(f"{r[c]:.3f}" for c in cells) + " |" for r in ab]
    return "\n".join(lines)


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build", help="kernel build folder (qwen3-moe-fused build)")
    parser.add_argument("--out", default="host_time.json", help="results JSON (environment and rows)")
    parser.add_argument("--impls", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--profile", default="", help="IMPL:T whose fwd+bwd calls are profiled with cProfile")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # IMPL: run in this process, print JSON rows
    ARGS = parser.parse_args()
    if ARGS.one:
        for T in ARGS.tokens:
            print(json.dumps(measure(ARGS.one, T, profile=ARGS.profile == f"{ARGS.one}:{T}")), flush=True)
        return
    rows = []
    for impl in ARGS.impls:
        cmd = [sys.executable, __file__, "--build", ARGS.build, "--one", impl, "--profile", ARGS.profile,
               "--tokens", *map(str, ARGS.tokens)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode and len(got) < len(ARGS.tokens):
            got += [{"impl": LABELS[impl], "T": T, "error": f"process exited {done.returncode}"}
                    for T in ARGS.tokens[len(got):]]
        rows += got
    env = bench_experts._environment()
    Path(ARGS.out).write_text(json.dumps({"environment": env, "calls_per_enqueue": CALLS, "results": rows}, indent=1))
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}; "
          f"30b-a3b experts, bf16, uniform routing, full fwd+bwd; ms per call")
    print(_table(rows))


if __name__ == "__main__":
    main()
