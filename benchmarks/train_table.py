"""One table and one loss plot from several ``qwen3-moe-fused train --out DIR`` runs (issue 7's GPU results).

    python benchmarks/train_table.py runs/full_fused/train.json runs/full_eager/train.json ... --out results/NAME

Runs with the same setup except ``--impl`` (and ``--steps``) saw the same batches from the same weights (same
seed), so their losses compare step by step. Writes NAME.md (table per setup: tokens/s, × grouped_mm, × eager,
peak memory, final loss, largest loss difference from grouped_mm over the common steps, raw and between means
over windows of 20 steps: bfloat16 runs differ step by step by their rounding, the means show any drift; and,
where the runs include a float32 grouped_mm run of the same setup, between means vs that reference),
NAME.json (the runs and environments) and NAME.png (loss curves, one panel per setup).
"""

import argparse
import json
from pathlib import Path

from qwen3_moe_patch.train import window_means


def _setup_key(setup, dtype=None):
    return (setup.get("preset"), setup.get("model"), setup.get("layers"), setup["lora_r"], setup["gradient_checkpointing"],
            setup["batch"], setup["seq"], dtype or setup["dtype"], setup["seed"], setup.get("qlora", False),
            setup.get("lora_dtype", "float32"), setup.get("optim", "adamw"), setup.get("memory_cap_gib", 0))


def _label(setup):
    kind = f"LoRA r{setup['lora_r']}" if setup["lora_r"] else "full fine-tune"
    if setup.get("qlora"):
        kind = f"QLoRA (NF4) r{setup['lora_r']}"
    gc = ", gradient checkpointing" if setup["gradient_checkpointing"] else ""
    extra = "".join([f", LoRA in {setup['lora_dtype']}" if setup.get("lora_dtype", "float32") != "float32" else "",
                     ", 8-bit AdamW" if setup.get("optim") == "adamw8bit" else "",
                     f", {setup['layers']} layers" if setup.get("layers") else "",
                     f", capped at {setup['memory_cap_gib']:g} GiB" if setup.get("memory_cap_gib") else ""])
    return (f"{setup.get('model') or setup['preset']}, {kind}{gc}, {setup['batch']}x{setup['seq']} tokens/step, "
            f"{setup['dtype']}{extra}")


def _gaps(losses, base, window=20):
    """Largest |loss − base| over the common steps, raw and between means of ``window`` steps."""
    n = min(len(losses), len(base))
    w = min(window, n)
    smooth = zip(window_means(losses[:n], w), window_means(base[:n], w))
    return max(abs(a - b) for a, b in zip(losses, base)), max(abs(a - b) for a, b in smooth)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="train.json files")
    parser.add_argument("--out", required=True, help="output path without suffix")
    args = parser.parse_args()

    groups, environments = {}, []
    for path in args.runs:
        data = json.loads(Path(path).read_text())
        environments.append(data.get("environment", {}))
        for run in data["runs"]:
            groups.setdefault(_setup_key(data["setup"]), (data["setup"], []))[1].append(run)
    env = environments[0]
    lines = [f"# Training runs: tokens/s, peak memory, loss agreement", "",
             " · ".join(str(env.get(k)) for k in ("date", "device", "driver") if env.get(k)) + " · "
             + ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers", "peft", "liger_kernel") if k in env),
             "", "tokens/s: steady state (first two steps left out); peak: torch.cuda.max_memory_allocated over the run "
             "(weights, gradients, AdamW states, activations); Δloss: largest |loss − grouped_mm's loss| over the steps "
             "both ran (same batches, same initial weights), per step and between means over 20 steps.", ""]
    for setup, runs in groups.values():
        by_impl = {r["impl"]: r for r in runs}
        base, eager = by_impl.get("grouped_mm"), by_impl.get("eager")
        exact = None  # the float32 grouped_mm run of a bfloat16 setup, when there is one
        if setup["dtype"] != "float32":
            exact = next((r for r in groups.get(_setup_key(setup, "float32"), (None, []))[1]
                          if r["impl"] == "grouped_mm"), None)
        lines += [f"## {_label(setup)}", "", "| impl | steps | tokens/s | × grouped_mm | × eager | peak MiB | final loss "
                  "| Δloss vs grouped_mm | Δ 20-step means |" + (" Δ 20-step means vs float32 |" if exact else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if exact else "")]
        for r in runs:
            tps = r["tokens_per_second"]
            vs_base = f"{tps / base['tokens_per_second']:.2f}" if base else "–"
            vs_eager = f"{tps / eager['tokens_per_second']:.1f}" if eager else "–"
            diff = smooth = "–"
            if base and r is not base:
                diff, smooth = (f"{g:.2e}" for g in _gaps(r["losses"], base["losses"]))
            lines.append(f"| {r['impl']} | {len(r['losses'])} | {tps:.0f} | {vs_base} | {vs_eager} | "
                         f"{r['peak_mib']:.0f} | {r['final_loss']:.4f} | {diff} | {smooth} |"
                         + (f" {_gaps(r['losses'], exact['losses'])[1]:.2e} |" if exact else ""))
        lines.append("")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"environments": environments, "setups": [{"setup": s, "runs": r} for s, r in groups.values()]}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4), squeeze=False)
        for ax, (setup, runs) in zip(axes[0], groups.values()):
            for r in runs:
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["impl"], linewidth=1)
            ax.set(xlabel="step", ylabel="loss", title=_label(setup))
            ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib is not installed: no plot")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
