"""QLoRA on a tiny Qwen3-MoE: experts in 4-bit (``Tensor4bit``, read by the fused kernels: Triton's interpreter on
CPU), the linear layers as bitsandbytes ``Linear4bit``, stock PEFT LoRA on both; compared with stock PEFT on the
dense model whose weights are the dequantized ones (what the 4-bit model holds), so only the storage differs."""

import copy
import logging

import pytest
import torch

from qwen3_moe_patch import dequantize_4bit, patch_qwen3_moe, quantize_4bit
from qwen3_moe_patch.presets import make_model

from test_lora import Allocations, random_factors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOL = dict(rtol=2e-4, atol=2e-5)  # float32 through the interpreter vs eager float32 on the same values
DENSE_COPY = "computes on its dequantized copy"


@pytest.fixture
def bnb_peft(bnb):
    """bitsandbytes importable, and PEFT told so (it caches whether it is installed)."""
    import bitsandbytes
    from peft import import_utils

    import_utils.is_bnb_available.cache_clear()
    import_utils.is_bnb_4bit_available.cache_clear()
    return bitsandbytes


def _ids(seed, shape=(2, 11)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))  # the tiny vocabulary


def _config(quant_type="nf4", nested=True):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                              bnb_4bit_compute_dtype=torch.float32)


def _models(kernel, bnb, seed=0, quant_type="nf4", nested=True):
    """(4-bit model, dense model holding exactly its dequantized weights, the original dense model)."""
    dense = make_model(seed=seed, moe_intermediate_size=64).to(DEVICE)  # rows of whole 64-element blocks
    quantized = quantize_4bit(copy.deepcopy(dense), _config(quant_type, nested), device=DEVICE)
    equal = copy.deepcopy(dense)
    for (name, p), (_, q) in zip(equal.named_parameters(), quantized.named_parameters()):
        with torch.no_grad():
            if isinstance(q, kernel.Tensor4bit):
                p.copy_(kernel.weights4bit.dequantize(q.weight4bit))
            elif isinstance(q, bnb.nn.Params4bit):
                p.copy_(bnb.functional.dequantize_4bit(q.data, q.quant_state))
    return quantized, equal, dense


def test_quantize_4bit_keeps_names_and_shapes_and_the_kernels_read_the_4bit_weights(kernel, bnb_peft, caplog):
    quantized, equal, dense = _models(kernel, bnb_peft)
    names = dict(dense.named_parameters())
    got = dict(quantized.named_parameters())
    assert got.keys() == names.keys()
    experts = [n for n in got if n.endswith(tuple(EXPERTS))]
    assert len(experts) == 2 * dense.config.num_hidden_layers
    for name in experts:
        assert type(got[name]).__name__ == "Tensor4bit" and got[name].shape == names[name].shape
        assert got[name].dtype == names[name].dtype and not got[name].requires_grad
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb_peft.nn.Linear4bit)
    assert type(quantized.lm_head) is torch.nn.Linear  # skipped, as transformers skips it
    patch_qwen3_moe(quantized, kernel=kernel)
    ids = _ids(0)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        logits = quantized(input_ids=ids.to(DEVICE)).logits
        want = equal(input_ids=ids.to(DEVICE)).logits
    torch.testing.assert_close(logits, want, **TOL)
    assert not (logits - dense(input_ids=ids.to(DEVICE)).logits).abs().max().item() < 1e-6  # 4-bit is not exact
    assert DENSE_COPY not in caplog.text


