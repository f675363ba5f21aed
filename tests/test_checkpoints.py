"""Checkpoint conversion (qwen3_moe_patch.checkpoints): per-expert <-> stacked, streamed, bit-exact, on checkpoints
written by transformers itself (5.x both ways, 4.57 in a subprocess), the seeds' stacked layouts, Trainer resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import legacy
from qwen3_moe_patch.checkpoints import (_shard_files, convert_checkpoint, detect_layout, fix_trainer_resume,
                                         load_checkpoint_into_model)
from qwen3_moe_patch.cli import main as cli
from qwen3_moe_patch.presets import PRESETS, make_model

IDS = [[3, 17, 99, 250, 4, 8, 15, 16, 23, 42, 108, 7], [200, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]]
# the tiny preset in transformers 4.x's spelling (4.57 reads num_experts, rope_theta)
TINY4 = {k: v for k, v in PRESETS["tiny"].items()} | {"rope_theta": 10000.0}


def tensors(folder):
    out = {}
    for file in _shard_files(Path(folder)):
        out.update(load_file(file))
    return out


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model("tiny", seed=3)


def test_round_trip_sharded_equals_transformers_own_formats(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "hf_per_expert", max_shard_size="200KB")  # 6 shards, layers straddle shards
    model.save_pretrained(tmp_path / "hf_stacked", save_original_format=False)
    assert detect_layout(tmp_path / "hf_per_expert") == "per-expert"
    assert detect_layout(tmp_path / "hf_stacked") == "stacked"
    assert len(_shard_files(tmp_path / "hf_per_expert")) == 6

    summary = convert_checkpoint(tmp_path / "hf_per_expert", tmp_path / "stacked", to="stacked", max_shard_size="300KB")
    assert summary["from"] == "per-expert" and summary["output_shards"] == len(_shard_files(tmp_path / "stacked")) > 1
    for file in _shard_files(tmp_path / "stacked"):
        shard = load_file(file)
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 300_000
    assert_bitwise_equal(tensors(tmp_path / "stacked"), tensors(tmp_path / "hf_stacked"))  # what 5.x itself writes
    index = json.loads((tmp_path / "stacked" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(tmp_path / "stacked"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(tmp_path / "stacked").values())
    assert json.loads((tmp_path / "stacked" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf_per_expert" / "config.json").read_text())
    assert (tmp_path / "stacked" / "generation_config.json").exists()

    convert_checkpoint(tmp_path / "stacked", tmp_path / "back", to="per-expert")
    assert_bitwise_equal(tensors(tmp_path / "back"), tensors(tmp_path / "hf_per_expert"))  # bit-exact round trip
    convert_checkpoint(tmp_path / "hf_stacked", tmp_path / "single", to="per-expert", max_shard_size="10GB")
    assert (tmp_path / "single" / "model.safetensors").exists()  # one shard: no index, as transformers names it
    assert_bitwise_equal(tensors(tmp_path / "single"), tensors(tmp_path / "hf_per_expert"))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stacked")
    assert_bitwise_equal(reloaded.state_dict(), model.state_dict())
    # same weights; logits within float32 rounding (CPU grouped_mm picks its kernel by the tensors' alignment,
    # which follows their offsets in the file)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-6, atol=1e-6)


def test_seed_layouts_fused_and_merged(model, tmp_path):
    """woct0rdho's fused layout (mlp.{gate,up,down}_proj.weight [E, out, in], architecture Qwen3MoeFused...) and
    VeOmni's merged layout (mlp.experts.{gate,up,down}_proj [E, out, in]), written from a real model's tensors."""
    model.save_pretrained(tmp_path / "hf")
    source = tensors(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    E, I = config["num_local_experts"], config["moe_intermediate_size"]
    for layout, name in (("fused", "mlp.{p}_proj.weight"), ("merged", "mlp.experts.{p}_proj")):
        folder = tmp_path / layout
        folder.mkdir()
        out = {k: v for k, v in source.items() if ".experts." not in k}
        for layer in range(config["num_hidden_layers"]):
            for p in ("gate", "up", "down"):
                stack = torch.stack([source[f"model.layers.{layer}.mlp.experts.{e}.{p}_proj.weight"] for e in range(E)])
                out[f"model.layers.{layer}." + name.format(p=p)] = stack
        save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
        fused_config = dict(config, architectures=["Qwen3MoeFusedForCausalLM"])
        (folder / "config.json").write_text(json.dumps(fused_config))
        assert detect_layout(folder) == layout
        convert_checkpoint(folder, tmp_path / f"{layout}_hf", to="per-expert")
        assert_bitwise_equal(tensors(tmp_path / f"{layout}_hf"), source)
        assert json.loads((tmp_path / f"{layout}_hf" / "config.json").read_text())["architectures"] == \
            ["Qwen3MoeForCausalLM"]
        fresh = make_model("tiny", seed=11)
        assert load_checkpoint_into_model(fresh, folder) == ([], [])
        assert_bitwise_equal(fresh.state_dict(), model.state_dict())
        assert out["model.layers.0." + name.format(p="gate")].shape == (E, I, config["hidden_size"])


def test_clear_errors(model, tmp_path):
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    with pytest.raises(ValueError, match="--to must be one of"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "x", to="fused")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        convert_checkpoint(tmp_path / "nothing", tmp_path / "x", to="stacked")
    convert_checkpoint(tmp_path / "hf", tmp_path / "out", to="stacked")
    with pytest.raises(FileExistsError, match="already holds weights"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", to="stacked")
    # a checkpoint that lost one expert's tensor: named, nothing written
    broken = tmp_path / "broken"
    broken.mkdir()
    data = tensors(tmp_path / "hf")
    del data["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(data, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.: per-expert tensors incomplete; missing .*experts\.5\.up_proj"):
        convert_checkpoint(broken, tmp_path / "broken_out", to="stacked")
    assert not (tmp_path / "broken_out").exists()
    wrong = make_model("tiny", seed=1, num_experts=4)
    with pytest.raises(ValueError, match="in the checkpoint"):
        load_checkpoint_into_model(wrong, tmp_path / "hf")


def test_cli_convert(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "st"), "--to", "stacked", "--max-shard-size", "1MB"]) == 0
    assert "per-expert -> stacked, 6 -> 2 shards" in capsys.readouterr().out  # 1.1 MB in shards of <= 1 MB
    assert cli(["convert", str(tmp_path / "st"), str(tmp_path / "pe"), "--to", "per-expert"]) == 0
    assert_bitwise_equal(tensors(tmp_path / "pe"), tensors(tmp_path / "hf"))


def test_transformers457_checkpoint_into_5x_and_back(tmp_path, transformers457):
    """A checkpoint written by transformers 4.57 (per-expert modules, 4.x config) loads into 5.x stacked and, converted
    back for transformers 4, into 4.57 again with identical tensors and logits."""
    from transformers import AutoModelForCausalLM

    v4 = legacy.run(transformers457, """
        import torch
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        torch.manual_seed(0)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config)).eval()
        model.save_pretrained(path, max_shard_size="300KB")
        with torch.no_grad():
            result = {"version": __import__("transformers").__version__,
                      "logits": model(input_ids=torch.tensor(ids)).logits.tolist()}
    """, config=TINY4, path=str(tmp_path / "v4"), ids=IDS)
    assert v4["version"] == "4.57.1"
    v4_logits = torch.tensor(v4["logits"])
    assert "num_experts" in json.loads((tmp_path / "v4" / "config.json").read_text())

    convert_checkpoint(tmp_path / "v4", tmp_path / "stacked", to="stacked")
    model5 = AutoModelForCausalLM.from_pretrained(tmp_path / "stacked")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "v4")  # 5.x's own loader stacks the same tensors
    assert_bitwise_equal(model5.state_dict(), direct.state_dict())
    torch.testing.assert_close(logits(model5), v4_logits, rtol=1e-5, atol=1e-5)

    convert_checkpoint(tmp_path / "stacked", tmp_path / "back", to="per-expert", config_for="transformers4")
    assert_bitwise_equal(tensors(tmp_path / "back"), tensors(tmp_path / "v4"))
    again = legacy.run(transformers457, """
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            result = model(input_ids=torch.tensor(ids)).logits.tolist()
    """, path=str(tmp_path / "back"), ids=IDS)
    torch.testing.assert_close(torch.tensor(again), v4_logits, rtol=1e-6, atol=1e-6)  # same bytes (asserted above)


def test_5x_checkpoint_for_transformers4(model, tmp_path, transformers457):
    """5.x's own save (num_local_experts, rope_parameters) converted with config_for="transformers4" is read by 4.57
    with the right expert count and RoPE base, and still by 5.x."""
    from transformers import AutoModelForCausalLM

    model.config.rope_parameters = {"rope_theta": 5e5, "rope_type": "default"}  # not 4.57's default 1e4
    fresh = make_model("tiny", seed=3, rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "v4", to="per-expert", config_for="transformers4")
    config = json.loads((tmp_path / "v4" / "config.json").read_text())
    assert config["num_experts"] == 8 and config["rope_theta"] == 5e5
    out = legacy.run(transformers457, """
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            result = {"experts": model.config.num_experts, "theta": model.config.rope_theta,
                      "logits": model(input_ids=torch.tensor(ids)).logits.tolist()}
    """, path=str(tmp_path / "v4"), ids=IDS)
    assert out["experts"] == 8 and out["theta"] == 5e5
    torch.testing.assert_close(torch.tensor(out["logits"]), logits(fresh), rtol=1e-5, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    assert reloaded.config.num_experts == 8 and reloaded.config.rope_parameters["rope_theta"] == 5e5
    assert_bitwise_equal(reloaded.state_dict(), fresh.state_dict())


def _trainer(model, output_dir, data):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data)


def test_trainer_resume_restores_experts(tmp_path):
    """transformers#48805: Trainer's resume loads a per-expert checkpoint with load_state_dict(strict=False), so the
    stacked experts keep their fresh values. fix_trainer_resume restores every tensor, for resume and for
    load_best_model_at_end's load."""
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (8, 32))]
    trained = make_model("tiny", seed=0)
    _trainer(trained, tmp_path, data).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert detect_layout(checkpoint) == "per-expert"
    want = {k: v.clone() for k, v in trained.state_dict().items()}

    def differing(model):
        return sorted(k for k, v in model.state_dict().items() if not torch.equal(v, want[k]))

    stock = make_model("tiny", seed=1)
    _trainer(stock, tmp_path, data).train(resume_from_checkpoint=str(checkpoint))
    lost = differing(stock)
    if not lost:
        pytest.skip("this transformers restores the experts on resume (#48805 fixed): nothing to fix")
    assert lost and all(".mlp.experts." in k for k in lost)  # the bug: exactly the experts were not restored

    fixed = make_model("tiny", seed=1)
    fix_trainer_resume(_trainer(fixed, tmp_path, data)).train(resume_from_checkpoint=str(checkpoint))
    assert differing(fixed) == []

    best = make_model("tiny", seed=2)
    trainer = fix_trainer_resume(_trainer(best, tmp_path, data))
    trainer.state.best_model_checkpoint = str(checkpoint)
    trainer._load_best_model()
    assert differing(best) == []


