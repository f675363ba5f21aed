"""patch_qwen3_moe / unpatch_qwen3_moe on an unmodified tiny transformers Qwen3-MoE."""

import logging

import kernels
import pytest
import torch
from torch import nn

from qwen3_moe_patch import find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from qwen3_moe_patch.presets import make_model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _ids(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("how", ["kernelize", "forward"])
def test_patch_matches_unpatched_and_unpatch_restores(kernel, build_dir, how):
    ref = make_model(seed=7, experts_implementation="eager")
    model = make_model(seed=7, experts_implementation="eager")
    ids = _ids(model)
    expected, expected_grads = _loss_and_grads(ref, ids)

    kwargs = dict(version=1) if how == "kernelize" else dict(kernel=kernel)
    report = patch_qwen3_moe(model, **kwargs)
    assert report.method == how and len(report.blocks) == 4
    assert report.mode == (str(kernels.Mode.TRAINING) if how == "kernelize" else None)
    layer_forward = kernel.layers.Qwen3MoeSparseMoeBlock.forward
    assert all(b.forward.__func__ is layer_forward for _, b in find_moe_blocks(model))

    out, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(out.loss, expected.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=2e-5, atol=2e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], rtol=2e-5, atol=2e-5, msg=name)

    assert unpatch_qwen3_moe(model) == 4
    assert all("forward" not in b.__dict__ for _, b in find_moe_blocks(model))
    assert unpatch_qwen3_moe(model) == 0


def test_patch_keeps_parameters_and_checkpoint_files(kernel, tmp_path):
    model = make_model(seed=8)
    before = {n: (p.data_ptr(), p.dtype, p.device, p.shape) for n, p in model.named_parameters()}
    model.save_pretrained(tmp_path / "unpatched")
    patch_qwen3_moe(model, kernel=kernel)
    assert {n: (p.data_ptr(), p.dtype, p.device, p.shape) for n, p in model.named_parameters()} == before
    model.save_pretrained(tmp_path / "patched")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "unpatched" / name).read_bytes()


def test_patching_twice_is_a_no_op_with_a_message(kernel, caplog):
    model = make_model(seed=9)
    first = patch_qwen3_moe(model, kernel=kernel)
    with caplog.at_level(logging.WARNING, logger="qwen3_moe_patch"):
        assert patch_qwen3_moe(model, kernel=kernel) is first
    assert "already patched" in caplog.text
    assert unpatch_qwen3_moe(model) == 4


def test_unpatch_restores_a_forward_that_was_on_the_instance(kernel):
    model = make_model(seed=10)
    _, block = find_moe_blocks(model)[0]
    hook = block.forward  # stand-in for a wrapper such as accelerate's hook
    block.forward = hook
    patch_qwen3_moe(model, kernel=kernel)
    assert block.forward is not hook
    unpatch_qwen3_moe(model)
    assert block.forward is hook


def test_refuses_models_without_moe_blocks(kernel):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="has no Qwen3MoeSparseMoeBlock"):
        patch_qwen3_moe(model, kernel=kernel)


def test_refuses_non_silu_experts_and_leaves_model_unchanged(kernel):
    model = make_model(seed=11, hidden_act="gelu")
    with pytest.raises(ValueError, match="activation .* not supported"):
        patch_qwen3_moe(model, kernel=kernel)
    assert all("forward" not in b.__dict__ for _, b in find_moe_blocks(model))


def test_unloadable_kernel_names_repo_and_reason_and_leaves_model_unchanged(hub_revision):
    model = make_model(seed=12)
    with pytest.raises(RuntimeError, match=r"org/qwen3-moe-fused v7.*Version 7"):
        patch_qwen3_moe(model, version=7)
    with pytest.raises(RuntimeError, match=r"org/qwen3-moe-fused v7.*Version 7"):
        patch_qwen3_moe(model, version=7, use_kernelize=False)
    assert all("forward" not in b.__dict__ for _, b in find_moe_blocks(model))
