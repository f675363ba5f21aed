"""Nix-free build of the noarch kernel, writing what kernel-builder writes, and a local Hub cache of it.

For each backend in build.toml, ``build/torch-<backend>/`` holds the files of ``torch-ext/<python_name>/``
(those with a ``[torch-noarch] pyext`` extension, bytecode skipped), the ``_ops.py`` kernel-builder renders
for noarch kernels, and a ``metadata.json`` the ``kernels`` loader accepts (name, id, version, license,
python-depends, backend, and the sha256 digest that kernel-builder's hash hook adds).

The unique id in the op namespace and ``metadata.id`` (``_<python_name>_<backend>_<uid>``) is the first 7 hex
digits of the git tree id of ``torch-ext/<python_name>`` as it is on disk: equal to
``git rev-parse HEAD:torch-ext/<python_name>`` on a clean checkout, different for any edit, and computable
without git. (kernel-builder takes the repository's root tree and appends ``_dirty`` to uncommitted builds,
so two different dirty builds would collide; this id does not.)
"""

import base64
import hashlib
import json
import os
import shutil
import tomllib
from pathlib import Path

__all__ = ["build_kernel", "build_revision", "install_in_hub_cache", "kernel_config", "source_tree_id"]

_OPS_TEMPLATE = '''import torch

def get_backend() -> str:
    """Detect the backend by inspecting torch."""
    import torch

    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None and acc.type == "tpu":
        return "tpu"
    elif hasattr(torch, "neuron"):
        # Needs to be sorted before specific Torch builds, since Neuron
        # extension can be loaded into e.g. CUDA Torch builds.
        return "neuron"
    elif torch.version.cuda is not None:
        return "cuda"
    elif torch.version.hip is not None:
        return "rocm"
    elif torch.backends.mps.is_available():
        return "metal"
    elif hasattr(torch.version, "xpu") and torch.version.xpu is not None:
        return "xpu"
    else:
        return "cpu"


def _find_ops_name() -> str:
    kernel_name = "{kernel_name}"
    unique_id = "{unique_id}"
    backend = get_backend()
    return f"_{{kernel_name}}_{{backend}}_{{unique_id}}"


_OPS_NAME = _find_ops_name()

ops = getattr(torch.ops, _OPS_NAME)

def add_op_namespace_prefix(op_name: str) -> str:
    """
    Prefix op by namespace.
    """
    return f"{{_OPS_NAME}}::{{op_name}}"
'''

_BYTECODE_DIR = "__pycache__"


def kernel_config(project_dir: Path) -> dict:
    """build.toml of the kernel project, checked for what a noarch build needs."""
    path = Path(project_dir) / "build.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the kernel project's root (the folder holding build.toml)")
    config = tomllib.loads(path.read_text())
    general = config.get("general", {})
    missing = [key for key in ("name", "version", "license", "backends") if key not in general]
    if missing:
        raise ValueError(f"{path}: [general] lacks {', '.join(missing)}")
    if "torch-noarch" not in config:
        raise ValueError(f"{path}: only noarch kernels ([torch-noarch]) are built by this tool")
    return config


def _package_files(package_dir: Path, extensions: list[str]) -> list[Path]:
    files = []
    for path in sorted(package_dir.rglob("*")):
        rel = path.relative_to(package_dir)
        if path.is_file() and _BYTECODE_DIR not in rel.parts and path.suffix.lstrip(".") in extensions:
            files.append(rel)
    return files


def _git_tree_sha(directory: Path, include) -> str:
    """git's tree id of ``directory``, over the files for which ``include(relative_path)`` is true."""
    entries = []
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            if child.name == _BYTECODE_DIR:
                continue
            sub = _git_tree_sha(child, lambda rel, name=child.name: include(Path(name) / rel))
            if sub is not None:
                entries.append((child.name + "/", b"40000 " + child.name.encode(), bytes.fromhex(sub)))
        elif child.is_file() and include(Path(child.name)):
            data = child.read_bytes()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).digest()
            mode = b"100755" if os.access(child, os.X_OK) else b"100644"
            entries.append((child.name, mode + b" " + child.name.encode(), blob))
    if not entries:
        return None
    body = b"".join(head + b"\0" + sha for _, head, sha in sorted(entries))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def source_tree_id(project_dir: Path) -> str:
    """git tree id of ``torch-ext/<python_name>`` as on disk (bytecode excluded)."""
    config = kernel_config(project_dir)
    package_dir = Path(project_dir) / "torch-ext" / config["general"]["name"].replace("-", "_")
    sha = _git_tree_sha(package_dir, lambda rel: rel.suffix != ".pyc")
    if sha is None:
        raise FileNotFoundError(f"{package_dir} holds no files")
    return sha


