"""qwen3-moe-fused-patch: one-line use of the org/qwen3-moe-fused Hub kernel in transformers Qwen3-MoE models.

Importing it registers transformers experts implementation "qwen3_moe_fused" (see experts_interface).
"""

from .experts_interface import IMPLEMENTATION_NAME, register_experts_implementation
from .patch import PatchReport, find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe

__all__ = [
    "IMPLEMENTATION_NAME",
    "PatchReport",
    "find_moe_blocks",
    "patch_qwen3_moe",
    "register_experts_implementation",
    "unpatch_qwen3_moe",
]

try:
    register_experts_implementation()
except ImportError:  # transformers without ExpertsInterface (4.x): patch_qwen3_moe names what is supported
    pass
