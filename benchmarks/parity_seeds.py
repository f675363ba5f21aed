"""The GPU convergence-parity figures of tests/test_train.py over several seeds (one seed's figures are a single
draw of a chaotic trajectory): for each seed, the largest gap between 20-step loss means of the bfloat16 runs
(ours, grouped_mm) and the float32 grouped_mm run, on the tiny preset at hidden 256 with 4 layers.

    python benchmarks/parity_seeds.py --build build [--seeds 0 1 2] [--lora-r 8] [--lr 1e-2] [--out parity_seeds.json]
"""

import argparse
import json
from pathlib import Path

from qwen3_moe_patch import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default="build", help="kernel build folder (qwen3-moe-fused build)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="parity_seeds.json")
    args = parser.parse_args()
    import kernels

    kernel = kernels.get_local_kernel(Path(args.build))
    common = dict(steps=args.steps, batch=2, seq=48, preset="tiny", lora_r=args.lora_r, device="cuda", lr=args.lr,
                  kernel=kernel, show_progress=False, log=lambda *_: None,
                  config_overrides=dict(num_hidden_layers=4, hidden_size=256))  # as tests/test_train.py's GPU test
    rows = []
    for seed in args.seeds:
        runs = train.compare(["fused", "grouped_mm"], seed=seed, dtype="bfloat16", **common)
        curves = {r.impl: r.losses for r in runs}
        curves["fp32"] = train.compare(["grouped_mm"], seed=seed, dtype="float32", **common)[0].losses
        exact = train.window_means(curves["fp32"])
        gap = {impl: max(abs(a - b) for a, b in zip(train.window_means(curves[impl]), exact))
               for impl in ("fused", "grouped_mm")}
        rows.append({"seed": seed, "fused_vs_fp32": gap["fused"], "grouped_mm_vs_fp32": gap["grouped_mm"],
                     "fp32_first_last": [exact[0], exact[-1]], "curves": curves})
        print(f"seed {seed}: fused vs fp32 {gap['fused']:.3f}, grouped_mm vs fp32 {gap['grouped_mm']:.3f}, "
              f"fp32 {exact[0]:.3f} -> {exact[-1]:.3f}", flush=True)
    Path(args.out).write_text(json.dumps({"environment": train.environment("cuda"), "setup": vars(args),
                                          "rows": rows}))


if __name__ == "__main__":
    main()