def _digest(variant_dir: Path) -> dict:
    files = {}
    for path in sorted(variant_dir.rglob("*")):
        rel = path.relative_to(variant_dir).as_posix()
        if path.is_file() and rel != "metadata.json":
            files[rel] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return {"algorithm": "sha256", "files": files}


def build_kernel(project_dir, out_dir=None, backends=None, unique_id=None) -> dict[str, Path]:
    """Write ``<out_dir>/torch-<backend>/`` for each backend (default: all of build.toml) and return them.

    ``out_dir`` defaults to ``<project_dir>/build``; ``unique_id`` overrides the source-tree id.
    """
    project_dir = Path(project_dir)
    config = kernel_config(project_dir)
    general = config["general"]
    python_name = general["name"].replace("-", "_")
    package_dir = project_dir / "torch-ext" / python_name
    if not (package_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir}/__init__.py not found")
    if (package_dir / python_name).exists():
        raise ValueError(f"{package_dir / python_name} must not exist (kernel-builder's layout check)")
    unknown = sorted(set(backends or []) - set(general["backends"]))
    if unknown:
        raise ValueError(f"backends {unknown} are not in build.toml's general.backends {general['backends']}")
    extensions = config["torch-noarch"].get("pyext", ["py", "pyi"])
    uid = unique_id or source_tree_id(project_dir)[:7]
    out_dir = Path(out_dir) if out_dir is not None else project_dir / "build"

    variants = {}
    for backend in sorted(backends or general["backends"]):
        variant_dir = out_dir / f"torch-{backend}"
        if variant_dir.exists():
            shutil.rmtree(variant_dir)
        for rel in _package_files(package_dir, extensions):
            if rel.as_posix() == "_ops.py":
                continue  # rendered below, as kernel-builder does
            (variant_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir / rel, variant_dir / rel)
        (variant_dir / "_ops.py").write_text(_OPS_TEMPLATE.format(kernel_name=python_name, unique_id=uid))
        metadata = {
            "name": general["name"],
            "id": f"_{python_name}_{backend}_{uid}",
            "version": general["version"],
            "license": general["license"],
            "python-depends": [],
            "backend": {"type": backend},
            "digest": _digest(variant_dir),
        }
        (variant_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        variants[backend] = variant_dir
    return variants


def _variants(build_dir: Path) -> list[Path]:
    variants = sorted(p for p in build_dir.iterdir() if p.is_dir() and p.name.startswith("torch-"))
    if not variants:
        raise FileNotFoundError(f"{build_dir} holds no torch-<backend> variant; build the kernel first")
    return variants


def build_revision(build_dir) -> str:
    """40-hex revision standing for the build's content (git tree id of its torch-<backend>/ folders)."""
    _variants(Path(build_dir))
    return _git_tree_sha(Path(build_dir), lambda rel: rel.parts[0].startswith("torch-") and rel.suffix != ".pyc")


def install_in_hub_cache(build_dir, cache_dir, repo_id: str, version: int, revision: str | None = None) -> str:
    """Lay ``build_dir`` (holding ``torch-<backend>/``) out as a snapshot of kernel repo ``repo_id`` in the
    Hugging Face Hub cache ``cache_dir``, with ``refs/main`` and ``refs/v<version>`` pointing at it, as a
    download of branch ``v<version>`` would. Returns the snapshot's 40-hex revision (``build_revision`` unless
    given)."""
    build_dir, cache_dir = Path(build_dir), Path(cache_dir)
    variants = _variants(build_dir)
    revision = revision or build_revision(build_dir)
    repo_dir = cache_dir / ("kernels--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision / "build"
    for variant in variants:
        if (snapshot / variant.name).exists():
            shutil.rmtree(snapshot / variant.name)
        shutil.copytree(variant, snapshot / variant.name, ignore=shutil.ignore_patterns(_BYTECODE_DIR))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in ("main", f"v{version}"):
        (repo_dir / "refs" / ref).write_text(revision)
    return revision
