"""``patch_qwen3_moe`` / ``unpatch_qwen3_moe``: swap the forward of every Qwen3-MoE sparse MoE block.

Only ``forward`` of each block instance changes; parameters, buffers, their names, dtypes and devices stay
as they are, so checkpoints save and load exactly as for the unpatched model. The instance ``forward`` that
was there before (usually none; e.g. accelerate's hook wrapper) is kept on the block and put back by
``unpatch_qwen3_moe``.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType, ModuleType

from torch import nn

__all__ = ["PatchReport", "patch_qwen3_moe", "unpatch_qwen3_moe", "find_moe_blocks"]

logger = logging.getLogger("qwen3_moe_patch")

DEFAULT_REPO_ID = "org/qwen3-moe-fused"
DEFAULT_VERSION = 1
LAYER_NAME = "Qwen3MoeSparseMoeBlock"
_MARK = "_qwen3_moe_fused_patch"  # per-block record: (report, forward found on the instance before patching)
_NO_FORWARD = object()


@dataclass
class PatchReport:
    """What ``patch_qwen3_moe`` did."""

    blocks: list[str]
    kernel: str
    method: str  # "kernelize" or "forward" (per-instance monkey-patch)
    mode: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mode = f", mode {self.mode}" if self.mode else ""
        return f"qwen3-moe-fused: patched {len(self.blocks)} MoE blocks with {self.kernel} via {self.method}{mode}"


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``Qwen3MoeSparseMoeBlock`` under ``model`` (plain, PEFT- or Trainer-wrapped)."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == LAYER_NAME]


def _check_blocks(model: nn.Module, blocks) -> None:
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no {LAYER_NAME} modules: patch_qwen3_moe supports transformers Qwen3-MoE "
            "models (Qwen3MoeForCausalLM and its heads)"
        )
    for name, block in blocks:
        experts = block.experts
        while hasattr(experts, "base_layer") and not hasattr(experts, "gate_up_proj"):
            experts = experts.base_layer  # PEFT ParamWrapper around the experts
        if not hasattr(experts, "gate_up_proj"):
            raise ValueError(
                f"{name}.experts has no stacked gate_up_proj: transformers >= 5.17 Qwen3-MoE experts are required"
            )
        act = type(getattr(experts, "act_fn", None)).__name__
        if act not in ("SiLUActivation", "SiLU"):
            raise ValueError(f"{name}: expert activation {act} is not supported; the kernel implements SiLU (SwiGLU)")


def _kernel_source(kernel, repo_id, version, revision, local_path) -> dict:
    if sum(x is not None for x in (kernel, local_path, revision)) > 1:
        raise ValueError("pass at most one of kernel=, local_path= and revision=")
    if kernel is not None:
        return {"module": kernel, "label": getattr(kernel, "__name__", "given module")}
    if local_path is not None:
        return {"local_path": Path(local_path), "label": str(local_path)}
    repo_id = repo_id or os.environ.get("QWEN3_MOE_FUSED_REPO", DEFAULT_REPO_ID)
    if revision is not None:
        return {"repo_id": repo_id, "revision": revision, "label": f"{repo_id}@{revision}"}
    version = int(version if version is not None else os.environ.get("QWEN3_MOE_FUSED_VERSION", DEFAULT_VERSION))
    return {"repo_id": repo_id, "version": version, "label": f"{repo_id} v{version}"}


def _load_kernel(source, trust_remote_code) -> ModuleType:
    if "module" in source:
        return source["module"]
    import kernels

    try:
        if "local_path" in source:
            return kernels.get_local_kernel(source["local_path"], trust_remote_code=trust_remote_code)
        ref = {k: source[k] for k in ("version", "revision") if k in source}
        return kernels.get_kernel(source["repo_id"], trust_remote_code=trust_remote_code, **ref)
    except Exception as err:  # the loader's own reason is kept and named
        raise RuntimeError(f"cannot load kernel {source['label']}: {type(err).__name__}: {err}") from err


def _layer_repository(source, trust_remote_code):
    import kernels

    if "local_path" in source:
        return kernels.LocalLayerRepository(source["local_path"], layer_name=LAYER_NAME)
    ref = {k: source[k] for k in ("version", "revision") if k in source}
    return kernels.LayerRepository(
        source["repo_id"], layer_name=LAYER_NAME, trust_remote_code=trust_remote_code, **ref
    )


def _kernelize(blocks, source, mode, trust_remote_code) -> None:
    import kernels

    repo = _layer_repository(source, trust_remote_code)
    for cls in {type(block) for _, block in blocks}:
        if getattr(cls, "kernel_layer_name", None) != LAYER_NAME:
            kernels.replace_kernel_forward_from_hub(cls, LAYER_NAME)
    device = next(blocks[0][1].parameters()).device.type
    mapping = {LAYER_NAME: {device: {mode: repo}}}
    try:
        with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
            for _, block in blocks:
                kernels.kernelize(block, mode=mode, device=device, use_fallback=False)
    except Exception as err:
        raise RuntimeError(f"cannot kernelize with {source['label']}: {type(err).__name__}: {err}") from err


def patch_qwen3_moe(
    model: nn.Module,
    *,
    kernel: ModuleType | None = None,
    repo_id: str | None = None,
    version: int | None = None,
    revision: str | None = None,
    local_path: str | os.PathLike | None = None,
    mode=None,
    use_kernelize: bool = True,
    trust_remote_code: bool = False,
) -> PatchReport:
    """Make every Qwen3-MoE sparse MoE block of ``model`` compute its experts with the fused kernel.

    Kernel source, first given wins: ``kernel`` (an already loaded kernel module), ``local_path`` (a build
    folder), ``revision``, else ``repo_id`` (default ``$QWEN3_MOE_FUSED_REPO`` or ``org/qwen3-moe-fused``) at
    ``version`` (default ``$QWEN3_MOE_FUSED_VERSION`` or 1). ``use_kernelize`` wires the layer in through
    ``kernels.kernelize`` (``mode``: a ``kernels.Mode``, default from ``model.training``); otherwise, or with
    ``kernel``, each block's forward is bound to the kernel's layer directly. On any error the model is left
    unchanged. Patching a patched model does nothing and says so.
    """
    blocks = find_moe_blocks(model)
    _check_blocks(model, blocks)
    patched = [name for name, block in blocks if _MARK in block.__dict__]
    if patched:
        report = blocks[0][1].__dict__[_MARK][0]
        logger.warning("qwen3-moe-fused: model is already patched (%s); nothing done", report)
        return report

    source = _kernel_source(kernel, repo_id, version, revision, local_path)
    previous = {name: block.__dict__.get("forward", _NO_FORWARD) for name, block in blocks}
    if use_kernelize and kernel is None:
        import kernels

        mode = mode if mode is not None else (kernels.Mode.TRAINING if model.training else kernels.Mode.INFERENCE)
        try:
            _kernelize(blocks, source, mode, trust_remote_code)
        except Exception:
            _restore(blocks, previous)
            raise
        report = PatchReport([n for n, _ in blocks], source["label"], "kernelize", str(mode))
    else:
        layer = getattr(getattr(_load_kernel(source, trust_remote_code), "layers", None), LAYER_NAME, None)
        if layer is None:
            raise RuntimeError(f"kernel {source['label']} has no layers.{LAYER_NAME}")
        for _, block in blocks:
            block.forward = MethodType(layer.forward, block)
        report = PatchReport([n for n, _ in blocks], source["label"], "forward")
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
