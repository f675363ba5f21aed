"""The built package loads four ways offline, and kernelize swaps it into a tiny transformers Qwen3-MoE."""

import json
from pathlib import Path

import kernels
import pytest
import torch
from kernels import LayerRepository, LocalLayerRepository, Mode

from qwen3_moe_patch.kernel_build import build_kernel
from qwen3_moe_patch.presets import make_model

from conftest import REPO_ID, ROOT

LAYER = "Qwen3MoeSparseMoeBlock"
EXPERTS = "Qwen3MoeExperts"  # the kernel's second layer: the fused experts forward on the experts module


def _check_module(module):
    assert hasattr(module, "moe_experts") and hasattr(module.layers, LAYER) and hasattr(module, "reference")
    assert module.__name__.startswith("_qwen3_moe_fused_")


def test_get_local_kernel(build_dir):
    module = kernels.get_local_kernel(build_dir)
    _check_module(module)
    variant = "torch-cuda" if torch.version.cuda else "torch-cpu"
    assert module.__name__ == json.loads((build_dir / variant / "metadata.json").read_text())["id"]


def test_get_kernel_from_offline_hub_cache(kernel, hub_revision, hub_cache):
    _check_module(kernel)
    snapshot = hub_cache / "kernels--org--qwen3-moe-fused" / "snapshots" / hub_revision / "build"
    assert Path(kernel.__file__).parent.parent == snapshot
    assert kernels.has_kernel(REPO_ID, version=1)
    assert kernels.get_kernel(REPO_ID, revision=hub_revision) is kernel


def test_unknown_version_is_refused_offline(hub_revision):
    with pytest.raises(ValueError, match="Version 2"):
        kernels.get_kernel(REPO_ID, version=2)


def test_load_kernel_with_lockfile(hub_revision, tmp_path, kernel):
    lock = tmp_path / "kernels.lock"
    lock.write_text(json.dumps([{"dependency": {"repo-id": REPO_ID, "version": 1}, "lock": {"commit": hub_revision}}]))
    assert kernels.load_kernel(REPO_ID, lockfile=lock) is kernel
    lock.write_text(json.dumps([{"dependency": {"repo-id": REPO_ID, "version": 1}, "lock": {"commit": "0" * 40}}]))
    with pytest.raises(FileNotFoundError):
        kernels.load_kernel(REPO_ID, lockfile=lock)


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ == LAYER]


@pytest.fixture(autouse=True)
def _unmark_transformers_classes():
    """kernelize acts on classes marked with a layer name: take the marks off again after each test."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeSparseMoeBlock

    before = {cls: cls.__dict__.get("kernel_layer_name") for cls in (Qwen3MoeExperts, Qwen3MoeSparseMoeBlock)}
    yield
    for cls, name in before.items():
        if name is not None:
            cls.kernel_layer_name = name
        elif "kernel_layer_name" in cls.__dict__:
            del cls.kernel_layer_name


def _kernelize(model, repo, mode, device="cpu", experts_repo=None):
    """kernelize the MoE blocks with ``repo``'s layer and, with ``experts_repo``, the experts modules with the
    kernel's Qwen3MoeExperts (how a user of ``kernels`` alone, without the plugin, gets the fused experts)."""
    block = _blocks(model)[0]
    kernels.replace_kernel_forward_from_hub(type(block), LAYER)
    mapping = {LAYER: {device: {mode: repo}}}
    if experts_repo is not None:
        kernels.replace_kernel_forward_from_hub(type(block.experts), EXPERTS)
        mapping[EXPERTS] = {device: {mode: experts_repo}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=mode, device=device, use_fallback=False)


