"""patch_qwen3_moe(model, liger=True): Liger-Kernel's RMSNorm, RoPE and fused linear cross-entropy composed with
the fused experts; unpatch gives back the model (and transformers' module) exactly as they were.

Liger's kernels do not run on CPU (its RMSNorm kernel fails in Triton's interpreter), so the CPU tests check
what the composition changes and undoes; the GPU test checks that it trains like the unpatched model.
"""

import copy

import pytest
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe

import qwen3_moe_patch.liger as liger
from qwen3_moe_patch import find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from qwen3_moe_patch.presets import make_model


def _state(model):
    """Every module's own attributes (values by identity) and transformers' qwen3_moe module names."""
    return [(m, dict(m.__dict__)) for m in model.modules()], dict(vars(modeling_qwen3_moe))


def _assert_state(model, state):
    modules, names = state
    assert [m for m, _ in modules] == list(model.modules())
    for module, attributes in modules:
        assert module.__dict__.keys() == attributes.keys(), type(module).__name__
        assert all(module.__dict__[k] is v for k, v in attributes.items()), type(module).__name__
    assert vars(modeling_qwen3_moe).keys() == names.keys()
    assert all(vars(modeling_qwen3_moe)[k] is v for k, v in names.items())


def test_liger_composition_applies_liger_and_unpatch_restores_everything(kernel):
    from liger_kernel.transformers.model.qwen3_moe import lce_forward
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    model = make_model(seed=3)
    state = _state(model)
    experts = [(b.experts, dict(b.experts.__dict__)) for _, b in find_moe_blocks(model)]
    report = patch_qwen3_moe(model, kernel=kernel, liger=True)
    assert report.liger == liger.installed_version() in liger.TESTED_VERSIONS
    assert "Liger's RMSNorm, RoPE, fused linear cross-entropy" in str(report)
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm"]
    assert len(norms) == 4 * 4 + 1  # per layer: input, post-attention, q and k norms; the final norm
    assert all(m.forward.__func__ is LigerRMSNorm.forward for m in norms)
    assert model.forward.__func__ is lce_forward
    assert modeling_qwen3_moe.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert modeling_qwen3_moe.Qwen3MoeRMSNorm is LigerRMSNorm
    for module, attributes in experts:  # the experts stay ours: Liger's own experts are not applied
        assert module.__dict__.keys() == attributes.keys()
    assert all(b.forward.__func__ is kernel.layers.Qwen3MoeSparseMoeBlock.forward for _, b in find_moe_blocks(model))
    copy.deepcopy(model)  # the record deep-copies with the model (TRL's reference model, EMA copies)
    assert unpatch_qwen3_moe(model) == 4
    _assert_state(model, state)


@pytest.mark.parametrize("order", ["peft_first", "patch_first"])
def test_liger_composition_under_peft_patches_the_inner_model(kernel, order):
    from liger_kernel.transformers.model.qwen3_moe import lce_forward
    from peft import LoraConfig, get_peft_model

    model = make_model(seed=4)
    config = LoraConfig(r=4, target_modules=["q_proj"])
    if order == "peft_first":
        model = get_peft_model(model, config)
        state = _state(model)
        patch_qwen3_moe(model, kernel=kernel, liger=True)
    else:
        state = _state(model)
        patch_qwen3_moe(model, kernel=kernel, liger=True)
        model = get_peft_model(model, config)
    inner = model.base_model.model
    assert inner.forward.__func__ is lce_forward and "forward" not in model.__dict__
    assert unpatch_qwen3_moe(model) == 4
    if order == "peft_first":
        _assert_state(model, state)
    else:  # PEFT's own LoRA layers stay; everything else is as before patching
        assert "forward" not in inner.__dict__
        assert modeling_qwen3_moe.apply_rotary_pos_emb is state[1]["apply_rotary_pos_emb"]
        assert all("forward" not in m.__dict__ for m in inner.modules() if type(m).__name__ == "Qwen3MoeRMSNorm")


@pytest.mark.parametrize("installed", [None, "0.0.1"], ids=["missing", "untested"])
def test_missing_or_untested_liger_is_a_clear_error_and_changes_nothing(kernel, monkeypatch, installed):
    model = make_model(seed=5)
    state = _state(model)
    monkeypatch.setattr(liger, "installed_version", lambda: installed)
    with pytest.raises(ImportError, match=r"pip install liger-kernel==0\.8\.5"):
        patch_qwen3_moe(model, kernel=kernel, liger=True)
    _assert_state(model, state)


def test_liger_needs_a_causal_lm(kernel):
    base = make_model(seed=6).model  # Qwen3MoeModel: no lm_head, no loss for Liger's fused cross-entropy
    state = _state(base)
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM"):
        patch_qwen3_moe(base, kernel=kernel, liger=True)
    _assert_state(base, state)


def test_patching_again_with_liger_switches_and_unpatch_restores(kernel):
    model = make_model(seed=8)
    state = _state(model)
    assert patch_qwen3_moe(model, kernel=kernel).liger is None
    assert patch_qwen3_moe(model, kernel=kernel, liger=True).liger  # same kernel, Liger added
    assert patch_qwen3_moe(model, kernel=kernel, liger=True).liger  # already so: nothing done
    assert patch_qwen3_moe(model, kernel=kernel).liger is None  # Liger removed again, the experts still ours
    assert modeling_qwen3_moe.apply_rotary_pos_emb is state[1]["apply_rotary_pos_emb"]
    assert "forward" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ == "Qwen3MoeRMSNorm")
    assert all(b.forward.__func__ is kernel.layers.Qwen3MoeSparseMoeBlock.forward for _, b in find_moe_blocks(model))
    unpatch_qwen3_moe(model)
    _assert_state(model, state)


@pytest.mark.gpu
def test_liger_composition_trains_like_unpatched(kernel):
    """float32 on the GPU, 3 AdamW steps on the same batches: losses and final weights agree with the unpatched
    model's (Liger's kernels and ours sum in other orders)."""
    losses = {}
    for liger_on in (False, True):
        model = make_model(seed=9).cuda().float()
        if liger_on:
            patch_qwen3_moe(model, kernel=kernel, liger=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        curve = []
        for _ in range(3):
            ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen).cuda()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        losses[liger_on] = curve
        if liger_on:
            unpatch_qwen3_moe(model)
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < 1e-4, losses
