"""LoRA adapter conversion (qwen3_moe_patch.adapters): PEFT's stacked expert LoRA (transformers 5.x) <-> per-expert
LoRA (transformers 4.x), on adapters written and read by real PEFT on 5.x and on 4.57 (subprocess)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import legacy
from qwen3_moe_patch.adapters import convert_adapter, detect_adapter_layout
from qwen3_moe_patch.checkpoints import convert_checkpoint
from qwen3_moe_patch.cli import main as cli
from qwen3_moe_patch.presets import make_model
from test_checkpoints import IDS, TINY4, assert_bitwise_equal, logits

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def randomize(model, seed):
    """LoRA B starts at zero; give every LoRA factor values so the adapters do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def stacked_adapter(folder, targets, use_rslora=False, seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("tiny", seed=seed), LoraConfig(
        r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["q_proj"], target_parameters=targets))
    randomize(model, seed + 1)
    model.save_pretrained(folder)
    return model


def merged_experts(peft_model):
    state = peft_model.merge_and_unload().state_dict()
    return {k: v for k, v in state.items() if ".experts." in k}


def merge_per_expert(base, folder):
    """The spec of a per-expert adapter, independent of PEFT: W_e + s·B_e·A_e for every expert matrix, with
    s = alpha/r (alpha/√r with rsLoRA) after rank_pattern / alpha_pattern, as {layer: (gate_up [E, 2I, H], down)}."""
    import math
    import re

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = adapter(folder)

    def pattern(patterns, name, default):
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), default)

    out = {}
    for layer in range(4):
        stacks = {}
        for proj, key in (("gate", "gate_up_proj"), ("up", "gate_up_proj"), ("down", "down_proj")):
            mats = []
            for e in range(8):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj"
                w = base[f"model.layers.{layer}.mlp.experts.{key}"][e]
                w = w[:32] if proj == "gate" else w[32:] if proj == "up" else w
                a_key = f"base_model.model.{name}.lora_A.weight"
                if a_key in weights:
                    r = pattern(config["rank_pattern"], name, config["r"])
                    alpha = pattern(config["alpha_pattern"], name, config["lora_alpha"])
                    scale = alpha / (math.sqrt(r) if config["use_rslora"] else r)
                    w = w + scale * weights[f"base_model.model.{name}.lora_B.weight"] @ weights[a_key]
                mats.append(w)
            stacks[proj] = torch.stack(mats)
        out[layer] = (torch.cat([stacks["gate"], stacks["up"]], dim=1), stacks["down"])
    return out


@pytest.mark.parametrize("targets,use_rslora", [(EXPERTS, False), (EXPERTS, True), (EXPERTS[:1], False),
                                                (EXPERTS[1:], False)],
                         ids=["both", "both-rslora", "gate_up-only", "down-only"])
