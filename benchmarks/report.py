"""Markdown report and PNG plots of a bench_experts.py results JSON.

    python benchmarks/report.py RESULTS.json [--title TITLE] [--plots PREFIX] > RESULTS.md

Plots (matplotlib): PREFIX_tflops.png (fwd+bwd TFLOP/s against T per implementation, uniform routing, one panel
per shape and mode) and PREFIX_skew.png (fwd+bwd time of each skewed routing over the uniform one).
"""

import argparse
import json
from collections import defaultdict

METHOD = (
    "bf16; the same inputs for every implementation; experts only (router excluded); `triton.testing.do_bench` "
    "medians after one untimed fwd+bwd. Routing: uniform = random router (fp32 softmax, top-k, renormalised); "
    "zipf = K distinct experts per token drawn with P(e) ∝ 1/(e+1); hot30 = 30 % of tokens send one slot to "
    "expert 0. full: fwd+bwd = gradients of x, top_k_weights, gate_up_proj and down_proj, TFLOP/s counting "
    "6·T·K·H·I (fwd) and 18·T·K·H·I (fwd+bwd). lora rN: experts frozen, gradients of x, top_k_weights and the "
    "LoRA factors, fwd+bwd TFLOP/s counting 12·T·K·H·I. vs dense = fwd+bwd TFLOP/s over the dense bf16 8192³ "
    "matmul of the same run. peak extra = peak allocated during one fwd+bwd minus allocated before. saved = bytes "
    "per token kept for backward, parameters excluded. rel err = ‖out − out_first‖/‖out_first‖ against the first "
    "row of that (shape, T, routing, mode)."
)
OURS = "qwen3-moe-fused"


def _ok(rows):
    return [r for r in rows if "error" not in r]


def _index(rows):
    return {(r["shape"], r["routing"], r["mode"], r["T"], r["impl"]): r for r in _ok(rows)}


def summary(rows):
    """Lines: our fwd+bwd time over each peer's, and each skewed routing's time over uniform, per shape and T."""
    by = _index(rows)
    lines = ["| shape | mode | T | ours ms | ÷ grouped_mm | ÷ Liger | ÷ PEFT | zipf ÷ uniform | hot30 ÷ uniform |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["mode"], r["T"]) for r in _ok(rows) if r["routing"] == "uniform"})
    for shape, mode, T in keys:
        ours = next((r for (s, ro, m, t, i), r in by.items()
                     if (s, ro, m, t) == (shape, "uniform", mode, T) and i.startswith(OURS)), None)
        if ours is None:
            continue

        def ratio(impl_prefix, routing="uniform", base=ours):
            other = next((r for (s, ro, m, t, i), r in by.items()
                          if (s, ro, m, t) == (shape, routing, mode, T) and i.startswith(impl_prefix)), None)
            if other is None:
                return "–"
            return f"{base['fwd_bwd_ms'] / other['fwd_bwd_ms']:.2f}" if routing == "uniform" else \
                f"{other['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}"

        lines.append(f"| {shape} | {mode} | {T} | {ours['fwd_bwd_ms']:.2f} | {ratio('transformers grouped_mm')} | "
                     f"{ratio('liger')} | {ratio('PEFT')} | {ratio(OURS, 'zipf')} | {ratio(OURS, 'hot30')} |")
    return lines


def report(data: dict, title: str) -> str:
    env = data["environment"]
    rows = data["results"]
    lines = [
        f"# {title}", "",
        f"{env['date']} · {env['device']} · driver {env['driver']} · torch {env['torch']} · triton {env['triton']} · "
        f"transformers {env['transformers']} · dense bf16 8192³ matmul {env['dense_bf16_tflops']} TFLOP/s · "
        f"autotune {'on' if env.get('autotune') else 'off'}", "",
        METHOD, "", "## Ours relative to the peers (fwd+bwd time ratios; < 1 = we are faster)", "",
        *summary(rows), "", "## All rows", "",
        "| shape | routing | impl | mode | T | max rows/expert | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
        "vs dense | peak extra MiB | saved KiB/token | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (f"| {r['shape']} | {r['routing']} | {r['impl']} | {r['mode']} | {r['T']} | "
                f"{r['max_rows_per_expert']} |")
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"{head} {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | "
            f"{r['fwd_bwd_vs_dense']:.2f} | {r['peak_extra_mib']:.0f} | {r['saved_bytes_per_token'] / 1024:.1f} | "
            f"{r['rel_err_vs_first']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plots(data: dict, prefix: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ok(data["results"])
    panels = sorted({(r["shape"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, mode) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in rows:
            if (r["shape"], r["mode"], r["routing"]) == (shape, mode, "uniform"):
                series[r["impl"]].append((r["T"], r["fwd_bwd_tflops"]))
        for impl, points in sorted(series.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=impl)
        ax.axhline(data["environment"]["dense_bf16_tflops"], color="gray", linestyle="--", label="dense bf16 matmul")
        ax.set(xscale="log", xlabel="tokens T", ylabel="fwd+bwd TFLOP/s", title=f"{shape}, {mode}, uniform")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{prefix}_tflops.png", dpi=110)

    by = _index(data["results"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (shape, mode) in zip(axes[0], panels):
        series = defaultdict(list)
        for (s, routing, m, T, impl), r in by.items():
            if (s, m) == (shape, mode) and routing != "uniform" and (s, "uniform", m, T, impl) in by:
                series[(impl, routing)].append((T, r["fwd_bwd_ms"] / by[(s, "uniform", m, T, impl)]["fwd_bwd_ms"]))
        for (impl, routing), points in sorted(series.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o" if routing == "zipf" else "s",
                    linestyle="-" if routing == "zipf" else ":", label=f"{impl}, {routing}")
        ax.axhline(1.3, color="red", linestyle="--", label="1.3× target")
        ax.legend(fontsize=6)
        ax.set(xscale="log", xlabel="tokens T", ylabel="fwd+bwd time ÷ uniform", title=f"{shape}, {mode}: skew")
    fig.tight_layout()
    fig.savefig(f"{prefix}_skew.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--title", default="Qwen3-MoE experts benchmark")
    parser.add_argument("--plots", help="write PREFIX_tflops.png and PREFIX_skew.png")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    print(report(data, args.title), end="")
    if args.plots:
        plots(data, args.plots)


if __name__ == "__main__":
    main()
