"""qwen3-moe-fused-patch: one-line use of the org/qwen3-moe-fused Hub kernel in transformers Qwen3-MoE models."""

from .patch import PatchReport, find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe

__all__ = ["PatchReport", "find_moe_blocks", "patch_qwen3_moe", "unpatch_qwen3_moe"]