def test_stacked_round_trip_and_peft_reads_per_expert(tmp_path, targets, use_rslora):
    from peft import PeftModel

    original = stacked_adapter(tmp_path / "stacked", targets, use_rslora)
    want_logits, want_merged = logits(original), merged_experts(original)
    assert detect_adapter_layout(tmp_path / "stacked") == "stacked"

    summary = convert_adapter(tmp_path / "stacked", tmp_path / "per_expert", to="per-expert")
    assert summary["layers"] == 4
    per_expert = adapter(tmp_path / "per_expert")
    assert detect_adapter_layout(tmp_path / "per_expert") == "per-expert"
    assert not any(".experts.base_layer." in k or k.endswith("experts.lora_A.weight") for k in per_expert)
    assert per_expert["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    config = json.loads((tmp_path / "per_expert" / "adapter_config.json").read_text())
    projections = {"mlp.experts.gate_up_proj": ["gate_proj", "up_proj"], "mlp.experts.down_proj": ["down_proj"]}
    assert sorted(config["target_modules"]) == sorted(["q_proj"] + sum((projections[t] for t in targets), []))
    assert not config["target_parameters"]

    # the per-expert form's merged weights (computed from its file by the LoRA formula) equal the stacked form's
    base = make_model("tiny", seed=0).state_dict()
    for layer, (gate_up, down) in merge_per_expert(base, tmp_path / "per_expert").items():
        torch.testing.assert_close(gate_up, want_merged[f"model.layers.{layer}.mlp.experts.gate_up_proj"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(down, want_merged[f"model.layers.{layer}.mlp.experts.down_proj"], rtol=1e-6, atol=1e-6)

    # PEFT on 5.x reads the per-expert form through its own v4 -> v5 conversion: same function, same merge. Two
    # cases it gets wrong (PEFT 0.21.2), where 4.x and the formula above read the file right:
    # - rsLoRA: it doubles gate_up's rank and alpha, which keeps alpha/r but not alpha/√r (deltas × √2);
    # - gate/up adapted without down: it names the weights experts.base_layer.lora_*, as if down were wrapped
    #   too, so they match nothing and B stays zero, silently.
    if not use_rslora and targets != EXPERTS[:1]:
        loaded = PeftModel.from_pretrained(make_model("tiny", seed=0), tmp_path / "per_expert")
        torch.testing.assert_close(logits(loaded), want_logits, rtol=1e-6, atol=1e-6)
        merged = merged_experts(loaded)
        assert sorted(merged) == sorted(want_merged)
        for key in merged:
            torch.testing.assert_close(merged[key], want_merged[key], rtol=1e-6, atol=1e-6)

    convert_adapter(tmp_path / "per_expert", tmp_path / "back", to="stacked")
    assert_bitwise_equal(adapter(tmp_path / "back"), adapter(tmp_path / "stacked"))  # bit-exact round trip
    back = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(back["target_parameters"]) == sorted(targets) and back["target_modules"] == ["q_proj"]
    assert (back["r"], back["lora_alpha"], back["rank_pattern"], back["alpha_pattern"]) == (4, 8, {}, {})
    reloaded = PeftModel.from_pretrained(make_model("tiny", seed=0), tmp_path / "back")
    assert torch.equal(logits(reloaded), want_logits)


def test_per_expert_adapter_from_transformers457(tmp_path, transformers457):
    """A per-expert LoRA trained on transformers 4.57 (gate and up with their own A): our stacked form equals what
    PEFT's own loader builds on 5.x (A stacked, B block-diagonal, rank 2r), gives 4.57's logits, and converts back
    to 4.57's file bit for bit."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    v4 = legacy.run(transformers457, """
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        torch.manual_seed(0)
        base = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
        base.save_pretrained(model_path)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(adapter_path)
        with torch.no_grad():
            result = model.eval()(input_ids=torch.tensor(ids)).logits.tolist()
    """, config=TINY4, model_path=str(tmp_path / "v4_model"), adapter_path=str(tmp_path / "v4_lora"), ids=IDS)
    assert detect_adapter_layout(tmp_path / "v4_lora") == "per-expert"

    summary = convert_adapter(tmp_path / "v4_lora", tmp_path / "stacked", to="stacked")
    assert summary["projections"]["gate_up"] == {"rank": 8, "alpha": 16}  # block-diagonal: rank and alpha doubled
    ours = adapter(tmp_path / "stacked")

    peft_own = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "v4_model"), tmp_path / "v4_lora")
    own = {f"base_model.model.{k}" if not k.startswith("base_model.") else k: v
           for k, v in get_peft_model_state_dict(peft_own).items()}
    assert_bitwise_equal(ours, own)

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "v4_model"), tmp_path / "stacked")
    torch.testing.assert_close(logits(loaded), torch.tensor(v4), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(loaded), logits(peft_own))

    convert_adapter(tmp_path / "stacked", tmp_path / "back", to="per-expert")
    assert_bitwise_equal(adapter(tmp_path / "back"), adapter(tmp_path / "v4_lora"))


def test_stacked_adapter_read_by_transformers457(tmp_path, transformers457):
    """A LoRA trained with target_parameters on 5.x, converted to per-expert, loads in transformers 4.57 + PEFT with
    the same logits and the same merged expert weights."""
    original = stacked_adapter(tmp_path / "stacked", EXPERTS)
    make_model("tiny", seed=0).save_pretrained(tmp_path / "model")
    convert_checkpoint(tmp_path / "model", tmp_path / "v4_model", to="per-expert", config_for="transformers4")
    convert_adapter(tmp_path / "stacked", tmp_path / "v4_lora", to="per-expert")
    want_logits, want_merged = logits(original), merged_experts(original)

    v4 = legacy.run(transformers457, """
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter_path).eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids)).logits.tolist()
        merged = model.merge_and_unload().state_dict()
        result = {"logits": out, "merged": {k: v.tolist() for k, v in merged.items() if ".experts." in k}}
    """, model_path=str(tmp_path / "v4_model"), adapter_path=str(tmp_path / "v4_lora"), ids=IDS)
    torch.testing.assert_close(torch.tensor(v4["logits"]), want_logits, rtol=1e-5, atol=1e-5)
    assert len(v4["merged"]) == 4 * 8 * 3
    for layer in range(4):
        gate_up = want_merged[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = want_merged[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(8):
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            got = {p: torch.tensor(v4["merged"][f"{prefix}{p}_proj.weight"]) for p in ("gate", "up", "down")}
            torch.testing.assert_close(got["gate"], gate_up[e, :32], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["up"], gate_up[e, 32:], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["down"], down[e], rtol=1e-6, atol=1e-6)


def test_clear_errors(tmp_path):
    stacked_adapter(tmp_path / "stacked", EXPERTS)
    convert_adapter(tmp_path / "stacked", tmp_path / "pe", to="per-expert")
    with pytest.raises(ValueError, match="must be 'per-expert' or 'stacked'"):
        convert_adapter(tmp_path / "stacked", tmp_path / "x", to="fused")
    # gate_proj without up_proj: no stacked form
    only_gate = tmp_path / "only_gate"
    only_gate.mkdir()
    weights = {k: v for k, v in adapter(tmp_path / "pe").items() if ".up_proj." not in k}
    from safetensors.torch import save_file

    save_file(weights, only_gate / "adapter_model.safetensors")
    (only_gate / "adapter_config.json").write_text((tmp_path / "pe" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="a LoRA on only one of them has no stacked form"):
        convert_adapter(only_gate, tmp_path / "y", to="stacked")
    # a regex target_modules is not rewritten silently
    config = json.loads((tmp_path / "pe" / "adapter_config.json").read_text())
    (tmp_path / "pe" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=".*proj")))
    with pytest.raises(ValueError, match="regular expression"):
        convert_adapter(tmp_path / "pe", tmp_path / "z", to="stacked")
    # an adapter without expert LoRA
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_model("tiny"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "attn")
    with pytest.raises(ValueError, match="no LoRA on Qwen3-MoE experts"):
        convert_adapter(tmp_path / "attn", tmp_path / "w", to="per-expert")


def test_cli_convert_adapter(tmp_path, capsys):
    stacked_adapter(tmp_path / "stacked", EXPERTS)
    assert cli(["convert", str(tmp_path / "stacked"), str(tmp_path / "pe"), "--to", "per-expert"]) == 0
    assert "LoRA adapter stacked -> per-expert, 4 layers" in capsys.readouterr().out
    assert cli(["convert", str(tmp_path / "pe"), str(tmp_path / "st"), "--to", "stacked"]) == 0
    assert_bitwise_equal(adapter(tmp_path / "st"), adapter(tmp_path / "stacked"))
    assert cli(["convert", str(tmp_path / "pe"), str(tmp_path / "x"), "--to", "stacked", "--max-shard-size", "1GB"]) == 2
