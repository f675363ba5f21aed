"""The fused experts as transformers experts implementation "qwen3_moe_fused".

Registered in transformers' ``ExpertsInterface`` when this package is imported, so
``from_pretrained(..., experts_implementation="qwen3_moe_fused")`` and ``model.set_experts_implementation(...)``
work for every 5.x model whose experts use the stacked SwiGLU layout (``@use_experts_implementation`` with its
defaults: ``gate_up_proj [E, 2I, H]`` gate rows first, ``down_proj [E, H, I]``, no bias, SiLU): Qwen3-MoE,
Qwen3-Next, Qwen3.5-MoE, Qwen2-MoE, OLMoE, Mixtral. The kernel loads on first use, from the source of the
last registration (default: org/qwen3-moe-fused at the version tested with the installed torch).
"""

from .kernel_source import KernelSource

__all__ = ["IMPLEMENTATION_NAME", "register_experts_implementation"]

IMPLEMENTATION_NAME = "qwen3_moe_fused"
_REQUIRED_LAYOUT = (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                    ("has_post_expert_norm", False))
_state = {"source": None, "kernel": None}


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


def qwen3_moe_fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function: ``self`` is the experts module."""
    _check_layout(self)
    return _kernel().moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


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
