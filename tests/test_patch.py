"""patch_qwen3_moe / unpatch_qwen3_moe on an unmodified tiny transformers Qwen3-MoE."""

import json
import logging
from pathlib import Path

import kernels
import pytest
import torch
from torch import nn

from qwen3_moe_patch import find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from qwen3_moe_patch.kernel_build import build_revision
from qwen3_moe_patch.kernel_source import LOCKFILE
from qwen3_moe_patch.presets import make_model

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 CPU: summation order only
# transformers 5.17's generate fails with router logits on (its aux loss mis-sizes the cached steps' mask),
# patched or not; generation needs no aux loss.
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_router_logits=False)


def _ids(model, seed=0, shape=(2, 11)):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(model.device)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(model, ref, ids, tol=TOL):
    out, grads = _loss_and_grads(model, ids)
    expected, expected_grads = _loss_and_grads(ref, ids)
    torch.testing.assert_close(out.loss, expected.loss, **tol)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, **tol)
    torch.testing.assert_close(out.logits, expected.logits, **tol)
    for got, want in zip(out.router_logits, expected.router_logits):
        torch.testing.assert_close(got, want, **tol)
    assert grads.keys() == expected_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], **tol, msg=name)


def _patched(model):
    return [b for _, b in find_moe_blocks(model) if "forward" in b.__dict__]


@pytest.mark.parametrize("how", ["kernelize", "forward"])
def test_patch_trains_like_unpatched_and_unpatch_restores(kernel, how):
    ref = make_model(seed=7, experts_implementation="eager")
    model = make_model(seed=7, experts_implementation="eager")
    report = patch_qwen3_moe(model, **(dict(version=1) if how == "kernelize" else dict(kernel=kernel)))
    assert report.method == how and len(report.blocks) == 4
    assert report.mode == (str(kernels.Mode.TRAINING) if how == "kernelize" else None)
    layer_forward = kernel.layers.Qwen3MoeSparseMoeBlock.forward
    assert all(b.forward.__func__ is layer_forward for _, b in find_moe_blocks(model))
    _assert_same_training(model, ref, _ids(model))
    assert unpatch_qwen3_moe(model) == 4
    assert not _patched(model) and unpatch_qwen3_moe(model) == 0


def test_report_names_the_code_that_runs(kernel, build_dir):
    model = make_model(seed=1)
    report = patch_qwen3_moe(model, version=1)
    assert report.kernel == "org/qwen3-moe-fused v1"
    layer_file = find_moe_blocks(model)[0][1].forward.__func__.__code__.co_filename
    assert report.path == str(Path(layer_file).parent)
    assert report.path.endswith("torch-cuda" if torch.version.cuda else "torch-cpu")
    # In this process the same build may already have been imported from the build folder (the loader then
    # shares its modules); a fresh process that loads only from the Hub cache reports the commit (test_cli).
    if "snapshots" in report.path:
        assert report.commit in report.path and report.commit[:12] in str(report)


@pytest.mark.parametrize("source", ["revision", "local_path", "locked"])
def test_kernel_sources(kernel, build_dir, hub_revision, source):
    args = {"revision": dict(revision=hub_revision), "local_path": dict(local_path=build_dir),
            "locked": dict(locked=True)}[source]
    model, ref = make_model(seed=2), make_model(seed=2, experts_implementation="eager")
    report = patch_qwen3_moe(model, **args)
    assert len(_patched(model)) == 4 and report.method == "kernelize"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids(model)).logits, ref(input_ids=_ids(ref)).logits, **TOL)


def test_shipped_lock_pins_this_kernel_build(build_dir):
    lock = json.loads(LOCKFILE.read_text())
    assert lock == [{"dependency": {"repo-id": "org/qwen3-moe-fused", "version": 1},
                     "lock": {"commit": build_revision(build_dir)}}], "run `qwen3-moe-fused lock` after kernel changes"


def test_environment_chooses_repo_and_version(hub_revision, monkeypatch):
    model = make_model(seed=3)
    monkeypatch.setenv("QWEN3_MOE_FUSED_VERSION", "7")
    with pytest.raises(RuntimeError, match=r"org/qwen3-moe-fused v7.*Version 7"):
        patch_qwen3_moe(model)
    monkeypatch.delenv("QWEN3_MOE_FUSED_VERSION")
    monkeypatch.setenv("QWEN3_MOE_FUSED_REPO", "someone/other-kernel")
    with pytest.raises(RuntimeError, match="someone/other-kernel v1"):
        patch_qwen3_moe(model)
    assert not _patched(model)


