"""Liger-Kernel's non-MoE kernels on a Qwen3-MoE model, composed with the fused experts.

``patch_qwen3_moe(model, liger=True)`` runs Liger's own ``apply_liger_kernel_to_qwen3_moe(rope=True,
rms_norm=True, fused_linear_cross_entropy=True, swiglu=False, model=causal_lm)`` on the model's
``Qwen3MoeForCausalLM`` (inside a PEFT wrapper too): Liger's RMSNorm on every norm, its RoPE and its fused
linear cross-entropy (the logits are never materialised when labels are given), while the experts stay ours.
Liger changes module instances (their ``forward`` and a few attributes) and two names of transformers'
``modeling_qwen3_moe`` module (``apply_rotary_pos_emb``, ``Qwen3MoeRMSNorm``); ``apply`` records every change
and ``undo`` reverses them, so ``unpatch_qwen3_moe`` gives back the model as it was. The module names are
process-wide in transformers: while a model patched with ``liger=True`` is patched, every Qwen3-MoE model of the
process uses Liger's RoPE (same values, other rounding) and newly built ones Liger's RMSNorm.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

__all__ = ["TESTED_VERSIONS", "apply", "causal_lm", "check", "installed_version", "undo"]

logger = logging.getLogger("qwen3_moe_patch")

TESTED_VERSIONS = ("0.8.5",)  # liger-kernel releases this composition was run and tested with
_KERNELS = dict(rope=True, rms_norm=True, fused_linear_cross_entropy=True, swiglu=False)  # swiglu: its experts
_MISSING = object()


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def causal_lm(model):
    """The one Qwen3MoeForCausalLM in ``model`` (itself, or inside a PEFT wrapper); else a clear error."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    found = [m for m in model.modules() if isinstance(m, Qwen3MoeForCausalLM)]
    if len(found) != 1:
        raise ValueError(
            f"patch_qwen3_moe(liger=True) composes Liger's kernels with a Qwen3MoeForCausalLM (alone, or inside a "
            f"PEFT model); {type(model).__name__} holds {len(found)}. Patch without liger=True, or apply Liger's "
            "kernels yourself before patching."
        )
    return found[0]


def check() -> str:
    """The installed liger-kernel version, if it is one this composition was tested with; else a clear error."""
    version = installed_version()
    if version is None:
        raise ImportError(f"patch_qwen3_moe(liger=True) needs liger-kernel: pip install liger-kernel=="
                          f"{TESTED_VERSIONS[-1]} (or patch without liger=True)")
    if version not in TESTED_VERSIONS:
        raise ImportError(f"liger-kernel {version} is not a version patch_qwen3_moe(liger=True) was tested with "
                          f"({', '.join(TESTED_VERSIONS)}): pip install liger-kernel=={TESTED_VERSIONS[-1]}, or "
                          "patch without liger=True and apply Liger's kernels yourself")
    return version


def apply(model) -> dict:
    """Apply Liger's non-MoE kernels to ``model``'s Qwen3MoeForCausalLM; returns the record ``undo`` takes. On an
    error nothing stays changed."""
    check()
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    lm = causal_lm(model)
    modules = list(lm.modules())
    before = [dict(m.__dict__) for m in modules]
    module_before = dict(vars(modeling_qwen3_moe))
    try:
        apply_liger_kernel_to_qwen3_moe(**_KERNELS, model=lm)
    except Exception:
        undo(_record(modules, before, modeling_qwen3_moe, module_before))
        raise
    record = _record(modules, before, modeling_qwen3_moe, module_before)
    if any(name.endswith("Experts") or name.endswith("MLP") for name in record["globals"]):
        undo(record)
        raise RuntimeError("liger-kernel replaced transformers' experts although swiglu=False: this composition "
                           "cannot use it; patch without liger=True")
    if next(lm.parameters()).device.type == "cpu":  # patching before .cuda() is fine; running there is not
        logger.warning("qwen3-moe-fused: Liger's kernels run on CUDA devices, and this model is on the CPU: move it "
                       "to the GPU before running it")
    if record["globals"]:
        logger.warning("qwen3-moe-fused: Liger's RoPE is now transformers' qwen3_moe.apply_rotary_pos_emb for every "
                       "Qwen3-MoE model of this process, until this model is unpatched")
    return record


def _record(modules, before, namespace, namespace_before) -> dict:
    """What changed: per module the attributes added (old value _MISSING) or replaced, and the module names."""
    changes = []
    for module, old in zip(modules, before):
        changed = {key: old.get(key, _MISSING) for key, value in module.__dict__.items()
                   if old.get(key, _MISSING) is not value}
        if changed:
            changes.append((module, changed, {key: module.__dict__[key] for key in changed}))
    names = {key: (namespace_before.get(key, _MISSING), value) for key, value in vars(namespace).items()
             if namespace_before.get(key, _MISSING) is not value}
    return {"modules": changes, "namespace": namespace.__name__, "globals": names}  # a name: the record deep-copies


def undo(record: dict) -> None:
    """Reverse ``apply``: attributes Liger added are removed, those it replaced restored; a module name is restored
    only while it still holds Liger's value (a later change is kept)."""
    for module, old, new in record["modules"]:
        for key, value in old.items():
            if module.__dict__.get(key, _MISSING) is not new[key]:
                continue
            if value is _MISSING:
                del module.__dict__[key]
            else:
                module.__dict__[key] = value
    namespace = importlib.import_module(record["namespace"])
    for key, (old, new) in record["globals"].items():
        if getattr(namespace, key, _MISSING) is new:
            if old is _MISSING:
                delattr(namespace, key)
            else:
                setattr(namespace, key, old)
