"""What this plugin supports and which kernel version it loads by default."""

import logging
import os

__all__ = ["SUPPORTED_TRANSFORMERS", "TESTED_KERNEL_VERSIONS", "check_transformers", "default_kernel_version"]

logger = logging.getLogger("qwen3_moe_patch")

SUPPORTED_TRANSFORMERS = ("5.17", "5.25")  # [lowest, first unsupported)

# torch major.minor -> the org/qwen3-moe-fused version tested with it (GPU runs: torch 2.11; CI: torch 2.13 CPU).
# A noarch kernel has one build per backend, so the pin is per torch, not per build; kernels.lock pins the
# commit of each version.
TESTED_KERNEL_VERSIONS = {"2.11": 1, "2.13": 1}

_warned_torch = set()


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_transformers(version: str | None = None) -> None:
    """Raise a clear error unless transformers ``version`` (default: installed) is in the supported range."""
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = SUPPORTED_TRANSFORMERS
    if not _release(low) <= _release(version)[:2] < _release(high):
        raise RuntimeError(
            f"transformers {version} is not supported: qwen3-moe-fused-patch supports transformers >= {low}, < {high} "
            "(stacked Qwen3-MoE experts). transformers 4.x keeps one module per expert and is not supported."
        )


def default_kernel_version(torch_version: str | None = None) -> int:
    """Kernel version for the running torch: ``$QWEN3_MOE_FUSED_VERSION``, else the tested one for this torch,
    else (with a warning naming what is tested) the newest tested version."""
    if os.environ.get("QWEN3_MOE_FUSED_VERSION"):
        value = os.environ["QWEN3_MOE_FUSED_VERSION"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"QWEN3_MOE_FUSED_VERSION must be a kernel version number such as 1, got {value!r}: "
                             "unset it to load the version tested with this torch")
        return int(value)
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    major_minor = ".".join(str(x) for x in _release(torch_version.split("+")[0])[:2])
    if major_minor in TESTED_KERNEL_VERSIONS:
        return TESTED_KERNEL_VERSIONS[major_minor]
    newest = max(TESTED_KERNEL_VERSIONS.values())
    if major_minor not in _warned_torch:
        _warned_torch.add(major_minor)
        tested = ", ".join(f"torch {t} -> v{v}" for t, v in sorted(TESTED_KERNEL_VERSIONS.items()))
        logger.warning(
            "qwen3-moe-fused: torch %s is untested (tested: %s); loading kernel v%d. Choose another with "
            "patch_qwen3_moe(..., version=N) or QWEN3_MOE_FUSED_VERSION=N.", torch_version, tested, newest,
        )
    return newest
