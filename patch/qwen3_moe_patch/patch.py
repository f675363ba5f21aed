"""``patch_qwen3_moe`` / ``unpatch_qwen3_moe``: the fused kernel in every Qwen3-MoE sparse MoE block.

Two things change, both undone by ``unpatch_qwen3_moe``: the ``forward`` of each block instance becomes the
kernel's layer (router and experts called as modules), and the model's experts implementation becomes
"qwen3_moe_fused" (``config._experts_implementation``, which transformers' experts dispatch reads at every call),
so the fused computation runs inside each experts module's call, within whatever a distributed engine wrapped
around it. Parameters, buffers, their names, dtypes and devices stay as they are, so checkpoints save and load
exactly as for the unpatched model (the experts implementation is not saved in config.json). The instance
``forward`` that was there before (usually none; e.g. accelerate's hook wrapper) is kept on the block and put
back by ``unpatch_qwen3_moe``. With ``liger=True`` Liger-Kernel's RMSNorm, RoPE and fused linear cross-entropy
join in (``liger.py``), undone by ``unpatch_qwen3_moe`` too.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from types import MethodType, ModuleType
from typing import TYPE_CHECKING

from . import liger as liger_kernels
from .experts_interface import IMPLEMENTATION_NAME, register_experts_implementation
from .kernel_source import KernelSource, kernel_location
from .versions import check_transformers

if TYPE_CHECKING:  # torch is imported where it is used, so importing the package (e.g. for --help) stays light
    from torch import nn

__all__ = ["PatchReport", "find_moe_blocks", "patch_qwen3_moe", "unpatch_qwen3_moe"]

logger = logging.getLogger("qwen3_moe_patch")

LAYER_NAME = "Qwen3MoeSparseMoeBlock"
SUPPORTED_DEVICES = ("cuda", "cpu")
_MARK = "_qwen3_moe_fused_patch"  # per-block record: (report, forward found on the instance before patching)
_LIGER = "_qwen3_moe_fused_liger"  # on the Qwen3MoeForCausalLM: the record of Liger's changes
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
    liger: str | None = None  # liger-kernel version whose non-MoE kernels were applied (liger=True)

    def __str__(self) -> str:
        where = f" (commit {self.commit[:12]})" if self.commit else (f" ({self.path})" if self.path else "")
        mode = f", mode {self.mode}" if self.mode else ""
        liger = f"; Liger's RMSNorm, RoPE, fused linear cross-entropy (liger-kernel {self.liger})" if self.liger else ""
        return (f"qwen3-moe-fused: patched {len(self.blocks)} MoE blocks with {self.kernel}{where} via "
                f"{self.method}{mode}{liger}")


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformers ``Qwen3MoeSparseMoeBlock`` under ``model`` (plain, PEFT- or
    Trainer-wrapped), by class hierarchy: also the subclasses engines make (FSDP2's ``FSDPQwen3MoeSparseMoeBlock``)."""
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Qwen3MoeSparseMoeBlock)]


def base_experts(block: nn.Module) -> nn.Module:
    """The block's experts module itself, under any PEFT ``ParamWrapper`` around it."""
    experts = block.experts
    while not hasattr(experts, "gate_up_proj") and hasattr(experts, "base_layer"):
        experts = experts.base_layer
    return experts


def _is_engine_wrapper(forward) -> bool:
    """Whether an instance ``forward`` is one that calls the experts' own forward inside: transformers' TP/EP
    experts forwards (``transformers.distributed``) and accelerate's hooks."""
    function = getattr(forward, "func", forward)  # accelerate: functools.partial(new_forward, module)
    module = getattr(function, "__module__", "") or ""
    return module.startswith(("transformers.distributed.", "accelerate.hooks"))


