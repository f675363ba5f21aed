"""Where the kernel comes from: a loaded module, a local build, a Hub repo at a version or revision, or the
commit pinned by the plugin's ``kernels.lock``; and what was loaded (path, Hub commit)."""

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .versions import default_kernel_version

__all__ = ["DEFAULT_REPO_ID", "LOCKFILE", "KernelSource", "kernel_location"]

DEFAULT_REPO_ID = "org/qwen3-moe-fused"
LOCKFILE = Path(__file__).with_name("kernels.lock")


@dataclass(frozen=True)
class KernelSource:
    label: str
    module: ModuleType | None = None
    local_path: Path | None = None
    repo_id: str | None = None
    version: int | None = None
    revision: str | None = None
    lockfile: Path | None = None
    trust_remote_code: bool = False

    @classmethod
    def resolve(cls, kernel=None, repo_id=None, version=None, revision=None, local_path=None, locked=False,
                trust_remote_code=False) -> "KernelSource":
        """At most one of ``kernel``, ``local_path``, ``revision``, ``locked``; else ``repo_id`` (default
        ``$QWEN3_MOE_FUSED_REPO`` or org/qwen3-moe-fused) at ``version`` (default: tested for this torch)."""
        given = [name for name, value in (("kernel", kernel), ("local_path", local_path), ("revision", revision),
                                          ("locked", locked or None)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"pass at most one kernel source; got {', '.join(given)}")
        if kernel is not None:
            return cls(getattr(kernel, "__name__", "given module"), module=kernel)
        if local_path is not None:
            return cls(str(local_path), local_path=Path(local_path), trust_remote_code=trust_remote_code)
        repo_id = repo_id or os.environ.get("QWEN3_MOE_FUSED_REPO", DEFAULT_REPO_ID)
        if revision is not None:
            return cls(f"{repo_id}@{revision}", repo_id=repo_id, revision=revision, trust_remote_code=trust_remote_code)
        if locked:
            return cls(f"{repo_id} (locked by {LOCKFILE.name})", repo_id=repo_id, lockfile=LOCKFILE,
                       trust_remote_code=trust_remote_code)
        version = int(version) if version is not None else default_kernel_version()
        return cls(f"{repo_id} v{version}", repo_id=repo_id, version=version, trust_remote_code=trust_remote_code)

    def load(self) -> ModuleType:
        """The kernel module; errors name the source and keep the loader's reason."""
        if self.module is not None:
            return self.module
        import kernels

        try:
            if self.local_path is not None:
                return kernels.get_local_kernel(self.local_path, trust_remote_code=self.trust_remote_code)
            if self.lockfile is not None:
                return kernels.load_kernel(self.repo_id, lockfile=self.lockfile)
            ref = dict(version=self.version) if self.revision is None else dict(revision=self.revision)
            return kernels.get_kernel(self.repo_id, trust_remote_code=self.trust_remote_code, **ref)
        except Exception as err:
            raise RuntimeError(f"cannot load kernel {self.label}: {type(err).__name__}: {err}") from err

    def layer_repository(self, layer_name: str):
        """The ``kernels`` repository object kernelize loads ``layer_name`` from (not for a loaded module)."""
        import kernels

        if self.local_path is not None:
            return kernels.LocalLayerRepository(self.local_path, layer_name=layer_name)
        if self.lockfile is not None:
            return kernels.LockedLayerRepository(self.repo_id, lockfile=self.lockfile, layer_name=layer_name,
                                                 trust_remote_code=self.trust_remote_code)
        ref = dict(version=self.version) if self.revision is None else dict(revision=self.revision)
        return kernels.LayerRepository(self.repo_id, layer_name=layer_name, trust_remote_code=self.trust_remote_code,
                                       **ref)


def kernel_location(function) -> tuple[str, str | None]:
    """(folder, Hub commit or None) of the kernel code ``function`` (e.g. the layer forward) runs from."""
    folder = Path(function.__code__.co_filename).parent
    parts = folder.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return str(folder), commit
