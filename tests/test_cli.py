"""The README's main job, `qwen3-moe-fused check`, and `qwen3-moe-fused build`, run as a user runs them."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _run(*args, cwd=ROOT):
    # As a user runs it: no test-session Hub cache, no Triton interpreter.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_") and k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "qwen3_moe_patch.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_check_trains_like_hf_eager():
    result = _run("check", "--steps", "3", "--seq", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded org/qwen3-moe-fused v1 offline from the local Hub cache" in result.stdout
    assert "patched 4 MoE blocks" in result.stdout and "check passed" in result.stdout
    revision = result.stdout.split("revision ")[1].split()[0]
    assert f"v1 (commit {revision}" in result.stdout  # the report names the Hub commit it runs
    assert result.stderr.count("use the pure-torch reference path") == 1  # said once


def test_build_writes_variants_and_a_hub_cache(tmp_path):
    result = _run("build", "--project", str(ROOT), "--out", str(tmp_path / "build"), "--hub-cache", str(tmp_path / "hub"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "build" / "torch-cuda" / "metadata.json").read_text())
    assert meta["id"].startswith("_qwen3_moe_fused_cuda_")
    repo = tmp_path / "hub" / "kernels--org--qwen3-moe-fused"
    revision = (repo / "refs" / "v1").read_text()
    assert (repo / "refs" / "main").read_text() == revision
    assert (repo / "snapshots" / revision / "build" / "torch-cpu" / "metadata.json").is_file()