def _assert_grads_close(model, ref, rtol, atol):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(
    "dtype, tol, reference_impl",
    [(torch.float64, 1e-10, "eager"), (torch.float32, 2e-5, "grouped_mm")],  # grouped_mm has no float64 kernel
)
def test_kernelize_training_matches_unpatched(kernel, dtype, tol, reference_impl):
    layer = kernel.layers.Qwen3MoeSparseMoeBlock
    ref = make_model(seed=3, experts_implementation=reference_impl).to(dtype)
    model = make_model(seed=3).to(dtype)
    _kernelize(model, LayerRepository(REPO_ID, layer_name=LAYER, version=1), Mode.TRAINING,
               experts_repo=LayerRepository(REPO_ID, layer_name=EXPERTS, version=1))
    assert all(b.forward.__func__ is layer.forward for b in _blocks(model))
    assert all(b.experts.forward.__func__ is kernel.layers.Qwen3MoeExperts.forward for b in _blocks(model))
    ids = torch.randint(0, ref.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    out, expected = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert len(out.router_logits) == len(_blocks(model))
    torch.testing.assert_close(out.logits, expected.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(out.loss, expected.loss, rtol=tol, atol=tol)
    out.loss.backward()
    expected.loss.backward()
    _assert_grads_close(model, ref, tol, tol)


def test_kernelize_inference_matches_unpatched(build_dir, kernel):
    ref = make_model(seed=4, experts_implementation="eager").eval()
    model = make_model(seed=4).eval()
    _kernelize(model, LocalLayerRepository(build_dir, layer_name=LAYER), Mode.INFERENCE,
               experts_repo=LocalLayerRepository(build_dir, layer_name=EXPERTS))
    assert all(type(b.forward.__self__) is type(b) and b.forward.__func__ is not type(b).forward for b in _blocks(model))
    ids = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=2e-5, atol=2e-5)


_BAD_LAYERS = '''

class BadInit(Qwen3MoeSparseMoeBlock):
    def __init__(self):
        super().__init__()


class BadExtraMember(Qwen3MoeSparseMoeBlock):
    def helper(self):
        return None


class BadArity(Qwen3MoeSparseMoeBlock):
    def forward(self, hidden_states, extra):
        return hidden_states


class NoBackward(Qwen3MoeSparseMoeBlock):
    has_backward = False
'''


@pytest.fixture(scope="module")
def bad_layers_build(tmp_path_factory) -> Path:
    """A build (own id and op namespace) whose layers.py also defines layers that break kernelize's rules."""
    out = tmp_path_factory.mktemp("bad") / "build"
    for variant in build_kernel(ROOT, out_dir=out, unique_id="badlayr").values():
        with open(variant / "layers.py", "a") as f:
            f.write(_BAD_LAYERS)
    return out


@pytest.mark.parametrize(
    "layer_name, error, match",
    [
        ("BadInit", TypeError, "constructor"),
        ("BadExtraMember", TypeError, "additional members"),
        ("BadArity", TypeError, "arguments"),
        ("NoBackward", ValueError, "backward"),
    ],
)
def test_kernelize_rejects_layers_that_break_the_rules(bad_layers_build, layer_name, error, match):
    model = make_model(seed=5)
    with pytest.raises(error, match=match):
        _kernelize(model, LocalLayerRepository(bad_layers_build, layer_name=layer_name), Mode.TRAINING)
    # Positive control: the same copy's real layer passes the same checks.
    _kernelize(model, LocalLayerRepository(bad_layers_build, layer_name=LAYER), Mode.TRAINING)


def test_kernelize_torch_compile_mode_compiles_the_block_fullgraph(kernel):
    """On the kernel path (CUDA, or the interpreter on CPU) the block compiles without graph breaks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = make_model(seed=6, experts_implementation="eager").to(device)
    model = make_model(seed=6).to(device)
    mode = Mode.TRAINING | Mode.TORCH_COMPILE
    _kernelize(model, LayerRepository(REPO_ID, layer_name=LAYER, version=1), mode, device,
               experts_repo=LayerRepository(REPO_ID, layer_name=EXPERTS, version=1))
    block, ref_block = _blocks(model)[0], _blocks(ref)[0]
    assert block.experts.forward.__func__ is kernel.layers.Qwen3MoeExperts.forward
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(device)
    x.requires_grad_()
    out, expected = compiled(x), ref_block(x)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(block.experts.gate_up_proj.grad, ref_block.experts.gate_up_proj.grad, rtol=2e-5, atol=2e-5)
