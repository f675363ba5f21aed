"""Layers for ``kernels.kernelize``.

kernelize replaces ``forward`` of each host module with the layer's ``forward`` (``self`` is the host module),
so a layer has no ``__init__``, no members beyond ``forward``/``has_backward``/``can_torch_compile``, and a
``forward`` with the host's arity. Helpers live at module level.
"""

import torch
from torch import nn

from .functional import moe_experts

__all__ = ["Qwen3MoeSparseMoeBlock"]


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
        out = moe_experts(hidden, selected_experts, routing_weights, self.experts.gate_up_proj, self.experts.down_proj)
        return out.reshape(batch_size, sequence_length, hidden_dim)
