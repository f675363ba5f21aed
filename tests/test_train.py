"""Convergence parity: the patched model's loss curve equals the unpatched grouped_mm run's, on real text.

CPU: float32, the tiny preset cut to one layer (the interpreter is slow), 20 steps on the Python standard library's sources (byte-level), the fused
kernels through Triton's interpreter. Full fine-tune and LoRA, with and without gradient checkpointing.

Tolerance: both runs do the same float32 math in another summation order (per-op relative differences
~1e-7), so the curves agree to ~1e-6 and drift slowly with AdamW; 2e-5 (absolute, on losses ≈ 4–5.5) allows
that drift and nothing more: the control test shows that a 1 % change of the learning rate, far smaller than
any indexing or routing bug, already moves the curve by more than 100× the tolerance.
GPU: bfloat16 over 200 steps (tests marked gpu); bf16 rounding differs between implementations (≈ 3e-3 per
op) and training amplifies it, so both bf16 curves (ours, grouped_mm) are compared with the float32 curve
(smoothed over 20 steps): ours may not drift from it more than twice as far as grouped_mm does. The model is the
tiny preset at hidden size 256: at 64, LoRA cannot lower the loss (its random embeddings, lm_head and norms are
frozen, which caps the logits at about ±1.3), and a flat curve would show no drift.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3_moe_patch import train
from qwen3_moe_patch.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, SEQ, LR = 20, 2, 48, 1e-3
TOL = 2e-5


def _curves(kernel, impls, lora_r=0, gradient_checkpointing=False, lr=LR, device="cpu", dtype="float32",
            steps=STEPS, seed=0, **config):
    results = train.compare(impls, steps=steps, batch=BATCH, seq=SEQ, seed=seed, preset="tiny", lora_r=lora_r,
                            gradient_checkpointing=gradient_checkpointing, device=device, dtype=dtype, lr=lr,
                            kernel=kernel, show_progress=False, log=lambda *_: None,
                            config_overrides=dict(num_hidden_layers=1) | config)
    return {r.impl: r.losses for r in results}


def test_corpus_is_real_text_and_batches_are_reproducible():
    data = train.stdlib_corpus(1 << 20)
    assert len(data) == 1 << 20 and b"def " in data and b"import " in data
    tokens = train.token_stream()
    first, again = train.make_batches(tokens, 3, 2, 16, seed=5), train.make_batches(tokens, 3, 2, 16, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and first[0].max() < 256


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no_gc", "gc"])
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_patched_loss_curve_matches_grouped_mm(kernel, lora_r, gradient_checkpointing):
    curves = _curves(kernel, ["fused", "grouped_mm"], lora_r, gradient_checkpointing, lr=LR * (10 if lora_r else 1))
    fused, base = curves["fused"], curves["grouped_mm"]
    assert len(fused) == STEPS and base[-1] < base[0] - 0.1  # it learns
    worst = max(abs(a - b) for a, b in zip(fused, base))
    assert worst <= TOL, f"loss curves differ by {worst:.2e} (> {TOL:.0e}): {fused} vs {base}"


def test_control_a_one_percent_change_is_caught(kernel):
    base = _curves(kernel, ["grouped_mm"])["grouped_mm"]
    nudged = _curves(kernel, ["grouped_mm"], lr=LR * 1.01)["grouped_mm"]
    assert max(abs(a - b) for a, b in zip(base, nudged)) > 100 * TOL


def test_train_cli_writes_results_and_loss_plot(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs it: missing is a failure, not a skip)

    assert main(["train", "--impl", "fused", "--impl", "grouped_mm", "--steps", "3", "--batch", "2", "--seq", "32",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "train.json").read_text())
    assert [r["impl"] for r in result["runs"]] == ["fused", "grouped_mm"]
    assert all(len(r["losses"]) == 3 and r["tokens_per_second"] > 0 for r in result["runs"])
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert result["environment"]["torch"] == torch.__version__
    # benchmarks/train_table.py merges such files (one per implementation on the GPU) into one table and plot
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_table.py"), str(tmp_path / "train.json"),
                            "--out", str(tmp_path / "table")], capture_output=True, text=True, check=True).stdout
    assert "## tiny, full fine-tune, 2x32 tokens/step, float32" in table
    assert "| fused | 3 |" in table and "| grouped_mm | 3 |" in table
    assert (tmp_path / "table.png").stat().st_size > 0
    # a bfloat16 setup is also compared with the float32 grouped_mm run of the same setup, when there is one
    assert main(["train", "--impl", "grouped_mm", "--dtype", "bfloat16", "--steps", "3", "--batch", "2", "--seq", "32",
                 "--no-progress", "--out", str(tmp_path / "bf16")]) == 0
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_table.py"), str(tmp_path / "train.json"),
                            str(tmp_path / "bf16" / "train.json"), "--out", str(tmp_path / "table")],
                           capture_output=True, text=True, check=True).stdout
    bf16 = table[table.index("## tiny, full fine-tune, 2x32 tokens/step, bfloat16"):]
    row = next(line for line in bf16.splitlines() if line.startswith("| grouped_mm | 3 |"))
    assert "Δ 20-step means vs float32" in bf16 and 0 < float(row.split("|")[-2]) < 0.1


def test_flops_per_token_counts_the_matrices_a_token_passes_through():
    """The model FLOPs the multi-GPU table reports, against the parameters of the model itself: every matrix of
    attention, the router and the LM head, K of the E experts' (embeddings and norms do no matrix work)."""
    from transformers import Qwen3MoeForCausalLM

    from qwen3_moe_patch.presets import make_config

    config = make_config("30b-a3b", num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    matrices = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and "embed_tokens" not in n) + experts * config.num_experts_per_tok // config.num_experts
    seq = 4096
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq
    assert train.flops_per_token(config, seq) == 6 * matrices + attention


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        train.build_model("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no_gc", "gc"])
@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
def test_gpu_bfloat16_200_steps_track_float32_as_closely_as_grouped_mm(kernel, lora_r, gradient_checkpointing):
    """bf16 runs drift from the float32 trajectory (a chaotic one: per-step gaps between any two bf16 runs reach
    ~1); ours may drift no more than twice as far as stock HF. One seed is one draw of that drift: over 8 seeds
    of LoRA (benchmarks/results/2026-12-01_h200_train_parity_seeds_lora8.json) ours is the nearer in 3 and
    more than twice as far in 1, means 0.174 vs 0.153, while per step our LoRA gradients are the more exact
    (2026-12-01_h200_accuracy_lora.json). So LoRA compares the mean over 4 seeds, not one seed's gap."""
    lr = LR * (10 if lora_r else 1)
    model = dict(num_hidden_layers=4, hidden_size=256)
    seeds = (0, 1, 2, 3) if lora_r and not gradient_checkpointing else (0,)  # checkpointing: bit-identical (below)
    ours, stock = [], []
    for seed in seeds:
        bf16 = _curves(kernel, ["fused", "grouped_mm"], lora_r, gradient_checkpointing, lr=lr, device="cuda",
                       dtype="bfloat16", steps=200, seed=seed, **model)
        fp32 = _curves(kernel, ["grouped_mm"], lora_r, gradient_checkpointing, lr=lr, device="cuda", dtype="float32",
                       steps=200, seed=seed, **model)["grouped_mm"]
        fused, base, exact = (train.window_means(c) for c in (bf16["fused"], bf16["grouped_mm"], fp32))
        ours.append(max(abs(a - b) for a, b in zip(fused, exact)))
        stock.append(max(abs(a - b) for a, b in zip(base, exact)))
        assert exact[-1] < exact[0] - 0.2  # the curves follow a trajectory that learns
    if os.environ.get("QWEN3_MOE_FUSED_RESULTS"):  # the agreement figures, for benchmarks/gpu_train.sh
        name = f"parity_{'lora' if lora_r else 'full'}_{'gc' if gradient_checkpointing else 'no_gc'}.json"
        Path(os.environ["QWEN3_MOE_FUSED_RESULTS"], name).write_text(json.dumps({
            "seeds": list(seeds), "fused_vs_fp32": ours, "grouped_mm_vs_fp32": stock,
            "fused_vs_grouped_mm_raw_max": max(abs(a - b) for a, b in zip(bf16["fused"], bf16["grouped_mm"])),
            "curves": {**bf16, "fp32": fp32}}))
    mean_ours, mean_stock = sum(ours) / len(ours), sum(stock) / len(stock)
    assert mean_ours <= 2 * mean_stock + 1e-3, f"fused bf16 vs fp32 {ours}, grouped_mm bf16 vs fp32 {stock}"
