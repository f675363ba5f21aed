"""Markdown report of a bench_experts.py results JSON: python benchmarks/report.py RESULTS.json [TITLE] > RESULTS.md"""

import json
import sys

METHOD = (
    "bf16; routing from a random router (fp32 softmax, top-k, renormalised); the same inputs for every "
    "implementation; experts only (router excluded); `triton.testing.do_bench` medians. full: fwd+bwd = gradients "
    "of x, top_k_weights, gate_up_proj and down_proj, TFLOP/s counting 6·T·K·H·I (fwd) and 18·T·K·H·I (fwd+bwd). "
    "lora rN: experts frozen, gradients of x, top_k_weights and the LoRA factors, fwd+bwd TFLOP/s counting "
    "12·T·K·H·I. "
    "peak extra = peak allocated during one fwd+bwd minus allocated before. saved = bytes per token kept for "
    "backward, parameters excluded. rel err = ‖out − out_first‖/‖out_first‖ against the first row of that T."
)


def report(data: dict, title: str) -> str:
    env = data["environment"]
    lines = [
        f"# {title}", "",
        f"{env['date']} · {env['device']} · driver {env['driver']} · torch {env['torch']} · triton {env['triton']} · "
        f"transformers {env['transformers']} · dense bf16 8192³ matmul {env['dense_bf16_tflops']} TFLOP/s", "",
        METHOD, "",
        "| impl | mode | T | H | I | E | K | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak extra MiB | "
        "saved KiB/token | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        head = f"| {r['impl']} | {r.get('mode', 'full')} | {r['T']} | {r['H']} | {r['I']} | {r['E']} | {r['K']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"{head} {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | "
            f"{r['peak_extra_mib']:.0f} | {r['saved_bytes_per_token'] / 1024:.1f} | {r['rel_err_vs_first']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(report(json.load(f), sys.argv[2] if len(sys.argv) > 2 else "Qwen3-MoE experts benchmark"), end="")