MEMORY_SCRIPT = """
import json, sys
from qwen3_moe_patch.checkpoints import convert_checkpoint

def status(field):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])

import torch, safetensors.torch  # imported before the measurement starts
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
before = status("VmRSS")
summary = convert_checkpoint(sys.argv[1], sys.argv[2], to=sys.argv[3])
print(json.dumps({"peak_growth_bytes": (status("VmHWM") - before) * 1024, **summary}))
"""


def test_memory_is_constant(tmp_path):
    """Peak resident memory of a conversion (subprocess, peak reset after its imports) is the 16 MiB copy buffer,
    not the 82 MiB bf16 model, its 12 MB shards or a layer's 6 MiB of experts."""
    torch.manual_seed(0)
    big = make_model("tiny", seed=0, hidden_size=512, moe_intermediate_size=128, num_experts=16, num_hidden_layers=12,
                     head_dim=64).to(torch.bfloat16)
    big.save_pretrained(tmp_path / "hf", max_shard_size="12MB")
    total = sum(t.numel() * t.element_size() for t in big.state_dict().values())
    shards = len(_shard_files(tmp_path / "hf"))
    assert total > 5 * 12e6 and shards >= 6
    for src, dst, to in (("hf", "st", "stacked"), ("st", "pe", "per-expert")):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / src), str(tmp_path / dst), to],
                             capture_output=True, text=True, check=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{src} -> {to}: {total / 2**20:.0f} MiB in {report['input_shards']} shards, peak RSS growth "
              f"{report['peak_growth_bytes'] / 2**20:.1f} MiB")
        assert report["peak_growth_bytes"] < 20 * 2**20, report
    assert_bitwise_equal(tensors(tmp_path / "pe"), tensors(tmp_path / "hf"))
