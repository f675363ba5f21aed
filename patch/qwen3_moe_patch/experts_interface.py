"""The fused experts as transformers experts implementation "qwen3_moe_fused".

Registered in transformers' ``ExpertsInterface`` when this package is imported, so
``from_pretrained(..., experts_implementation="qwen3_moe_fused")`` and ``model.set_experts_implementation(...)``
work for every 5.x model whose experts use the stacked SwiGLU layout (``@use_experts_implementation`` with its
defaults: ``gate_up_proj [E, 2I, H]`` gate rows first, ``down_proj [E, H, I]``, no bias, SiLU): Qwen3-MoE,
Qwen3-Next, Qwen3.5-MoE, Qwen2-MoE, OLMoE, Mixtral. The kernel loads on first use, from the source of the
last registration (default: org/qwen3-moe-fused at the version tested with the installed torch).

The function is the kernel's ``layers.Qwen3MoeExperts.forward``: it runs inside the experts module's call, after
whatever an engine wrapped around it (transformers' TP/EP experts forwards hand it local weights and local expert
ids; FSDP2 and ZeRO-3 gather the weights first), and under PEFT LoRA on the experts it reads PEFT's factors
instead of the materialised W + ΔW.
"""

from .kernel_source import KernelSource

__all__ = ["IMPLEMENTATION_NAME", "current_kernel", "register_experts_implementation"]

IMPLEMENTATION_NAME = "qwen3_moe_fused"
_state = {"source": None, "kernel": None}


def current_kernel():
    """The kernel package "qwen3_moe_fused" runs (loaded on first use from the last registration's source)."""
    if _state["kernel"] is None:
        source = _state["source"] or KernelSource.resolve()
        _state["kernel"] = source.load()
    return _state["kernel"]


def qwen3_moe_fused_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts-interface function: ``self`` is the experts module."""
    return current_kernel().layers.Qwen3MoeExperts.forward(self, hidden_states, top_k_index, top_k_weights)


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
