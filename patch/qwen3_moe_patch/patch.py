"""``patch_qwen3_moe`` / ``unpatch_qwen3_moe``: swap the forward of every Qwen3-MoE sparse MoE block.

Only ``forward`` of each block instance changes; parameters, buffers, their names, dtypes and devices stay
as they are, so checkpoints save and load exactly as for the unpatched model. The instance ``forward`` that
was there before (usually none; e.g. accelerate's hook wrapper) is kept on the block and put back by
``unpatch_qwen3_moe``.
"""

import logging
import os
from dataclasses import dataclass
from types import MethodType, ModuleType

from torch import nn

from .experts_interface import register_experts_implementation
from .kernel_source import KernelSource, kernel_location
from .versions import check_transformers

__all__ = ["PatchReport", "find_moe_blocks", "patch_qwen3_moe", "unpatch_qwen3_moe"]

logger = logging.getLogger("qwen3_moe_patch")

LAYER_NAME = "Qwen3MoeSparseMoeBlock"
SUPPORTED_DEVICES = ("cuda", "cpu")
_MARK = "_qwen3_moe_fused_patch"  # per-block record: (report, forward found on the instance before patching)
_NO_FORWARD = object()


@dataclass
class PatchReport:
    """What ``patch_qwen3_moe`` did."""

    blocks: list[str]
    kernel: str  # the source asked for: repo and version / revision / lock, local path or module name
    method: str  # "kernelize" or "forward" (per-instance binding)
    mode: str | None = None
    path: str | None = None  # folder the kernel was imported from
    commit: str | None = None  # Hub commit of that folder, when it came from the Hub cache

    def __str__(self) -> str:
        where = f" (commit {self.commit[:12]})" if self.commit else (f" ({self.path})" if self.path else "")
        mode = f", mode {self.mode}" if self.mode else ""
        return f"qwen3-moe-fused: patched {len(self.blocks)} MoE blocks with {self.kernel}{where} via {self.method}{mode}"


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``Qwen3MoeSparseMoeBlock`` under ``model`` (plain, PEFT- or Trainer-wrapped)."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == LAYER_NAME]


def _check(model: nn.Module, blocks, mode) -> None:
    check_transformers()
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no {LAYER_NAME} modules: patch_qwen3_moe supports transformers Qwen3-MoE "
            "models (Qwen3MoeForCausalLM and its heads)"
        )
    for name, block in blocks:
        experts = block.experts
        while not hasattr(experts, "gate_up_proj") and hasattr(experts, "base_layer"):
            experts = experts.base_layer  # PEFT ParamWrapper around the experts
        act = type(getattr(experts, "act_fn", None)).__name__
        if act not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"{name}: expert activation {act} is not supported; the kernel implements SiLU (SwiGLU)")
        device = experts.gate_up_proj.device.type
        if device not in SUPPORTED_DEVICES:
            raise ValueError(f"{name} is on {device}; the kernel runs on {' and '.join(SUPPORTED_DEVICES)}")
        if mode is not None and "TORCH_COMPILE" in str(mode) and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{name} is on cpu, where the kernel runs its pure-torch reference, which does not compile without graph "
                "breaks: use Mode.TORCH_COMPILE with the model on cuda, or Mode.TRAINING / Mode.INFERENCE on cpu"
            )


def _kernelize(blocks, source: KernelSource, mode) -> None:
    import kernels

    repo = source.layer_repository(LAYER_NAME)
    for cls in {type(block) for _, block in blocks}:
        if getattr(cls, "kernel_layer_name", None) != LAYER_NAME:
            kernels.replace_kernel_forward_from_hub(cls, LAYER_NAME)
    try:
        for _, block in blocks:  # block by block: each on its own device (e.g. a model split over GPUs)
            device = block.experts.gate_up_proj.device.type if hasattr(block.experts, "gate_up_proj") else (
                next(block.parameters()).device.type)
            with kernels.use_kernel_mapping({LAYER_NAME: {device: {mode: repo}}}, inherit_mapping=False):
                kernels.kernelize(block, mode=mode, device=device, use_fallback=False)
    except Exception as err:
        raise RuntimeError(f"cannot kernelize with {source.label}: {type(err).__name__}: {err}") from err


