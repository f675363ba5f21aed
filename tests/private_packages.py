"""Packages the tests need that must not be installed in the test environment itself, installed once with pip
into a private folder (cached between runs under ~/.cache/qwen3-moe-fused) for a subprocess or one test module.

Used for transformers 4.57 (cannot share an environment with 5.x: legacy.py) and for bitsandbytes (importing it
costs every process that imports PEFT ~2.4 s, and the 2-rank tests start dozens).
"""

import os
import subprocess
import sys
from pathlib import Path


def install(name: str, packages, cache_root=None) -> Path:
    """The folder ``name`` holding ``packages`` (pip requirement strings, installed without dependencies on first
    use); raises RuntimeError with pip's output."""
    root = Path(cache_root or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-moe-fused"
    target = root / name
    if (target / ".complete").exists():
        return target
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                             "--target", str(target), "--upgrade", *packages], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"pip could not install {' '.join(packages)}: {result.stderr.strip()[-500:]}")
    (target / ".complete").write_text("\n".join(packages))
    return target
