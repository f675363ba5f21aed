"""benchmarks/scale_out.py, the multi-GPU table's script, at world size 2: on CPU (gloo, tiny model, the kernel's
CPU path) in CI, and with 2 GPUs on the 2-layer Qwen3-30B-A3B architecture, so the script cannot rot."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "scale_out.py"


def _run(tmp_path, *args, timeout=900):
    done = subprocess.run([sys.executable, str(SCRIPT), "--nproc", "2", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "scale_out.json").read_text())["rows"]
    assert "| engine | impl | tokens/s/GPU |" in done.stdout
    return {(r["engine"], r["impl"]): r for r in rows}


def test_scale_out_table_at_world_size_2_on_cpu(tmp_path):
    rows = _run(tmp_path, "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "3", "--batch",
                "2", "--seq", "64", "--lr", "1e-3", "--rows", "fsdp2:grouped_mm", "fsdp2:fused", "zero3:grouped_mm",
                "zero3:fused", "fsdp2:no-such-impl")
    for key in (("fsdp2", "grouped_mm"), ("fsdp2", "fused"), ("zero3", "grouped_mm"), ("zero3", "fused")):
        row = rows[key]
        assert "error" not in row, row
        assert row["tokens_per_second_per_gpu"] > 0 and row["flops_per_token"] > 0 and len(row["losses"]) == 3
        assert row["environment"]["commit"]
    for engine in ("fsdp2", "zero3"):  # same weights and batches: the kernel's CPU path trains like grouped_mm
        assert rows[(engine, "fused")]["max_loss_diff"] < 1e-4
        assert len(set(rows[(engine, "fused")]["losses"])) == 3  # the weights change from step to step
    assert "invalid choice" in rows[("fsdp2", "no-such-impl")]["error"]  # a failed row is reported, not raised


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_scale_out_table_at_world_size_2_on_gpus(tmp_path):
    rows = _run(tmp_path, "--preset", "30b-a3b", "--layers", "2", "--steps", "5", "--rows", "fsdp2:grouped_mm",
                "fsdp2:fused", "ep:grouped_mm", "ep:fused", "zero3:fused", "fsdp2-lora:fused", timeout=1200)
    for row in rows.values():
        assert "error" not in row, row
        assert row["peak_gib_per_gpu"] > 0
    assert rows[("fsdp2", "fused")]["max_loss_diff"] < 0.05 and rows[("ep", "fused")]["max_loss_diff"] < 0.05
