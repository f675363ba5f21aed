"""Layers for ``kernels.kernelize``.

kernelize replaces ``forward`` of each host module with the layer's ``forward`` (``self`` is the host module),
so a layer has no ``__init__``, no members beyond ``forward``/``has_backward``/``can_torch_compile``, and a
``forward`` with the host's arity. Helpers live at module level.
"""

import logging

import torch
from torch import nn

from .functional import ExpertsLora, moe_experts

__all__ = ["Qwen3MoeSparseMoeBlock", "peft_experts_lora"]

_logger = logging.getLogger(__name__)
_said_wrapped = False


def peft_experts_lora(experts):
    """(experts module, ExpertsLora or None) for experts wrapped by PEFT LoRA (``target_parameters``), or None
    when the wrapping cannot run fused: several active adapters, low-precision (fp8) weights, a layout PEFT did not
    transpose, or a disabled adapter that is merged (PEFT unmerges it in its own forward).

    Reads PEFT's ``ParamWrapper`` duck-typed (``base_layer``, ``parameter_name``, ``get_delta_factors``): the
    factors come from ``get_delta_factors`` (scaling, rsLoRA included; differentiable to lora_A / lora_B), and W + ΔW
    is never formed. A merged adapter, or disabled adapters, mean the base weight alone."""
    factors = {}
    module = experts
    while not hasattr(module, "gate_up_proj"):
        if not all(hasattr(module, a) for a in ("base_layer", "parameter_name", "get_delta_factors", "lora_A")):
            return None
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if module.disable_adapters and module.merged:
            return None
        if not (module.disable_adapters or module.merged) and adapters:
            weight = getattr(module.get_base_layer(), module.parameter_name)
            if len(adapters) > 1 or weight.dtype.itemsize < 2 or not module._did_swap_in_out_features:
                return None
            b, a, scale = module.get_delta_factors(adapters[0])  # B [E, out, r], A [E, r, in]
            factors[module.parameter_name] = (a, b, scale)
        module = module.base_layer
    if not factors:
        return module, None
    gate_up = factors.get("gate_up_proj", (None, None, 1.0))
    down = factors.get("down_proj", (None, None, 1.0))
    return module, ExpertsLora(gate_up[0], gate_up[1], down[0], down[1], gate_up[2], down[2])


def _materialized_experts(experts, hidden, selected_experts, routing_weights):
    """Experts PEFT wraps in a way the kernel does not read: run the host's experts module (PEFT forms W + ΔW).
    Said once."""
    global _said_wrapped
    if not _said_wrapped:
        _said_wrapped = True
        _logger.warning(
            "qwen3-moe-fused: LoRA on the experts with several active adapters, fp8 weights or a merged disabled "
            "adapter: these experts run through the model's own experts implementation with the materialised W + ΔW"
        )
    return experts(hidden, selected_experts, routing_weights)


class Qwen3MoeSparseMoeBlock(nn.Module):
    """transformers 5.x ``Qwen3MoeSparseMoeBlock.forward`` with the experts computed by this package.

    Reads the host's ``self.gate`` (``Qwen3MoeTopKRouter``, called as a module so transformers' router-logit
    recorder and the aux loss see it) and ``self.experts.gate_up_proj`` / ``self.experts.down_proj``, and the
    LoRA factors when PEFT wraps the experts (``peft_experts_lora``).
    Returns a tensor shaped like ``hidden_states``, as the host does. Compiles with ``fullgraph=True`` on the
    kernel path (custom ops with fake implementations); the CPU reference path compiles with graph breaks.
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(hidden)
        resolved = peft_experts_lora(self.experts)
        if resolved is None:
            out = _materialized_experts(self.experts, hidden, selected_experts, routing_weights)
        else:
            experts, lora = resolved
            out = moe_experts(hidden, selected_experts, routing_weights, experts.gate_up_proj, experts.down_proj, lora=lora)
        return out.reshape(batch_size, sequence_length, hidden_dim)