def test_finds_blocks_inside_peft_and_trains_like_unpatched_peft(kernel):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ref = get_peft_model(make_model(seed=4, experts_implementation="eager"), config)
    model = get_peft_model(make_model(seed=4, experts_implementation="eager"), config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.1)
                q.copy_(p)
    assert len(patch_qwen3_moe(model, kernel=kernel).blocks) == 4
    _assert_same_training(model, ref, _ids(model))
    assert unpatch_qwen3_moe(model) == 4


def test_trainer_runs_patched_model_like_unpatched(kernel, tmp_path):
    from transformers import Trainer, TrainingArguments

    def train(model):
        data = [{"input_ids": ids, "labels": ids} for ids in _ids(model, seed=5, shape=(8, 12))]
        args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                                 logging_steps=1, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        if model is patched:
            patch_qwen3_moe(trainer.model, kernel=kernel)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    patched = make_model(seed=6, experts_implementation="eager")
    losses = train(patched)
    assert len(_patched(patched)) == 4 and len(losses) == 3
    assert losses == pytest.approx(train(make_model(seed=6, experts_implementation="eager")), rel=1e-4)


def test_gradient_checkpointing(kernel):
    ref = make_model(seed=8, experts_implementation="eager")
    model = make_model(seed=8, experts_implementation="eager")
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_qwen3_moe(model, version=1)
    _assert_same_training(model, ref, _ids(model))


def test_train_eval_switches_and_generate(kernel):
    ref = make_model(seed=9, experts_implementation="eager")
    model = make_model(seed=9, experts_implementation="eager")
    patch_qwen3_moe(model, version=1)  # in train mode: Mode.TRAINING
    for m in (model, ref):
        m.eval()
    prompt = _ids(model, shape=(2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt).logits, ref(input_ids=prompt).logits, **TOL)
    assert torch.equal(model.generate(prompt, **GREEDY), ref.generate(prompt, **GREEDY))
    assert len(_patched(model)) == 4
    for m in (model, ref):
        m.train()
    _assert_same_training(model, ref, _ids(model))


