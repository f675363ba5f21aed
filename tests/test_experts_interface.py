"""transformers experts implementation "qwen3_moe_fused" (registered by importing qwen3_moe_patch)."""

import pytest
import torch

import qwen3_moe_patch
from qwen3_moe_patch.presets import make_model

from test_patch import TOL, _ids


@pytest.fixture(autouse=True)
def _use_test_kernel(kernel):
    qwen3_moe_patch.register_experts_implementation(kernel=kernel)


def _tiny(config_cls, model_cls, seed, **config):
    torch.manual_seed(seed)
    return model_cls(config_cls(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=4, num_experts_per_tok=2, max_position_embeddings=128,
                                output_router_logits=True, **config))


def _olmoe(seed, **overrides):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return _tiny(OlmoeConfig, OlmoeForCausalLM, seed, num_key_value_heads=4, num_experts=8, **overrides)


def _mixtral(seed, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny(MixtralConfig, MixtralForCausalLM, seed, num_key_value_heads=2, num_local_experts=8, **overrides)


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [make_model, _olmoe, _mixtral], ids=["qwen3_moe", "olmoe", "mixtral"])
def test_set_experts_implementation_matches_eager(build):
    ref = build(seed=1, experts_implementation="eager")
    model = build(seed=1, experts_implementation="eager")
    model.set_experts_implementation("qwen3_moe_fused")
    assert model.config._experts_implementation == "qwen3_moe_fused"
    assert ref.config._experts_implementation == "eager"  # separate configs
    ids = _ids(model)
    (out, grads), (expected, expected_grads) = _train_step(model, ids), _train_step(ref, ids)
    torch.testing.assert_close(out.loss, expected.loss, **TOL)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected_grads[name], **TOL, msg=name)


def test_from_pretrained_with_experts_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    ref = make_model(seed=2, experts_implementation="eager").eval()
    ref.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="qwen3_moe_fused")
    assert model.config._experts_implementation == "qwen3_moe_fused"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids(model)).logits, ref(input_ids=_ids(ref)).logits, **TOL)


def test_other_expert_layouts_are_refused():
    model = _olmoe(seed=3)
    model.set_experts_implementation("qwen3_moe_fused")
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(NotImplementedError, match="OlmoeExperts has is_transposed=True"):
        model(input_ids=_ids(model))
