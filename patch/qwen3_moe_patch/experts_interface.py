"""The fused experts as transformers experts implementation "qwen3_moe_fused".

Registered in transformers' ``ExpertsInterface`` when this package is imported, so
``from_pretrained(..., experts_implementation="qwen3_moe_fused")`` and ``model.set_experts_implementation(...)``
work for every 5.x model whose experts use the stacked SwiGLU layout (``@use_experts_implementation`` with its
defaults: ``gate_up_proj [E, 2I, H]`` gate rows first, ``down_proj [E, H, I]``, no bias, SiLU): Qwen3-MoE,
Qwen3-Next, Qwen3.5-MoE, Qwen2-MoE, OLMoE, Mixtral. The kernel loads on first use, from the source of the
last registration (default: org/qwen3-moe-fused at the version tested with the installed torch).

Under PEFT LoRA on the experts (``target_parameters``) the function runs inside PEFT's wrapper, where the expert
weights are parametrized: it reads PEFT's factors (``_LoraFactorsProxy``: lhs = B [E, out, r], rhs = A
[E, r, in], scaling) and the raw weight, so W + ΔW is never formed. Other parametrizations (several adapters,
fp8) are used as PEFT forms them, said once.
"""

import logging

from torch.nn.utils import parametrize

from .kernel_source import KernelSource

logger = logging.getLogger("qwen3_moe_patch")

__all__ = ["IMPLEMENTATION_NAME", "register_experts_implementation"]

IMPLEMENTATION_NAME = "qwen3_moe_fused"
_REQUIRED_LAYOUT = (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                    ("has_post_expert_norm", False))
_state = {"source": None, "kernel": None, "said_materialized": False}


def _kernel():
    if _state["kernel"] is None:
        source = _state["source"] or KernelSource.resolve()
        _state["kernel"] = source.load()
    return _state["kernel"]


def _check_layout(experts) -> None:
    wrong = [f"{flag}={getattr(experts, flag)}" for flag, want in _REQUIRED_LAYOUT if getattr(experts, flag, want) != want]
    act = type(getattr(experts, "act_fn", None)).__name__
    if act not in ("SiLUActivation", "SiLU"):
        wrong.append(f"act_fn={act}")
    if wrong:
        raise NotImplementedError(
            f"experts implementation {IMPLEMENTATION_NAME!r} computes stacked SwiGLU experts (gate_up_proj [E, 2I, H] "
            f"with gate rows first, down_proj [E, H, I], SiLU, no bias); {type(experts).__name__} has "
            f"{', '.join(wrong)}: choose another experts_implementation for this model"
        )


def _weight_and_factors(experts, name):
    """(weight, (A, B, scale) or None): PEFT's LoRA factors where its factor proxy parametrizes ``name``."""
    if parametrize.is_parametrized(experts, name):
        chain = experts.parametrizations[name]
        proxy = chain[0]
        if len(chain) == 1 and all(hasattr(proxy, a) for a in ("lhs", "rhs", "scaling")):
            return chain.original, (proxy.rhs, proxy.lhs, proxy.scaling)
        if not _state["said_materialized"]:
            _state["said_materialized"] = True
            logger.warning("qwen3-moe-fused: %s.%s is parametrized by %s (e.g. several LoRA adapters or fp8): using the "
                           "weight as it forms it", type(experts).__name__, name, type(proxy).__name__)
    return getattr(experts, name), None


def qwen3_moe_fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function: ``self`` is the experts module."""
    _check_layout(self)
    kernel = _kernel()
    gate_up_proj, gate_up = _weight_and_factors(self, "gate_up_proj")
    down_proj, down = _weight_and_factors(self, "down_proj")
    lora = None
    if gate_up or down:
        gate_up, down = gate_up or (None, None, 1.0), down or (None, None, 1.0)
        lora = kernel.ExpertsLora(gate_up[0], gate_up[1], down[0], down[1], gate_up[2], down[2])
    return kernel.moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, lora=lora)


def register_experts_implementation(*, source: KernelSource | None = None, **kernel_source) -> str:
    """Register (again) "qwen3_moe_fused" in transformers' ExpertsInterface, using ``source`` or the source
    described by ``kernel_source`` (the arguments of ``KernelSource.resolve``; loaded on first use)."""
    from transformers.integrations.moe import ExpertsInterface

    if source is None and kernel_source:
        source = KernelSource.resolve(**kernel_source)
    if source is not None and source != _state["source"]:
        _state.update(source=source, kernel=source.module)
    ExpertsInterface.register(IMPLEMENTATION_NAME, qwen3_moe_fused_experts_forward)
    return IMPLEMENTATION_NAME
