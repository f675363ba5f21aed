"""Layers for ``kernels.kernelize``.

kernelize replaces ``forward`` of each host module with the layer's ``forward`` (``self`` is the host module),
so a layer has no ``__init__``, no members beyond ``forward``/``has_backward``/``can_torch_compile``, and a
``forward`` with the host's arity. Helpers live at module level.
"""

import logging

import torch
from torch import nn

from .functional import moe_experts

__all__ = ["Qwen3MoeSparseMoeBlock"]

_logger = logging.getLogger(__name__)
_said_wrapped = False


def _wrapped_experts(experts, hidden, selected_experts, routing_weights):
    """Experts wrapped by PEFT (LoRA on the expert weights): run the host's experts module, which PEFT gives the
    materialised W+ΔW. Said once."""
    global _said_wrapped
    if not _said_wrapped:
        _said_wrapped = True
        _logger.warning(
            "qwen3-moe-fused: %s wraps the experts (LoRA on the expert weights); they run through the model's own "
            "experts implementation with the materialised W+ΔW, not the fused kernel", type(experts).__name__,
        )
    return experts(hidden, selected_experts, routing_weights)


class Qwen3MoeSparseMoeBlock(nn.Module):
    """transformers 5.x ``Qwen3MoeSparseMoeBlock.forward`` with the experts computed by this package.

    Reads the host's ``self.gate`` (``Qwen3MoeTopKRouter``, called as a module so transformers' router-logit
    recorder and the aux loss see it) and ``self.experts.gate_up_proj`` / ``self.experts.down_proj``.
    Returns a tensor shaped like ``hidden_states``, as the host does. Compiles with ``fullgraph=True`` on the
    kernel path (custom ops with fake implementations); the CPU reference path compiles with graph breaks.
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(hidden)
        if hasattr(self.experts, "gate_up_proj"):
            out = moe_experts(hidden, selected_experts, routing_weights, self.experts.gate_up_proj, self.experts.down_proj)
        else:
            out = _wrapped_experts(self.experts, hidden, selected_experts, routing_weights)
        return out.reshape(batch_size, sequence_length, hidden_dim)