def _check_experts_dispatch(name: str, experts: nn.Module) -> None:
    """Refuse experts whose forward would not reach transformers' experts dispatch (where the kernel runs)."""
    forward = type(experts).forward
    code = getattr(forward, "__code__", None)  # functools.wraps gives the dispatcher the class forward's names
    if code is None or not code.co_qualname.startswith("use_experts_implementation."):
        raise ValueError(
            f"{name}.experts ({type(experts).__name__}) has forward {forward.__module__}.{forward.__qualname__}, not "
            "transformers' experts dispatch, which is where patch_qwen3_moe runs the kernel; another library replaced "
            "it: patch an unmodified model, or use that library's experts"
        )
    instance = experts.__dict__.get("forward")
    if instance is not None and not _is_engine_wrapper(instance):
        function = getattr(instance, "func", instance)
        raise ValueError(
            f"{name}.experts.forward was replaced on the instance by "
            f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}, which may "
            "not call the experts' own forward, where the kernel runs; patch_qwen3_moe serves transformers' TP/EP "
            "experts forwards and accelerate's hooks: remove that replacement first"
        )
    current = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if current == "deepgemm_megamoe":
        raise ValueError(
            f"{name}.experts run DeepGEMM Mega MoE, a load-time choice that exchanges tokens inside its kernel; "
            "load the model with another experts_implementation to patch it"
        )


