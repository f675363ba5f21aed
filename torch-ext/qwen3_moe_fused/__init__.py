"""qwen3-moe-fused: fused grouped-GEMM kernels for Qwen3-MoE experts (forward and backward).

Public API: ``moe_experts`` (functional), ``layers`` (for ``kernels.kernelize``) and ``reference`` (the
pure-torch spec with the same signatures).
"""

from . import layers, reference
from .functional import ExpertsLora, moe_experts

__all__ = ["ExpertsLora", "layers", "moe_experts", "reference"]