def patch_qwen3_moe(
    model: nn.Module,
    *,
    kernel: ModuleType | None = None,
    repo_id: str | None = None,
    version: int | None = None,
    revision: str | None = None,
    local_path: str | os.PathLike | None = None,
    locked: bool = False,
    mode=None,
    use_kernelize: bool = True,
    trust_remote_code: bool = False,
) -> PatchReport:
    """Make every Qwen3-MoE sparse MoE block of ``model`` compute its experts with the fused kernel.

    Kernel source (at most one of ``kernel``, ``local_path``, ``revision``, ``locked``): an already loaded kernel
    module, a build folder, a Hub revision, or the commit pinned by the plugin's kernels.lock; by default
    ``repo_id`` (``$QWEN3_MOE_FUSED_REPO`` or org/qwen3-moe-fused) at ``version`` (``$QWEN3_MOE_FUSED_VERSION``,
    else the version tested with the installed torch). ``use_kernelize`` wires the layer in through
    ``kernels.kernelize`` (``mode``: a ``kernels.Mode``, default from ``model.training``); otherwise, or with
    ``kernel``, each block's forward is bound to the kernel's layer directly. Also registers the fused experts
    function as transformers experts implementation "qwen3_moe_fused" (same kernel). On any error the model is
    left unchanged. Patching a patched model does nothing and says so.
    """
    blocks = find_moe_blocks(model)
    kernelize = use_kernelize and kernel is None
    if kernelize and mode is None and blocks:
        import kernels

        mode = kernels.Mode.TRAINING if model.training else kernels.Mode.INFERENCE
    _check(model, blocks, mode if kernelize else None)
    if any(_MARK in block.__dict__ for _, block in blocks):
        report = next(block.__dict__[_MARK][0] for _, block in blocks if _MARK in block.__dict__)
        logger.warning("qwen3-moe-fused: model is already patched (%s); nothing done", report)
        return report

    source = KernelSource.resolve(kernel, repo_id, version, revision, local_path, locked, trust_remote_code)
    previous = {name: block.__dict__.get("forward", _NO_FORWARD) for name, block in blocks}
    if kernelize:
        try:
            _kernelize(blocks, source, mode)
        except Exception:
            _restore(blocks, previous)
            raise
    else:
        layer = getattr(getattr(source.load(), "layers", None), LAYER_NAME, None)
        if layer is None:
            raise RuntimeError(f"kernel {source.label} has no layers.{LAYER_NAME}")
        for _, block in blocks:
            block.forward = MethodType(layer.forward, block)
    path, commit = kernel_location(blocks[0][1].forward.__func__)
    report = PatchReport([n for n, _ in blocks], source.label, "kernelize" if kernelize else "forward",
                         str(mode) if kernelize else None, path, commit)
    register_experts_implementation(source=source)
    for name, block in blocks:
        block.__dict__[_MARK] = (report, previous[name])
    logger.info("%s", report)
    return report


def _restore(blocks, previous) -> None:
    for name, block in blocks:
        block.__dict__.pop("forward", None)
        if previous[name] is not _NO_FORWARD:
            block.forward = previous[name]


def unpatch_qwen3_moe(model: nn.Module) -> int:
    """Restore the forwards ``patch_qwen3_moe`` replaced; returns the number of blocks restored."""
    blocks = [(name, block) for name, block in find_moe_blocks(model) if _MARK in block.__dict__]
    _restore(blocks, {name: block.__dict__[_MARK][1] for name, block in blocks})
    for _, block in blocks:
        del block.__dict__[_MARK]
    return len(blocks)