def _check(model: nn.Module, blocks, mode) -> None:
    check_transformers()
    if not blocks:
        others = sorted({type(m).__name__ for m in model.modules()
                         if type(m).__name__.endswith("SparseMoeBlock") and hasattr(base_experts(m), "gate_up_proj")})
        route = (f"; its MoE blocks are {', '.join(others)}, whose own forward already calls their experts as a module "
                 "(any shared expert stays as it is): select the fused experts for them with "
                 "model.set_experts_implementation('qwen3_moe_fused') (import qwen3_moe_patch first)") if others else ""
        raise ValueError(
            f"{type(model).__name__} has no {LAYER_NAME} modules: patch_qwen3_moe supports transformers Qwen3-MoE "
            f"models (Qwen3MoeForCausalLM and its heads){route}"
        )
    for name, block in blocks:
        experts = base_experts(block)
        _check_experts_dispatch(name, experts)
        if experts is not block.experts and experts.gate_up_proj.shape[0] != getattr(experts, "num_experts", None):
            raise ValueError(
                f"{name}: PEFT LoRA wraps expert-parallel experts ({getattr(experts, 'num_experts', '?')} of "
                f"{experts.gate_up_proj.shape[0]} experts on this rank). PEFT 0.21 cannot train LoRA on them (its "
                "parametrization mixes the expert-sharded DTensor with plain LoRA factors; stock PEFT fails the same "
                "way unpatched): under EP put LoRA on attention only, or train expert LoRA with FSDP2 without EP"
            )
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
    marked = [cls for cls in {type(block) for _, block in blocks} if "kernel_layer_name" not in cls.__dict__]
    for cls in marked:
        kernels.replace_kernel_forward_from_hub(cls, LAYER_NAME)
    try:
        for _, block in blocks:  # block by block: each on its own device (e.g. a model split over GPUs)
            device = base_experts(block).gate_up_proj.device.type
            with kernels.use_kernel_mapping({LAYER_NAME: {device: {mode: repo}}}, inherit_mapping=False):
                kernels.kernelize(block, mode=mode, device=device, use_fallback=False)
    except Exception as err:
        for cls in marked:  # leave transformers' classes as they were
            del cls.kernel_layer_name
        raise RuntimeError(source.failure(err).replace("cannot load kernel", "cannot kernelize with", 1)) from err


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
    liger: bool = False,
) -> PatchReport:
    """Make every Qwen3-MoE sparse MoE block of ``model`` compute its experts with the fused kernel.

    Kernel source (at most one of ``kernel``, ``local_path``, ``revision``, ``locked``): an already loaded kernel
    module, a build folder, a Hub revision, or the commit pinned by the plugin's kernels.lock; by default
    ``repo_id`` (``$QWEN3_MOE_FUSED_REPO`` or org/qwen3-moe-fused) at ``version`` (``$QWEN3_MOE_FUSED_VERSION``,
    else the version tested with the installed torch). ``use_kernelize`` wires the layer in through
    ``kernels.kernelize`` (``mode``: a ``kernels.Mode``, default from ``model.training``); otherwise, or with
    ``kernel``, each block's forward is bound to the kernel's layer directly. The block layer calls the router and
    the experts as modules; the experts compute through transformers experts implementation "qwen3_moe_fused"
    (registered with the same kernel), which the patch selects in the model's config, so under FSDP2, ZeRO-3 and
    transformers' TP/EP the kernel runs inside the engine's experts call, on local weights and local expert ids.
    ``liger``: also Liger-Kernel's RMSNorm, RoPE and fused linear cross-entropy on the model's Qwen3MoeForCausalLM
    (a tested liger-kernel release must be installed; its RoPE is process-wide while patched: see ``liger.py``).
    On any error the model is left unchanged. Patching a patched model with the same source (and ``liger``) does
    nothing and says so; otherwise it switches and says so.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_qwen3_moe takes a transformers Qwen3-MoE model (a torch.nn.Module), got "
                        f"{type(model).__name__}")
    blocks = find_moe_blocks(model)
    kernelize = use_kernelize and kernel is None
    if kernelize and mode is None and blocks:
        import kernels

        mode = kernels.Mode.TRAINING if model.training else kernels.Mode.INFERENCE
    _check(model, blocks, mode if kernelize else None)
    if liger:
        liger_kernels.check()
        liger_kernels.causal_lm(model)
    source = KernelSource.resolve(kernel, repo_id, version, revision, local_path, locked, trust_remote_code)
    if any(_MARK in block.__dict__ for _, block in blocks):
        report = next(block.__dict__[_MARK][0] for _, block in blocks if _MARK in block.__dict__)
        if report.kernel == source.label and report.method == ("kernelize" if kernelize else "forward") \
                and (report.liger is not None) == liger:
            logger.warning("qwen3-moe-fused: model is already patched (%s); nothing done", report)
            return report
        source.load()  # a kernel that cannot load fails here, with the model still patched as it was
        logger.warning("qwen3-moe-fused: model was patched with %s via %s; switching to %s", report.kernel,
                       report.method, source.label)
        unpatch_qwen3_moe(model)
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
    layer_forward = blocks[0][1].forward.__func__
    path, commit = kernel_location(layer_forward)
    report = PatchReport([n for n, _ in blocks], source.label, "kernelize" if kernelize else "forward",
                         str(mode) if kernelize else None, path, commit)
    # The experts run the kernel package the block layer came from (kernelize imported it).
    kernel_package = sys.modules[layer_forward.__module__.rpartition(".")[0]]
    register_experts_implementation(source=KernelSource(source.label, module=kernel_package))
    configs = {id(cfg): cfg for cfg in (base_experts(block).config for _, block in blocks)}
    before = {key: cfg._experts_implementation for key, cfg in configs.items()}
    for cfg in configs.values():
        cfg._experts_implementation = IMPLEMENTATION_NAME
    for name, block in blocks:
        cfg = base_experts(block).config
        block.__dict__[_MARK] = (report, previous[name], cfg, before[id(cfg)])
    if liger:
        try:
            record = liger_kernels.apply(model)
        except Exception:
            unpatch_qwen3_moe(model)
            raise
        liger_kernels.causal_lm(model).__dict__[_LIGER] = record
        report.liger = liger_kernels.installed_version()
    logger.info("%s", report)
    return report


def _restore(blocks, previous) -> None:
    for name, block in blocks:
        block.__dict__.pop("forward", None)
        if previous[name] is not _NO_FORWARD:
            block.forward = previous[name]


def unpatch_qwen3_moe(model: nn.Module) -> int:
    """Restore the forwards and the experts implementation ``patch_qwen3_moe`` replaced (an implementation set
    since then is kept) and undo Liger's kernels where ``liger=True`` applied them; returns the number of blocks
    restored."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_qwen3_moe takes the model patch_qwen3_moe patched (a torch.nn.Module), got "
                        f"{type(model).__name__}")
    for module in model.modules():
        if _LIGER in module.__dict__:
            liger_kernels.undo(module.__dict__.pop(_LIGER))
    blocks = [(name, block) for name, block in find_moe_blocks(model) if _MARK in block.__dict__]
    _restore(blocks, {name: block.__dict__[_MARK][1] for name, block in blocks})
    for _, block in blocks:
        _, _, cfg, before = block.__dict__.pop(_MARK)
        if cfg._experts_implementation == IMPLEMENTATION_NAME:
            cfg._experts_implementation = before
    return len(blocks)
