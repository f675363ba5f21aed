"""Shared fixtures: the kernel built from this checkout, served from a private offline Hub cache.

The Hub client reads HF_HUB_OFFLINE / HF_HUB_CACHE when it is imported, so they are set here, before any test
module imports transformers or kernels. Without CUDA, the Triton kernels run through Triton's interpreter
(TRITON_INTERPRET=1, read when the kernel package is imported), so CPU runs test the kernels themselves.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_HUB_CACHE = tempfile.mkdtemp(prefix="qwen3-moe-fused-hub-")
atexit.register(shutil.rmtree, _HUB_CACHE, True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("LOCAL_KERNELS", None)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qwen3_moe_patch.kernel_build import build_kernel, install_in_hub_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "org/qwen3-moe-fused"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    # Triton 3.6's interpreter converts size-1 arrays to scalars, which NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hub_cache() -> Path:
    return Path(_HUB_CACHE)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build")
    build_kernel(ROOT, out_dir=out)
    return out


@pytest.fixture(scope="session")
def hub_revision(build_dir, hub_cache) -> str:
    return install_in_hub_cache(build_dir, hub_cache, REPO_ID, 1)


@pytest.fixture(scope="session")
def kernel(hub_revision):
    """The kernel as users get it: ``get_kernel("org/qwen3-moe-fused", version=1)``."""
    import kernels

    return kernels.get_kernel(REPO_ID, version=1)


def _installed(install):
    """``install()``'s folder; without network it is skipped, except in CI (CI set), where that is an error."""
    try:
        return install()
    except RuntimeError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def transformers457() -> Path:
    """A folder with transformers 4.57.1 for subprocesses (tests/legacy.py)."""
    import legacy

    return _installed(legacy.install)


@pytest.fixture(scope="session")
def bnb():
    """``bitsandbytes.functional`` 0.50.2: the installed one where it is importable (the GPU machine gets it as a
    carried wheel), else from a private folder, importable in this process only (tests/private_packages.py says
    why it is not in the test environment)."""
    import importlib.util
    import sys

    import private_packages

    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes.functional

        return bitsandbytes.functional
    folder = _installed(lambda: private_packages.install("bitsandbytes-0.50.2", ["bitsandbytes==0.50.2"]))
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import bitsandbytes.functional

    return bitsandbytes.functional