def _lora(model, seed):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS)
    return random_factors(get_peft_model(model, config), seed)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_trains_like_stock_peft_on_the_dequantized_weights_without_a_dense_expert_weight(kernel, bnb_peft,
                                                                                               caplog):
    """Loss and every LoRA gradient (experts and attention) of PEFT on the 4-bit model through the fused kernels
    equal stock PEFT's on the dense model with the same (dequantized) weights; no op forms anything the size of
    an experts weight (PEFT's LoRA parametrization included)."""
    quantized, equal, _ = _models(kernel, bnb_peft, seed=1, quant_type="fp4", nested=False)
    qlora, stock = _lora(quantized, 2), _lora(equal, 2)
    patch_qwen3_moe(qlora, kernel=kernel)
    ids = _ids(1).to(DEVICE)
    experts_numel = min(p.numel() for n, p in qlora.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    with caplog.at_level(logging.WARNING), Allocations() as allocations:
        loss, grads = _step(qlora, ids)
    want_loss, want_grads = _step(stock, ids)
    assert allocations.largest < experts_numel, allocations.op
    assert DENSE_COPY not in caplog.text
    torch.testing.assert_close(loss, want_loss, **TOL)
    assert grads.keys() == want_grads.keys()
    assert any("experts" in n for n in grads) and any("q_proj" in n for n in grads)
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(g, want_grads[name], **TOL, msg=name)


def test_torch_compile_of_the_qlora_model_gives_eager_loss_and_gradients(kernel, bnb_peft, caplog, monkeypatch):
    """torch.compile of the patched QLoRA model (PEFT LoRA on 4-bit experts and Linear4bit attention): the
    experts run eagerly between the compiled graphs (PEFT registers its parametrization at every forward, which
    dynamo cannot trace), said once; the loss is eager's and the gradients agree to float32 rounding."""
    quantized, _, _ = _models(kernel, bnb_peft, seed=11)
    model = _lora(quantized, 11)
    patch_qwen3_moe(model, kernel=kernel)
    ids = _ids(11).to(DEVICE)
    want_loss, want_grads = _step(model, ids)
    monkeypatch.setattr(model, "forward", torch.compile(model.forward, backend="aot_eager"))
    monkeypatch.setattr(kernel.layers, "_said", set())
    with caplog.at_level(logging.WARNING):
        loss, grads = _step(model, ids)
    assert caplog.text.count("does not trace PEFT's LoRA on the experts") == 1
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and any("experts" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_adapter_trained_in_4bit_loads_on_the_dense_model(kernel, bnb_peft, tmp_path):
    """Adapters trained on the 4-bit model are stock PEFT adapters: on the dense model they give the 4-bit model's
    logits up to the quantization error (the same gap the base models have)."""
    from peft import PeftModel

    quantized, _, dense = _models(kernel, bnb_peft, seed=3)
    qlora = _lora(quantized, 4)
    patch_qwen3_moe(qlora, kernel=kernel)
    optimizer = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss, _ = _step(qlora, _ids(10 + step).to(DEVICE))
        optimizer.step()
    qlora.save_pretrained(tmp_path)
    ids = _ids(20).to(DEVICE)
    with torch.no_grad():
        logits_4bit = qlora(input_ids=ids).logits
        with qlora.disable_adapter():
            base_4bit = qlora(input_ids=ids).logits
        base_dense = dense(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(dense, tmp_path)
        logits_dense = loaded(input_ids=ids).logits
    base_gap = (base_4bit - base_dense).abs().max().item()
    gap = (logits_4bit - logits_dense).abs().max().item()
    effect = (logits_dense - base_dense).abs().max().item()
    assert gap < 2 * base_gap + 1e-5, (gap, base_gap)
    assert effect > 10 * gap, (effect, gap)  # the adapter was loaded and matters


def test_tensor4bit_moves_keeps_its_storage_and_refuses_writes(kernel, bnb, caplog):
    w = torch.randn(2, 8, 64, dtype=torch.float32) * 0.1
    stored = kernel.Tensor4bit(kernel.weights4bit.from_bnb(*bnb.quantize_4bit(w.to(DEVICE), quant_type="nf4")))
    exact = kernel.weights4bit.dequantize(stored.weight4bit)
    param = torch.nn.Parameter(stored, requires_grad=False)
    for same in (param.detach(), param.clone(), param.to(DEVICE)):
        assert type(same) is type(stored) and torch.equal(same.weight4bit.packed, stored.weight4bit.packed)
        assert torch.equal(kernel.weights4bit.dequantize(same.weight4bit), exact)
    half = param.to(torch.float16)
    assert type(half) is type(stored) and half.dtype == torch.float16 and half.weight4bit.packed is stored.weight4bit.packed
    with pytest.raises(RuntimeError, match="frozen"):
        with torch.no_grad():
            param.add_(1.0)
    lhs, rhs = torch.randn(2, 8, 3, device=DEVICE), torch.randn(2, 3, 64, device=DEVICE)
    lazy = torch.baddbmm(param, lhs, rhs, alpha=0.5)  # PEFT's LoRA parametrization: nothing computed
    assert type(lazy) is type(stored) and lazy.lora is not None
    with caplog.at_level(logging.WARNING):
        total = lazy.sum()  # any other op: on the dense values, said once
    assert DENSE_COPY in caplog.text
    torch.testing.assert_close(total, torch.baddbmm(exact, lhs, rhs, alpha=0.5).sum(), rtol=1e-5, atol=1e-4)
    assert "Tensor4bit(shape=(2, 8, 64)" in repr(param)


def test_dequantize_4bit_gives_dense_experts_back(kernel, bnb_peft):
    quantized, equal, _ = _models(kernel, bnb_peft, seed=5)
    dequantize_4bit(quantized)
    for (name, p), (_, q) in zip(equal.named_parameters(), quantized.named_parameters()):
        if name.endswith(tuple(EXPERTS)):
            assert type(q) is torch.nn.Parameter and torch.equal(p, q), name


def _per_expert_entries_match(kernel, bnb, state, model, nested):
    """Every 4-bit experts weight of ``model`` is in ``state`` as per-expert bitsandbytes entries (packed bytes
    [n/2, 1] plus QuantState entries under experts.{e}.{gate,up,down}_proj.weight) which bitsandbytes' own
    dequantize_4bit turns bit for bit into that expert's rows."""
    stats = {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"} | (
        {"nested_absmax", "nested_quant_map"} if nested else set())
    assert not any(k.endswith(tuple(EXPERTS)) for k in state)
    checked = 0
    for layer, block in enumerate(model.model.layers):
        for name, projections in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            whole = kernel.weights4bit.dequantize(getattr(block.mlp.experts, name).weight4bit)
            rows = whole.shape[1] // len(projections)
            for e in range(whole.shape[0]):
                for j, projection in enumerate(projections):
                    key = f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight"
                    assert state[key].dtype == torch.uint8
                    assert tuple(state[key].shape) == (rows * whole.shape[2] // 2, 1)
                    assert {k[len(key) + 1:] for k in state if k.startswith(key + ".")} == stats, key
                    quant_state = bnb.functional.QuantState.from_dict(
                        {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(key + ".")}, device=DEVICE)
                    assert torch.equal(bnb.functional.dequantize_4bit(state[key], quant_state),
                                       whole[e, j * rows:(j + 1) * rows]), key
                    checked += 1
    assert checked == len(model.model.layers) * 3 * model.config.num_experts


@pytest.mark.parametrize("intermediate", [64, 256], ids=["float32-scales", "nested"])
def test_4bit_experts_state_dict_is_per_expert_bitsandbytes_and_loads_back(kernel, bnb_peft, tmp_path, intermediate):
    """The state dict holds each expert's projections as a per-expert bitsandbytes checkpoint does
    (``_per_expert_entries_match``); the nested scales stay nested where each expert's blocks start a group of
    256 (intermediate 256: 256 blocks per expert and projection) and are float32 otherwise; safetensors saves it,
    and load_state_dict into another 4-bit model restores every experts weight bit for bit (its storage too, where
    nested), the same logits; entries of some experts only are refused."""
    from safetensors.torch import load_file, save_file

    quantized = quantize_4bit(make_model(seed=8, moe_intermediate_size=intermediate).to(DEVICE), _config(),
                              device=DEVICE)
    other = quantize_4bit(make_model(seed=9, moe_intermediate_size=intermediate).to(DEVICE), _config(),
                          device=DEVICE)
    state = quantized.state_dict()
    _per_expert_entries_match(kernel, bnb_peft, state, quantized, nested=intermediate == 256)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors", device=DEVICE)
    partial = {k: v for k, v in loaded.items() if ".experts.1.down_proj.weight" not in k}
    with pytest.raises(ValueError, match="4-bit entries for some experts only"):
        copy.deepcopy(other).load_state_dict(partial, strict=False)
    result = other.load_state_dict(loaded, strict=False)
    assert result.missing_keys == []
    # bitsandbytes' Linear4bit does not read its quant-state entries back through load_state_dict (transformers'
    # bnb loader does); the experts' entries are all consumed
    assert result.unexpected_keys and all(".experts." not in k for k in result.unexpected_keys)
    for name in (n for n, _ in quantized.named_parameters() if n.endswith(tuple(EXPERTS))):
        a, b = quantized.get_parameter(name).weight4bit, other.get_parameter(name).weight4bit
        assert torch.equal(kernel.weights4bit.dequantize(a), kernel.weights4bit.dequantize(b)), name
        assert b.nested == (intermediate == 256)
        if b.nested:
            assert all(torch.equal(x, y) for x, y in zip(a, b) if isinstance(x, torch.Tensor)), name
    for model in (quantized, other):  # the attention layers' weights too (Linear4bit's own state)
        for module_name, module in model.named_modules():
            if isinstance(module, bnb_peft.nn.Linear4bit):
                module.weight = quantized.get_submodule(module_name).weight
    patch_qwen3_moe(quantized, kernel=kernel)
    patch_qwen3_moe(other, kernel=kernel)
    ids = _ids(8).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, other(input_ids=ids).logits)


def test_from_pretrained_quantizes_the_experts_as_it_loads(kernel, bnb_peft, tmp_path):
    """``from_pretrained(..., quantization_config=experts_4bit(config))`` on a dense checkpoint (saved by
    transformers in its per-expert layout) gives the model ``quantize_4bit`` makes of the dense model: every
    4-bit tensor bit for bit, the same logits; its save_pretrained writes the experts as per-expert bitsandbytes
    entries, which from_pretrained refuses to load (load_state_dict reads them: the test above)."""
    from transformers import AutoModelForCausalLM

    from qwen3_moe_patch import experts_4bit

    dense = make_model(seed=10, moe_intermediate_size=64)
    dense.save_pretrained(tmp_path / "dense")
    want = quantize_4bit(copy.deepcopy(dense), _config(), device=DEVICE)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=experts_4bit(_config()),
                                               device_map=DEVICE, dtype=torch.float32)
    names = [n for n, _ in want.named_parameters()]
    assert names == [n for n, _ in got.named_parameters()]
    for name in names:
        a, b = want.get_parameter(name), got.get_parameter(name)
        assert type(a) is type(b), name
        if isinstance(a, kernel.Tensor4bit):
            assert all(torch.equal(x, y) for x, y in zip(a.weight4bit, b.weight4bit) if isinstance(x, torch.Tensor))
        else:
            assert torch.equal(a, b), name
    assert sum(isinstance(p, kernel.Tensor4bit) for p in got.parameters()) == 2 * len(got.model.layers)
    patch_qwen3_moe(want, kernel=kernel)
    patch_qwen3_moe(got, kernel=kernel)
    want.eval()  # as from_pretrained leaves a model (bitsandbytes' CPU Linear4bit takes another path in eval mode)
    ids = _ids(10).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(want(input_ids=ids).logits, got(input_ids=ids).logits)
    got.save_pretrained(tmp_path / "4bit")  # the experts as per-expert bitsandbytes entries
    from safetensors.torch import load_file

    _per_expert_entries_match(kernel, bnb_peft, load_file(tmp_path / "4bit" / "model.safetensors", device=DEVICE),
                              got, nested=False)  # 64 blocks per expert and projection: float32 scales
    for config in (experts_4bit(_config()), None):  # transformers refuses to load its 4-bit experts
        with pytest.raises((ValueError, RuntimeError), match="quantized with|ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "4bit", quantization_config=config, device_map=DEVICE,
                                                 dtype=torch.float32)
    make_model(seed=10).save_pretrained(tmp_path / "rows32")  # the tiny preset's experts: rows of 32
    with pytest.raises(ValueError, match="multiple of 64.*without qwen3_moe_fused_4bit"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "rows32", quantization_config=experts_4bit(_config()),
                                             device_map=DEVICE, dtype=torch.float32)


def test_quantize_4bit_refuses_what_it_cannot_hold(kernel, bnb_peft):
    from transformers import BitsAndBytesConfig

    model = make_model(seed=6, moe_intermediate_size=64)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="quant_storage"):
        quantize_4bit(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16))
    with pytest.raises(ValueError, match="load_in_4bit"):
        quantize_4bit(model, BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize_4bit(_lora(copy.deepcopy(model), 7), _config())
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_4bit(make_model(seed=6), _config())  # the tiny preset's experts: rows of 32
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing changed


def test_train_qlora_builds_4bit_layers_piece_by_piece_and_trains(kernel, bnb_peft):
    """The train loop's QLoRA run (what ``train --qlora`` and benchmarks/qlora.sh run): decoder layers in 4-bit,
    built layer by layer, LoRA in float32, 8-bit AdamW; the memory breakdown sees the 4-bit storage."""
    from qwen3_moe_patch import train

    with pytest.raises(ValueError, match="--lora-r"):
        train.build_model("fused", qlora=True, device=DEVICE)
    (run,) = train.compare(["fused"], steps=2, batch=2, seq=16, lora_r=4, qlora=True, optim="adamw8bit",
                           config_overrides={"moe_intermediate_size": 64}, kernel=kernel, device=DEVICE,
                           show_progress=False)
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))
    memory = run.memory_mib
    assert memory["experts 4-bit"] > 0 and memory["linear 4-bit"] > 0 and memory["trainable"] > 0
    assert memory["optimizer"] > 0 and memory["frozen dense"] > 0  # embedding, norms, head
    assert memory["gradients"] == pytest.approx(memory["trainable"], rel=1e-6)  # one gradient per trainable
    with pytest.raises(ValueError, match="drop one of them"):
        train.build_model("fused", piecewise=True, model_path="somewhere", device=DEVICE)
