"""Launch configurations: every autotune candidate computes the reference's result; the tuner and its switches.

The candidates are checked on CPU through the interpreter (float64, the configs forced) and on the GPU (bfloat16
at Qwen3-30B-A3B shapes); the selection and the cache file on CPU with a fake timer, and with real timing on the
GPU.
"""

import json

import pytest
import torch

from test_kernels import (
    NAMES, TOL, _double, _lora_factors, _problem, _qwen3_30b_problem, _reference, _run, _run_lora, assert_close_rel,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("gate_up", "gate_up_4bit", "grouped_gemm", "grouped_gemm_4bit", "thin", "dgrad", "wgrad")


def _candidate(kernel, i):
    return {kind: kernel.tuning.CANDIDATES[kind][i] for kind in KINDS}


def test_every_kind_has_a_default_and_distinct_candidates(kernel):
    candidates = kernel.tuning.CANDIDATES
    assert set(candidates) == set(KINDS)
    for kind, configs in candidates.items():
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs) == 4, kind


def test_host_integer_helpers_are_tritons(kernel):
    """The grids and buffer sizes use plain-integer cdiv / next_power_of_2 (host time): the same values as
    Triton's constexpr functions."""
    import triton

    for n in [*range(1, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**40 + 3]:
        assert kernel.tuning.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 64, 128, 1000):
            assert kernel.tuning.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert kernel.tuning.cdiv(0, 64) == triton.cdiv(0, 64) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter coverage; the GPU variant is below")
@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("case", ["uniform", "all_on_one_expert", "empty_experts"])
def test_candidate_configs_match_reference_in_the_interpreter(kernel, case, i):
    with kernel.tuning.forced(**_candidate(kernel, i)):
        leaves, index, grad_out = _problem(case, torch.float64, 100 + i)
        out, grads = _run(kernel, leaves, index, grad_out)
        ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
        for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
            assert_close_rel(got, want, TOL[torch.float64], f"candidate {i} {case} {name}")
        factors = _lora_factors(leaves[2], leaves[3], (4, 3), 200 + i)
        out, grads = _run_lora(kernel, leaves, index, grad_out, factors, kernel)
        ref_out, ref_grads = _run_lora(kernel, _double(leaves), index, grad_out, _double(factors), kernel.reference)
        for j, (got, want) in enumerate(zip((out, *grads), (ref_out, *ref_grads))):
            assert_close_rel(got, want, TOL[torch.float64], f"candidate {i} {case} LoRA output/gradient {j}")


def test_rows_bucket_and_switch(kernel, monkeypatch):
    tuning = kernel.tuning
    assert [tuning.rows_bucket(rows, 128) for rows in (1, 128, 129, 8 * 4096, 8 * 4096 + 1)] == [1, 1, 1, 256, 256]
    assert tuning.rows_bucket(8 * 16384, 128) == 1024 and tuning.rows_bucket(8 * 1000, 128) == 64
    monkeypatch.delenv("QWEN3_MOE_FUSED_AUTOTUNE", raising=False)
    assert tuning.enabled()
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE", "0")
    assert not tuning.enabled()
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE", "1")
    assert tuning.enabled()


def test_selection_keeps_the_fastest_and_the_cache_file_serves_a_later_process(kernel, tmp_path, monkeypatch):
    """The tuner's choice logic with a fake timer (no GPU): fastest fitting candidate, pruning by BLOCK_N, one
    timing per key, the cache file written and read back, a config that does not fit skipped."""
    tuning = kernel.tuning
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_loaded_file", None)
    timed = []
    speed = {2: 0.5, 1: 0.7, 0: None, 3: 0.9}  # candidate index -> ms (None: does not fit)

    def fake(config):
        timed.append(config)
        return speed[tuning.CANDIDATES["grouped_gemm"].index(config)]

    key = ("grouped_gemm", "bfloat16", 2048, 768, False, 0, 128, 256)
    assert tuning.select("grouped_gemm", key, 2048, fake) == tuning.CANDIDATES["grouped_gemm"][2]
    assert len(timed) == 4
    assert tuning.select("grouped_gemm", key, 2048, fake) == tuning.CANDIDATES["grouped_gemm"][2] and len(timed) == 4
    narrow = ("grouped_gemm", "bfloat16", 100, 768, False, 0, 128, 256)  # n = 100: BLOCK_N 256 is pruned
    tuning.select("grouped_gemm", narrow, 100, fake)
    assert all(c["BLOCK_N"] < 200 for c in timed[4:]) and len(timed) == 6
    entries = {tuple(e["key"]): e["config"] for e in json.loads(cache.read_text())}
    assert entries == tuning._chosen
    monkeypatch.setattr(tuning, "_chosen", {})  # a later process
    monkeypatch.setattr(tuning, "_loaded_file", None)
    assert tuning.select("grouped_gemm", key, 2048, lambda c: pytest.fail("timed again")) == \
        tuning.CANDIDATES["grouped_gemm"][2]
    with pytest.raises(RuntimeError, match="no launch config of kernel wgrad fits"):
        tuning.select("wgrad", ("wgrad", "bfloat16", 1), 4096, lambda c: None)


