"""A new user's first hour: the kernel offline without HF_HUB_OFFLINE, the plugin without the checkout, one-line CLI
errors with exit status 2, clear messages, no state left behind, honest figures, readable output."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qwen3_moe_patch import find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from qwen3_moe_patch.presets import make_model

from conftest import ROOT

PATCH_PACKAGE = ROOT / "patch" / "qwen3_moe_patch"
# No network: the Hub's address fails at once through a dead proxy (CI has no route to it either).
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def _env(hub_cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_") and k != "TRITON_INTERPRET"}
    return {**env, **NO_NETWORK, "HF_HUB_CACHE": str(hub_cache), **extra}


def _python(code, env, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pip_only(tmp_path_factory):
    """The plugin as a wheel installs it: its package folder alone, away from the checkout."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(PATCH_PACKAGE, site / "qwen3_moe_patch", ignore=shutil.ignore_patterns("__pycache__"))
    return site


# --- 1. offline first -----------------------------------------------------------------------------------------


def test_default_revision_and_locked_sources_load_from_the_local_hub_cache_without_network(hub_revision, hub_cache):
    code = f"""
    import time
    from qwen3_moe_patch import patch_qwen3_moe
    from qwen3_moe_patch.presets import make_model
    for args in ({{}}, {{"revision": "{hub_revision}"}}, {{"locked": True}}):
        start = time.perf_counter()
        report = patch_qwen3_moe(make_model(seed=0), **args)
        assert report.commit == "{hub_revision}", report
        print(report.kernel, round(time.perf_counter() - start, 1))
    """
    result = _python(code, _env(hub_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trust_remote_code" not in result.stderr and "ConnectError" not in result.stderr
    assert max(float(line.split()[-1]) for line in result.stdout.splitlines()) < 20  # no network retries


def test_no_cached_kernel_and_no_network_is_one_clear_error(tmp_path):
    code = """
    from qwen3_moe_patch import patch_qwen3_moe
    from qwen3_moe_patch.presets import make_model
    patch_qwen3_moe(make_model(seed=0))
    """
    result = _python(code, _env(tmp_path / "empty-cache"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "the Hub is not reachable and the local Hub cache" in last and "Fix:" in last
    assert "qwen3-moe-fused build --hub-cache" in last


# --- 2. pip-only: the plugin without the sources -----------------------------------------------------------------


def _cli(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "qwen3_moe_patch.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_train_and_check_without_the_checkout_use_the_installed_kernel_source(pip_only, hub_revision, hub_cache,
                                                                             tmp_path):
    env = _env(hub_cache, PYTHONPATH=str(pip_only))
    for command in (["train", "--impl", "fused", "--steps", "3", "--batch", "1", "--seq", "16"],
                    ["check", "--steps", "2", "--seq", "8"]):
        result = _cli(*command, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "no kernel sources here (pip-installed plugin): loaded org/qwen3-moe-fused v1" in result.stdout
    assert hub_revision in result.stdout  # check's report names the Hub commit it runs


# --- 3. one-line CLI errors, exit status 2 -------------------------------------------------------------------------


def _error(result):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_cli_errors_are_one_line_with_the_fix(tmp_path, hub_cache):
    env = _env(hub_cache)
    if not torch.cuda.is_available():
        line = _error(_cli("check", "--device", "cuda", env=env, cwd=ROOT))
        assert "CUDA is not available here" in line and "use --device cpu" in line
    for impl in ("liger", "fused-liger"):  # Liger-Kernel's kernels run on CUDA only
        line = _error(_cli("train", "--impl", impl, "--steps", "1", env=env, cwd=ROOT))
        assert f"--impl {impl}: Liger-Kernel's kernels run on CUDA only: add --device cuda" in line
    for scale in (["--fsdp"], ["--ep", "2"], ["--zero3"]):  # without torchrun
        line = _error(_cli("train", *scale, "--steps", "1", env=env, cwd=ROOT))
        assert f"{scale[0]} needs several processes: launch with torchrun --nproc_per_node N" in line
    line = _error(_cli("train", "--layers", "0", env=env, cwd=ROOT))
    assert "argument --layers: '0' is not a whole number ≥ 1" in line
    line = _error(_cli("train", "--layers", "2", "--model", str(tmp_path), env=env, cwd=ROOT))
    assert "--layers sets a preset's depth; a --model checkpoint has its own: drop one of them" in line
    line = _error(_cli("convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "stacked", env=env, cwd=ROOT))
    assert "is not a folder" in line
    make_model(seed=0).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors").write_bytes(b"")
    line = _error(_cli("convert", str(tmp_path / "ckpt"), str(tmp_path / "full"), "--to", "stacked", env=env, cwd=ROOT))
    assert "already holds weights" in line
    debug = _cli("--debug", "convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--to", "stacked", env=env, cwd=ROOT)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# --- 4. clear messages ---------------------------------------------------------------------------------------------


def test_bad_version_and_local_paths_and_non_models_are_named(monkeypatch, tmp_path, kernel):
    model = make_model(seed=1)
    monkeypatch.setenv("QWEN3_MOE_FUSED_VERSION", "abc")
    with pytest.raises(ValueError, match="QWEN3_MOE_FUSED_VERSION must be a kernel version number such as 1, got 'abc'"):
        patch_qwen3_moe(model)
    monkeypatch.delenv("QWEN3_MOE_FUSED_VERSION")
    with pytest.raises(ValueError, match=r"local_path .*missing does not exist"):
        patch_qwen3_moe(model, local_path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no kernel build \(no torch-<backend>/ folder"):
        patch_qwen3_moe(model, local_path=tmp_path / "empty")
    with pytest.raises(TypeError, match="unpatch_qwen3_moe takes the model .* got str"):
        unpatch_qwen3_moe("x")
    assert not any("forward" in b.__dict__ for _, b in find_moe_blocks(model))


# --- 5. no state left behind; a new source is used, never ignored ---------------------------------------------------


def test_a_failed_patch_leaves_transformers_classes_unmarked(hub_revision):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    assert "kernel_layer_name" not in Qwen3MoeSparseMoeBlock.__dict__
    with pytest.raises(RuntimeError, match="v7"):
        patch_qwen3_moe(make_model(seed=2), version=7)
    assert "kernel_layer_name" not in Qwen3MoeSparseMoeBlock.__dict__


def test_patching_with_another_source_switches_to_it(kernel, build_dir, caplog):
    import logging

    model = make_model(seed=3)
    first = patch_qwen3_moe(model, kernel=kernel)
    with caplog.at_level(logging.WARNING, logger="qwen3_moe_patch"):
        second = patch_qwen3_moe(model, local_path=build_dir)
    assert "switching to" in caplog.text and second.kernel == str(build_dir) != first.kernel
    assert second.method == "kernelize" and len(second.blocks) == 4
    assert unpatch_qwen3_moe(model) == 4 and unpatch_qwen3_moe(model) == 0


# --- 6-8. honest figures, readable output, help --------------------------------------------------------------------


def test_cpu_figures_say_what_they_are_and_output_is_not_glued(tmp_path, hub_cache):
    env = _env(hub_cache)
    check = _cli("check", "--steps", "3", "--seq", "8", env=env, cwd=ROOT)
    assert check.returncode == 0, check.stderr[-2000:]
    assert "median of 2 steps" in check.stdout and "no measure of its speed" in check.stdout
    train = _cli("train", "--impl", "fused", "--steps", "4", "--batch", "1", "--seq", "16", "--log-every", "2",
                 env=env, cwd=ROOT)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "n/a (CPU)" in train.stdout and "mean loss, last 10 steps" in train.stdout
    assert "\r" not in train.stderr and "fused step 2/4" in train.stdout  # no progress bar when piped
    assert train.stderr.count("Skipping publisher trust check") <= 1


def test_loss_plot_shows_equal_curves_and_their_difference(tmp_path):
    from qwen3_moe_patch.train import RunResult, plot

    runs = [RunResult("grouped_mm", [3.0, 2.5, 2.2], [1.0] * 3, 8, 0.0),
            RunResult("fused", [3.0, 2.5, 2.2000005], [1.0] * 3, 8, 0.0)]
    fig = plot(runs, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    curves, diff = fig.axes
    assert len({line.get_linestyle() for line in curves.get_lines()}) == 2
    assert [round(y, 7) for y in diff.get_lines()[0].get_ydata()] == [0.0, 0.0, 5e-7]
    assert all(float(t).is_integer() for t in diff.get_xticks())


def test_help_is_plain_text_with_defaults():
    result = subprocess.run([sys.executable, "-m", "qwen3_moe_patch.cli", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "``" not in result.stdout
    lines = result.stdout.splitlines()
    for option in ("--steps", "--batch", "--seq", "--lr", "--seed", "--device", "--dtype"):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
        text = " ".join(lines[at:at + 2]).split()
        assert len(text) > 3, text  # a help text, not only the option
    assert "(default: 50)" in result.stdout and "(default: cpu)" in result.stdout and "(default: None)" not in result.stdout
    top = subprocess.run([sys.executable, "-m", "qwen3_moe_patch.cli", "--help"], capture_output=True, text=True)
    assert "``" not in top.stdout and "--debug" in top.stdout


# --- 10. other Qwen3 MoE families ------------------------------------------------------------------------------------


def _qwen3_next(seed, **overrides):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=64, output_router_logits=True, **overrides))


def _qwen3_5_moe(seed, **overrides):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(
        vocab_size=128, hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"], max_position_embeddings=64,
        output_router_logits=True, **overrides))


@pytest.mark.parametrize("build", [_qwen3_next, _qwen3_5_moe], ids=["qwen3_next", "qwen3_5_moe"])
def test_qwen3_next_and_qwen3_5_moe_are_refused_with_the_route_that_works(kernel, build):
    """Their blocks add a shared expert and already call the experts as a module: patch_qwen3_moe names them and
    the experts implementation, which computes their stacked experts fused (with the shared expert as it is)."""
    import qwen3_moe_patch

    model = build(seed=4)
    block = type(model.model.layers[0].mlp).__name__
    with pytest.raises(ValueError, match=rf"its MoE blocks are {block}.*set_experts_implementation\('qwen3_moe_fused'\)"):
        patch_qwen3_moe(model, kernel=kernel)
    qwen3_moe_patch.register_experts_implementation(kernel=kernel)
    ref = build(seed=4, experts_implementation="eager")
    model.set_experts_implementation("qwen3_moe_fused")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-5, atol=2e-5)
    out.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-5, atol=2e-5, msg=name)


def test_importing_the_plugin_is_light_and_still_registers_the_experts_implementation():
    code = """
    import sys, time
    start = time.perf_counter()
    import qwen3_moe_patch
    took = time.perf_counter() - start
    assert "torch" not in sys.modules and "transformers" not in sys.modules, took
    from transformers.integrations.moe import ExpertsInterface
    assert "qwen3_moe_fused" in ExpertsInterface._global_mapping
    print(f"{took:.2f}")
    """
    result = _python(code, dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 1.0
