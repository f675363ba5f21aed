"""qwen3-moe-fused: fused grouped-GEMM kernels for Qwen3-MoE experts (forward and backward).

Public API: ``moe_experts`` (functional), ``tune`` (autotune ahead of training; ``tuning`` says how configs are
chosen), ``layers`` (for ``kernels.kernelize``) and ``reference`` (the pure-torch spec with the same signatures).
"""

from . import layers, reference, tuning
from .functional import ExpertsLora, moe_experts, tune

__all__ = ["ExpertsLora", "layers", "moe_experts", "reference", "tune", "tuning"]