def _check_against_float32(kernel, configs, seed, label):
    """bf16 at Qwen3-30B-A3B shapes (T = 4096) with ``configs`` forced, full fine-tuning and LoRA r16, against the
    float32 reference."""
    leaves, index, grad_out = _qwen3_30b_problem(4096, seed)
    with kernel.tuning.forced(**configs):
        out, grads = _run(kernel, leaves, index, grad_out)
        factors = _lora_factors(leaves[2], leaves[3], (16, 16), seed + 100)
        frozen = [leaves[0], leaves[1], leaves[2].detach(), leaves[3].detach()]
        lora_out, lora_grads = _run_lora(kernel, frozen, index, grad_out, factors, kernel)
    ref = [t.detach().float().requires_grad_() for t in leaves]
    ref_out, ref_grads = _run(kernel.reference, ref, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.bfloat16], f"{label} {name}")
    ref_frozen = [ref[0], ref[1], ref[2].detach(), ref[3].detach()]
    ref_factors = [f.detach().float().requires_grad_() for f in factors]
    ref_out, ref_grads = _run_lora(kernel, ref_frozen, index, grad_out, ref_factors, kernel.reference)
    for j, (got, want) in enumerate(zip((lora_out, *lora_grads), (ref_out, *ref_grads))):
        assert_close_rel(got, want, TOL[torch.bfloat16], f"{label} LoRA output/gradient {j}")


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(4))
def test_gpu_candidate_configs_match_float32_reference(kernel, i):
    _check_against_float32(kernel, _candidate(kernel, i), 300 + i, f"candidate {i}")


def test_tune_runs_full_and_lora_passes(kernel):
    """``tune`` drives forward and backward for each T (on CPU through the interpreter, where nothing is timed)."""
    kernel.tune(32, 16, 4, 2, [5, 9], dtype=torch.float32, lora_rank=4, device=DEVICE)


@pytest.mark.gpu
def test_gpu_tune_ahead_leaves_nothing_to_tune_in_training(kernel, monkeypatch):
    tuning = kernel.tuning
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE", "1")
    monkeypatch.delenv("QWEN3_MOE_FUSED_AUTOTUNE_CACHE", raising=False)
    monkeypatch.setattr(tuning, "_chosen", {})
    kernel.tune(2048, 768, 128, 8, [3000])
    tuned = dict(tuning._chosen)
    assert {key[0] for key in tuned} == {"gate_up", "grouped_gemm", "dgrad", "wgrad"}
    leaves, index, grad_out = _qwen3_30b_problem(3500, 600)  # same rows-per-expert bucket as T=3000
    _run(kernel, leaves, index, grad_out)
    assert tuning._chosen == tuned


@pytest.mark.gpu
def test_gpu_autotune_chooses_once_per_key_and_writes_the_cache_file(kernel, tmp_path, monkeypatch):
    tuning = kernel.tuning
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE", "1")
    monkeypatch.setenv("QWEN3_MOE_FUSED_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setattr(tuning, "_chosen", {})
    leaves, index, grad_out = _qwen3_30b_problem(2048, 500)
    first = _run(kernel, leaves, index, grad_out)
    kinds = {key[0] for key in tuning._chosen}
    assert kinds == {"gate_up", "grouped_gemm", "dgrad", "wgrad"}
    entries = json.loads(cache.read_text())
    assert {tuple(e["key"]) for e in entries} == set(tuning._chosen)
    assert all(e["config"] in tuning.CANDIDATES[e["key"][0]] for e in entries)
    chosen = dict(tuning._chosen)
    second = _run(kernel, leaves, index, grad_out)  # no new tuning, same configs: same bits
    assert tuning._chosen == chosen
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    monkeypatch.setattr(tuning, "_chosen", {})  # a later process reads the choices from the file
    monkeypatch.setattr(tuning, "_loaded_file", None)
    third = _run(kernel, leaves, index, grad_out)
    assert tuning._chosen == chosen and torch.equal(first[0], third[0])
