"""Every kernel launch of an experts fwd+bwd compiles for Hopper (sm_90), on CPU: the interpreter accepts programs
Triton's GPU compiler rejects (it did: a helper with two returns of different types), and a config whose shared
memory exceeds an SM's cannot launch. ``hopper_compile.py`` compiles them with Triton and its ptxas, no GPU."""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HOPPER_SHARED = 232448  # bytes of shared memory one program may use on an H100/H200 (227 KiB)


def test_every_launch_compiles_for_hopper_and_the_defaults_fit(build_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("hopper_compile.py")), str(build_dir)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    failed = [r for r in rows if "error" in r]
    assert not failed, json.dumps(failed, indent=1)[:6000]
    kernels = {r["kernel"] for r in rows}
    assert {"gate_up_swiglu_kernel", "grouped_gemm_kernel", "down_dgrad_dswiglu_kernel", "expert_wgrad_kernel",
            "combine_kernel", "routing_count_kernel", "routing_place_kernel"} <= kernels
    # The defaults (what runs with autotuning off, and inside CUDA-graph capture before tuning) fit an SM, for
    # bf16 and for 4-bit weights; the autotuner skips candidates that do not, so each only needs one that does.
    too_big = [r for r in rows if r["candidate"] == 0 and r["shared"] > HOPPER_SHARED]
    assert not too_big, too_big
    fits = defaultdict(list)
    for r in rows:
        if r["w4bit"]:
            fits[(r["kernel"], r["k_contig"])].append(r["shared"] <= HOPPER_SHARED)
    assert set(fits) == {("gate_up_swiglu_kernel", False), ("down_dgrad_dswiglu_kernel", False),
                         ("grouped_gemm_kernel", True), ("grouped_gemm_kernel", False)}  # dX: N contiguous
    assert all(len(f) > 1 and any(f) for f in fits.values())  # several candidates compiled, one at least fits