def test_patch_keeps_parameters_and_checkpoints(kernel, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    model = make_model(seed=10)
    before = {n: (p.data_ptr(), p.dtype, p.device, p.shape) for n, p in model.named_parameters()}
    model.save_pretrained(tmp_path / "unpatched")
    patch_qwen3_moe(model, kernel=kernel)
    assert {n: (p.data_ptr(), p.dtype, p.device, p.shape) for n, p in model.named_parameters()} == before
    model.save_pretrained(tmp_path / "patched")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "unpatched" / name).read_bytes()
    # A patched model loads checkpoints as usual.
    other = make_model(seed=11)
    patch_qwen3_moe(other, kernel=kernel)
    other.load_state_dict(model.state_dict())
    loaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "patched")
    patch_qwen3_moe(loaded, kernel=kernel)
    ids = _ids(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(other(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_patching_twice_is_a_no_op_with_a_message(kernel, caplog):
    model = make_model(seed=12)
    first = patch_qwen3_moe(model, kernel=kernel)
    with caplog.at_level(logging.WARNING, logger="qwen3_moe_patch"):
        assert patch_qwen3_moe(model, kernel=kernel) is first
    assert "already patched" in caplog.text
    assert unpatch_qwen3_moe(model) == 4


def test_unpatch_restores_a_forward_that_was_on_the_instance(kernel):
    model = make_model(seed=13)
    _, block = find_moe_blocks(model)[0]
    hook = block.forward  # stand-in for a wrapper such as accelerate's hook
    block.forward = hook
    patch_qwen3_moe(model, kernel=kernel)
    assert block.forward is not hook
    unpatch_qwen3_moe(model)
    assert block.forward is hook


def _count_fused_calls(monkeypatch):
    from transformers.integrations.moe import ExpertsInterface

    fused = ExpertsInterface._global_mapping["qwen3_moe_fused"]
    calls = []
    monkeypatch.setitem(ExpertsInterface._global_mapping, "qwen3_moe_fused",
                        lambda *args: calls.append(1) or fused(*args))
    return calls


def test_experts_run_through_the_models_experts_implementation(kernel, monkeypatch):
    """The patch selects "qwen3_moe_fused" in the config, which transformers' experts dispatch reads at each call;
    switching it later is obeyed (the model does what its config says), and unpatch puts the old one back."""
    ref = make_model(seed=22, experts_implementation="eager")
    model = make_model(seed=22, experts_implementation="eager")
    patch_qwen3_moe(model, kernel=kernel)
    assert model.config._experts_implementation == "qwen3_moe_fused"
    calls = _count_fused_calls(monkeypatch)
    ids = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)
        assert len(calls) == 4  # one per MoE layer
        model.set_experts_implementation("batched_mm")
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)
        assert len(calls) == 4 and model.config._experts_implementation == "batched_mm"
    assert unpatch_qwen3_moe(model) == 4 and model.config._experts_implementation == "batched_mm"  # kept
    other = make_model(seed=22, experts_implementation="eager")
    patch_qwen3_moe(other, kernel=kernel)
    unpatch_qwen3_moe(other)
    assert other.config._experts_implementation == "eager"


def test_finds_blocks_whose_class_an_engine_renamed(kernel):
    """FSDP2's fully_shard(block) swaps the block's class for a subclass named FSDPQwen3MoeSparseMoeBlock."""
    model = make_model(seed=23)
    _, block = find_moe_blocks(model)[0]
    block.__class__ = type(f"FSDP{type(block).__name__}", (type(block),), {})
    assert len(find_moe_blocks(model)) == 4
    assert len(patch_qwen3_moe(model, kernel=kernel).blocks) == 4 and "forward" in block.__dict__


def test_refuses_experts_whose_forward_something_else_replaced(kernel, monkeypatch):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    model = make_model(seed=24)
    experts = find_moe_blocks(model)[0][1].experts
    experts.forward = lambda hidden, index, weights: hidden  # e.g. another library's experts
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.forward was replaced on the instance by .*<lambda>"):
        patch_qwen3_moe(model, kernel=kernel)
    del experts.forward
    monkeypatch.setattr(Qwen3MoeExperts, "forward", lambda self, hidden, index, weights: hidden)
    with pytest.raises(ValueError, match="not transformers' experts dispatch"):
        patch_qwen3_moe(model, kernel=kernel)
    assert not _patched(model) and model.config._experts_implementation == "grouped_mm"


# --- clear errors, model left unchanged --------------------------------------------------------------------------


def test_refuses_models_without_moe_blocks(kernel):
    with pytest.raises(ValueError, match="has no Qwen3MoeSparseMoeBlock"):
        patch_qwen3_moe(nn.Sequential(nn.Linear(4, 4)), kernel=kernel)


def test_refuses_non_silu_experts(kernel):
    model = make_model(seed=14, hidden_act="gelu")
    with pytest.raises(ValueError, match="activation .* not supported"):
        patch_qwen3_moe(model, kernel=kernel)
    assert not _patched(model)


def test_refuses_unsupported_transformers(kernel, monkeypatch):
    import transformers

    model = make_model(seed=15)
    for version in ("4.57.1", "5.16.1", "5.25.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.raises(RuntimeError, match=rf"transformers {version} is not supported.*>= 5.17, < 5.25"):
            patch_qwen3_moe(model, kernel=kernel)
    assert not _patched(model)


def test_unloadable_kernel_names_repo_version_and_reason(hub_revision):
    model = make_model(seed=16)
    for use_kernelize in (True, False):
        with pytest.raises(RuntimeError, match=r"org/qwen3-moe-fused v7.*Version 7"):
            patch_qwen3_moe(model, version=7, use_kernelize=use_kernelize)
    assert not _patched(model)


def test_refuses_unsupported_device_and_compile_mode_on_cpu(kernel, monkeypatch):
    meta = make_model(seed=17).to("meta")
    with pytest.raises(ValueError, match="is on meta; the kernel runs on cuda and cpu"):
        patch_qwen3_moe(meta, kernel=kernel)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_model(seed=18)
    with pytest.raises(ValueError, match="Mode.TORCH_COMPILE with the model on cuda"):
        patch_qwen3_moe(model, version=1, mode=kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE)
    assert not _patched(model)


def test_at_most_one_kernel_source(kernel, build_dir):
    with pytest.raises(ValueError, match="at most one kernel source; got kernel, local_path"):
        patch_qwen3_moe(make_model(seed=19), kernel=kernel, local_path=build_dir)


# --- GPU: bfloat16 with the Triton kernels ------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bfloat16_patched_trains_like_unpatched_grouped_mm(kernel):
    ref = make_model(seed=20).to("cuda", torch.bfloat16)
    model = make_model(seed=20).to("cuda", torch.bfloat16)
    report = patch_qwen3_moe(model, version=1)
    assert report.path.endswith("torch-cuda")
    _assert_same_training(model, ref, _ids(model, shape=(4, 64)), tol=dict(rtol=3e-2, atol=3e-2))


@pytest.mark.gpu
def test_gpu_float32_gradient_checkpointing_and_generate(kernel):
    ref = make_model(seed=21).to("cuda")
    model = make_model(seed=21).to("cuda")
    for m in (ref, model):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch_qwen3_moe(model, version=1)
    _assert_same_training(model, ref, _ids(model, shape=(4, 64)), tol=dict(rtol=1e-4, atol=1e-4))
    for m in (ref, model):
        m.eval()
    prompt = _ids(model, shape=(2, 5))
    assert torch.equal(model.generate(prompt, **GREEDY), ref.generate(prompt, **GREEDY))
