"""Stock PEFT LoRA on the experts (target_parameters) through the fused kernels, against stock PEFT."""

import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import qwen3_moe_patch
from qwen3_moe_patch import find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from qwen3_moe_patch.presets import make_model

from test_patch import TOL, _ids

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# The kernels' device: CUDA, or the CPU through the interpreter (conftest); CPU tensors on a CUDA machine take
# the reference path, which (as the spec) forms W + ΔW.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _peft_model(seed, config, impl="eager", device="cpu", dtype=torch.float32):
    return random_factors(get_peft_model(make_model(seed=seed, experts_implementation=impl).to(device, dtype), config),
                          seed)


class Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest floating tensor (in elements of its storage) any torch op creates while this is on. Results
    in an input's storage (views, in-place ops) are not new; tensor subclasses' results (a ``Tensor4bit``, also
    one carrying PEFT's LoRA factors) hold no dense data; elements a result only repeats (an expanded stand-in)
    are not counted."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if type(t) in (torch.Tensor, torch.nn.Parameter)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if type(t) is torch.Tensor and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                size = min(t.numel(), t.untyped_storage().nbytes() // t.element_size())
                if size > self.largest:
                    self.largest, self.op = size, func.name()
        return out


def random_factors(model, seed):
    """``model`` with every LoRA factor drawn at random (the same for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero: give every factor values, the same for the same seed
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _saved_weight_sized(model, ids):
    """Saved-for-backward tensors shaped like a stacked expert weight, or views of one (e.g. W + ΔW or its
    per-expert slices), other than the weights themselves."""
    weights = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if "experts" in n}
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "experts" in n and p.dim() == 3}
    found = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
        model(input_ids=ids, labels=ids)
    whole = [t._base if t._base is not None else t for t in found]
    return [tuple(t.shape) for t in whole if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in weights]


def _compare(model, stock, ids, tol=TOL):
    (out, grads), (want, want_grads) = _step(model, ids), _step(stock, ids)
    torch.testing.assert_close(out.loss, want.loss, **tol)
    torch.testing.assert_close(out.aux_loss, want.aux_loss, **tol)
    assert grads.keys() == want_grads.keys() and any("experts" in n and "lora_A" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **tol, msg=name)


@pytest.mark.parametrize("how", ["kernelize", "forward", "experts_implementation"])
def test_patched_peft_lora_trains_like_stock_peft_without_forming_w_plus_delta(kernel, how, caplog):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS, target_modules=["q_proj"])
    stock = _peft_model(1, config, device=DEVICE)
    model = _peft_model(1, config, device=DEVICE)
    if how == "experts_implementation":
        qwen3_moe_patch.register_experts_implementation(kernel=kernel)
        model.base_model.model.set_experts_implementation("qwen3_moe_fused")
    else:
        patch_qwen3_moe(model, **(dict(version=1) if how == "kernelize" else dict(kernel=kernel)))
    ids = _ids(model)
    with caplog.at_level(logging.WARNING):
        _compare(model, stock, ids)
        assert _saved_weight_sized(model, ids) == []
    assert "materialised" not in caplog.text and "as it forms it" not in caplog.text
    assert _saved_weight_sized(stock, ids)  # stock PEFT keeps W + ΔW (the check can see it)
    # Nothing of an experts weight's size is formed either: where the fused block calls the PEFT-wrapped experts,
    # not even the W + ΔW that registering PEFT's parametrization evaluates to check it (transformers' own block,
    # under the experts implementation alone, still makes that evaluation).
    experts_numel = min(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    for checked, allocates in ((model, how == "experts_implementation"), (stock, True)):
        with Allocations() as allocations:
            _step(checked, ids)
        assert (allocations.largest >= experts_numel) == allocates, (how, allocations.op)


def test_v4_style_target_modules_with_rslora(kernel):
    """PEFT converts gate_proj/up_proj/down_proj to target_parameters (gate_up at rank 2r); rsLoRA scaling."""
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"])
    stock, model = _peft_model(2, config), _peft_model(2, config)
    a = [p for n, p in model.named_parameters() if "experts.base_layer.lora_A" in n][0]
    assert a.shape[0] == 2 * 4 * 8  # 2r·E rows: the converted config
    patch_qwen3_moe(model, kernel=kernel)
    _compare(model, stock, _ids(model))


def test_router_lora(kernel):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS + ["mlp.gate.weight"])
    stock, model = _peft_model(3, config), _peft_model(3, config)
    assert any("gate.lora_A" in n for n, _ in model.named_parameters())
    patch_qwen3_moe(model, kernel=kernel)
    _compare(model, stock, _ids(model))


def test_disabled_and_merged_adapters(kernel):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS)
    stock, model = _peft_model(4, config), _peft_model(4, config)
    patch_qwen3_moe(model, kernel=kernel)
    ids = _ids(model)
    with torch.no_grad():
        with model.disable_adapter(), stock.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, **TOL)
        plain = stock(input_ids=ids).logits
        for m in (model, stock):
            m.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, **TOL)
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=1e-4, atol=1e-4)
        for m in (model, stock):
            m.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, plain, **TOL)


def test_adapters_save_load_and_merge_like_stock(kernel, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS)
    stock, model = _peft_model(5, config), _peft_model(5, config)
    patch_qwen3_moe(model, kernel=kernel)
    model.save_pretrained(tmp_path / "patched")
    stock.save_pretrained(tmp_path / "stock")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "stock" / name).read_bytes()
    loaded = PeftModel.from_pretrained(make_model(seed=5, experts_implementation="eager"), tmp_path / "patched")
    patch_qwen3_moe(loaded, kernel=kernel)
    ids = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, stock(input_ids=ids).logits, **TOL)
    unpatch_qwen3_moe(model)
    merged, stock_merged = model.merge_and_unload(), stock.merge_and_unload()
    for (name, p), q in zip(merged.named_parameters(), stock_merged.parameters()):
        assert torch.equal(p, q), name
    assert not any("forward" in b.__dict__ for _, b in find_moe_blocks(merged))


def test_several_active_adapters_fall_back_with_one_warning(kernel, caplog):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=EXPERTS)
    stock, model = _peft_model(6, config), _peft_model(6, config)
    for m in (stock, model):
        m.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_parameters=EXPERTS))
        m.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        for m in (stock, model):  # same non-zero values for the second adapter
            gen = torch.Generator().manual_seed(7)
            for name, p in m.named_parameters():
                if "second" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    patch_qwen3_moe(model, kernel=kernel)
    ids = _ids(model)
    kernel.layers._said.clear()  # "said once" per process: start this count from zero
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, **TOL)
            model(input_ids=ids)
    assert caplog.text.count("materialised W + ΔW") == 1 and "several active adapters" in caplog.text


@pytest.mark.gpu
def test_gpu_bfloat16_lora_matches_stock_peft(kernel):
    config = LoraConfig(r=16, lora_alpha=32, target_parameters=EXPERTS)
    stock = _peft_model(8, config, impl="grouped_mm", device="cuda", dtype=torch.bfloat16)
    model = _peft_model(8, config, device="cuda", dtype=torch.bfloat16)
    patch_qwen3_moe(model, version=1)
    ids = _ids(model, shape=(4, 64))
    _compare(model, stock, ids, tol=dict(rtol=5e-2, atol=5e-2))
    assert _saved_weight_sized(model, ids) == []
