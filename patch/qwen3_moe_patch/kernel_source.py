"""Where the kernel comes from: a loaded module, a local build, a Hub repo at a version or revision, or the
commit pinned by the plugin's ``kernels.lock``; and what was loaded (path, Hub commit).

Offline first: a Hub source whose snapshot is already in the local Hub cache (``$HF_HUB_CACHE``, e.g. after
``qwen3-moe-fused build --hub-cache`` or an earlier download) loads from there without touching the network,
so no ``HF_HUB_OFFLINE`` is needed and no publisher-trust lookup is retried; otherwise it is downloaded. A cached
version stays in use until a download of a newer one (``kernels download``) or an explicit ``revision``.
"""

import json
import os
import re
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
            _check_build_folder(Path(local_path))
            return cls(str(local_path), local_path=Path(local_path), trust_remote_code=trust_remote_code)
        repo_id = repo_id or os.environ.get("QWEN3_MOE_FUSED_REPO", DEFAULT_REPO_ID)
        if revision is not None:
            return cls(f"{repo_id}@{revision}", repo_id=repo_id, revision=revision, trust_remote_code=trust_remote_code)
        if locked:
            return cls(f"{repo_id} (locked by {LOCKFILE.name})", repo_id=repo_id, lockfile=LOCKFILE,
                       trust_remote_code=trust_remote_code)
        version = _version_number(version, "version") if version is not None else default_kernel_version()
        return cls(f"{repo_id} v{version}", repo_id=repo_id, version=version, trust_remote_code=trust_remote_code)

    def cached_build(self) -> Path | None:
        """The ``build`` folder of this Hub source's snapshot in the local Hub cache, or None."""
        if self.repo_id is None:
            return None
        import huggingface_hub.constants as hub

        repo_dir = Path(hub.HF_HUB_CACHE) / ("kernels--" + self.repo_id.replace("/", "--"))
        if self.lockfile is not None:
            commit = _locked_commit(self.lockfile, self.repo_id)
        elif self.revision is not None:
            ref = repo_dir / "refs" / self.revision
            commit = ref.read_text().strip() if ref.is_file() else self.revision
        else:
            ref = repo_dir / "refs" / f"v{self.version}"
            commit = ref.read_text().strip() if ref.is_file() else None
        build = repo_dir / "snapshots" / commit / "build" if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None
        return build if build is not None and build.is_dir() else None

    def load(self) -> ModuleType:
        """The kernel module; errors name the source and keep the loader's reason."""
        if self.module is not None:
            return self.module
        import kernels

        _quiet_repeats()
        cached = self.cached_build()
        try:
            if self.local_path is not None or cached is not None:
                return kernels.get_local_kernel(self.local_path or cached, trust_remote_code=self.trust_remote_code)
            if self.lockfile is not None:
                return kernels.load_kernel(self.repo_id, lockfile=self.lockfile)
            ref = dict(version=self.version) if self.revision is None else dict(revision=self.revision)
            return kernels.get_kernel(self.repo_id, trust_remote_code=self.trust_remote_code, **ref)
        except Exception as err:
            raise RuntimeError(self.failure(err)) from err

    def failure(self, err: Exception) -> str:
        """One line: this source could not be loaded, why, and what to do."""
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        if self.local_path is None and self.module is None and _is_network_error(err):
            import huggingface_hub.constants as hub

            return (f"cannot load kernel {self.label}: the Hub is not reachable and the local Hub cache "
                    f"({hub.HF_HUB_CACHE}) has no copy of it. Fix: connect once, or in a checkout run `qwen3-moe-fused "
                    f"build --hub-cache {hub.HF_HUB_CACHE}`, or pass local_path=<build folder>. ({reason})")
        return f"cannot load kernel {self.label}: {reason}"

    def layer_repository(self, layer_name: str):
        """The ``kernels`` repository object kernelize loads ``layer_name`` from (not for a loaded module)."""
        import kernels

        _quiet_repeats()
        cached = self.cached_build()
        if self.local_path is not None or cached is not None:
            return kernels.LocalLayerRepository(self.local_path or cached, layer_name=layer_name)
        if self.lockfile is not None:
            return kernels.LockedLayerRepository(self.repo_id, lockfile=self.lockfile, layer_name=layer_name,
                                                 trust_remote_code=self.trust_remote_code)
        ref = dict(version=self.version) if self.revision is None else dict(revision=self.revision)
        return kernels.LayerRepository(self.repo_id, layer_name=layer_name, trust_remote_code=self.trust_remote_code,
                                       **ref)


class _OncePerMessage:
    """Logging filter: each distinct message once per process (kernels logs its offline trust-check notice from
    two places on every load)."""

    def __init__(self):
        self.seen = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _quiet_repeats() -> None:
    import logging

    log = logging.getLogger("kernels.hf_hub")
    if not any(isinstance(f, _OncePerMessage) for f in log.filters):
        log.addFilter(_OncePerMessage())


def _version_number(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a kernel version number such as 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a kernel version number >= 1, got {value!r}")
    return number


def _check_build_folder(path: Path) -> None:
    """A clear error unless ``path`` is a kernel build folder (holding ``torch-<backend>/`` variants)."""
    if not path.exists():
        raise ValueError(f"local_path {path} does not exist; build one with `qwen3-moe-fused build --out {path}`")
    variants = sorted(p.name for p in path.glob("torch-*") if p.is_dir()) if path.is_dir() else []
    if not variants:
        raise ValueError(f"local_path {path} holds no kernel build (no torch-<backend>/ folder such as torch-cpu or "
                         f"torch-cuda); build one with `qwen3-moe-fused build --out {path}`")


def _locked_commit(lockfile: Path, repo_id: str) -> str | None:
    for entry in json.loads(Path(lockfile).read_text()):
        if entry.get("dependency", {}).get("repo-id") == repo_id:
            return entry.get("lock", {}).get("commit")
    return None


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the Hub could not be reached."""
    while err is not None:
        name = type(err).__name__
        if name in ("ConnectError", "ConnectionError", "ConnectTimeout", "LocalEntryNotFoundError",
                    "OfflineModeIsEnabled") or "Name or service not known" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def kernel_location(function) -> tuple[str, str | None]:
    """(folder, Hub commit or None) of the kernel code ``function`` (e.g. the layer forward) runs from."""
    folder = Path(function.__code__.co_filename).parent
    parts = folder.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None
    return str(folder), commit
