"""qwen3-moe-fused: fused grouped-GEMM kernels for Qwen3-MoE experts (forward and backward).

Public API: ``moe_experts`` (functional), ``tune`` (autotune ahead of training; ``tuning`` says how configs are
chosen), ``layers`` (for ``kernels.kernelize``), ``reference`` (the pure-torch spec with the same signatures) and
``weights4bit`` / ``Tensor4bit`` / ``dequantize_4bit`` (stacked experts in bitsandbytes' 4-bit storage).
"""

from . import layers, reference, tuning, weights4bit
from .functional import ExpertsLora, Weight4bit, dequantize_4bit, moe_experts, tune
from .weights4bit import Tensor4bit

__all__ = ["ExpertsLora", "Tensor4bit", "Weight4bit", "dequantize_4bit", "layers", "moe_experts", "reference", "tune", "tuning",
           "weights4bit"]
