"""qwen3-moe-fused-patch: one-line use of the org/qwen3-moe-fused Hub kernel in transformers Qwen3-MoE models.

Importing it registers transformers experts implementation "qwen3_moe_fused" (see experts_interface): at once
when transformers' experts interface is already imported, else right after it is (so importing this package,
e.g. for the CLI's ``--help``, does not import torch and transformers).
"""

import importlib.abc
import sys

from .experts_interface import IMPLEMENTATION_NAME, register_experts_implementation
from .patch import PatchReport, find_moe_blocks, patch_qwen3_moe, unpatch_qwen3_moe
from .quantize import dequantize_4bit, quantize_4bit
from .quantizer import experts_4bit

__all__ = [
    "IMPLEMENTATION_NAME",
    "PatchReport",
    "dequantize_4bit",
    "experts_4bit",
    "find_moe_blocks",
    "patch_qwen3_moe",
    "quantize_4bit",
    "register_experts_implementation",
    "unpatch_qwen3_moe",
]

_INTERFACE_MODULE = "transformers.integrations.moe"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' experts interface module so that the fused
    experts are registered once that module has run."""

    def find_spec(self, name, path, target=None):
        if name != _INTERFACE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = next((s for s in (f.find_spec(name, path, target) for f in sys.meta_path
                                 if hasattr(f, "find_spec")) if s is not None), None)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                register_experts_implementation()

            spec.loader.exec_module = exec_and_register
        return spec


if _INTERFACE_MODULE in sys.modules:
    register_experts_implementation()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
