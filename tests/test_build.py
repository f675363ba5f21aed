"""The Nix-free build writes what kernel-builder writes for a noarch kernel, and the kernels loader accepts it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels._rust import Build, Digest, DigestAlgorithm, Metadata

from qwen3_moe_patch.kernel_build import build_kernel, source_tree_id

from conftest import ROOT

PACKAGE = ROOT / "torch-ext" / "qwen3_moe_fused"


def _source_files():
    return sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts and p.name != "_ops.py"
    )


def test_build_toml_is_valid_for_kernel_builder():
    build = Build.open(ROOT)
    assert sorted(str(b).lower() for b in build.general.backends) == ["cpu", "cuda"]


def test_variants_hold_package_ops_and_metadata(build_dir):
    for backend in ("cpu", "cuda"):
        variant = build_dir / f"torch-{backend}"
        files = sorted(p.relative_to(variant).as_posix() for p in variant.rglob("*") if p.is_file())
        assert files == sorted(_source_files() + ["_ops.py", "metadata.json"])
        for rel in _source_files():
            assert (variant / rel).read_bytes() == (PACKAGE / rel).read_bytes()


def test_metadata_is_accepted_by_the_loader(build_dir):
    uid = source_tree_id(ROOT)[:7]
    for backend in ("cpu", "cuda"):
        variant = build_dir / f"torch-{backend}"
        meta = Metadata.read_from_file(variant / "metadata.json")
        assert meta.id == f"_qwen3_moe_fused_{backend}_{uid}"
        assert meta.version == 1 and meta.license == "Apache-2.0" and meta.python_depends == []
        assert str(meta.backend.backend_type).lower().endswith(backend)
        meta.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, variant))


def test_digest_detects_an_edited_file(build_dir, tmp_path):
    variant = shutil.copytree(build_dir / "torch-cpu", tmp_path / "torch-cpu")
    (variant / "layers.py").write_text("# edited\n")
    meta = Metadata.read_from_file(variant / "metadata.json")
    with pytest.raises(Exception, match="layers.py|igest"):
        meta.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, variant))


def test_ops_py_is_the_kernel_builder_template(build_dir):
    uid = source_tree_id(ROOT)[:7]
    text = (build_dir / "torch-cpu" / "_ops.py").read_text()
    assert 'kernel_name = "qwen3_moe_fused"' in text and f'unique_id = "{uid}"' in text
    namespace = {}
    exec(compile(text, "_ops.py", "exec"), namespace)
    backend = "cuda" if torch.version.cuda else "cpu"  # the namespace follows the running torch's backend
    assert namespace["add_op_namespace_prefix"]("moe") == f"_qwen3_moe_fused_{backend}_{uid}::moe"


def test_unique_id_is_gits_tree_id_of_the_package(tmp_path):
    """The id equals what git computes for the same files (checked in a scratch repository)."""
    repo = tmp_path / "repo"
    shutil.copytree(PACKAGE, repo / "pkg", ignore=shutil.ignore_patterns("__pycache__", "_ops.py"))
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    tree = subprocess.run(git + ["write-tree"], check=True, capture_output=True, text=True).stdout.strip()
    expected = subprocess.run(git + ["rev-parse", f"{tree}:pkg"], check=True, capture_output=True, text=True)
    project = tmp_path / "project"
    (project / "torch-ext").mkdir(parents=True)
    shutil.copy(ROOT / "build.toml", project)
    shutil.copytree(repo / "pkg", project / "torch-ext" / "qwen3_moe_fused")
    assert source_tree_id(project) == expected.stdout.strip()


def _project_copy(tmp_path, edit: str | None = None) -> Path:
    project = tmp_path / "project"
    project.mkdir(parents=True)
    shutil.copy(ROOT / "build.toml", project)
    package = shutil.copytree(PACKAGE, project / "torch-ext" / "qwen3_moe_fused", ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        with open(package / "reference.py", "a") as f:
            f.write(edit)
    return project


def test_two_builds_load_side_by_side_with_distinct_namespaces(tmp_path):
    """An edit gives a new id and op namespace; both builds import in one process (fresh interpreter)."""
    build_kernel(_project_copy(tmp_path / "a"), out_dir=tmp_path / "a" / "build")
    build_kernel(_project_copy(tmp_path / "b", "\n# edited\n"), out_dir=tmp_path / "b" / "build")
    script = (
        "import sys; from importlib import import_module; from pathlib import Path\n"
        "from kernels import get_local_kernel\n"
        "mods = [get_local_kernel(Path(p)) for p in sys.argv[1:]]\n"
        "print(' '.join(m.__name__ for m in mods))\n"
        "print(' '.join(import_module(m.__name__ + '._ops')._OPS_NAME for m in mods))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "a" / "build"), str(tmp_path / "b" / "build")],
        check=True, capture_output=True, text=True,
    ).stdout.split("\n")
    modules, namespaces = out[0].split(), out[1].split()
    assert len(set(modules)) == 2 and namespaces == modules


def test_two_variants_of_one_build_share_its_ops(build_dir, tmp_path):
    """Both variants of a build (other module id, same op namespace) load in one process; the second reuses the
    first's ops, which must outlive the first module."""
    variant = "torch-cuda" if torch.version.cuda else "torch-cpu"
    second = tmp_path / "other-variant"
    shutil.copytree(build_dir / variant, second / variant)
    meta = json.loads((second / variant / "metadata.json").read_text())
    meta["id"] = meta["id"].replace("_cuda_", "_other_").replace("_cpu_", "_other_")
    (second / variant / "metadata.json").write_text(json.dumps(meta))
    script = (
        "import gc, os, sys, torch; from pathlib import Path\n"
        "if not torch.cuda.is_available(): os.environ['TRITON_INTERPRET'] = '1'\n"
        "from kernels import get_local_kernel\n"
        "first = get_local_kernel(Path(sys.argv[1]))\n"
        "second = get_local_kernel(Path(sys.argv[2]))\n"
        "assert first is not second and first.ops.experts_forward is second.ops.experts_forward\n"
        "del first; gc.collect()\n"
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
        "x = torch.randn(5, 32, device=dev, requires_grad=True)\n"
        "w1 = torch.randn(4, 16, 32, device=dev, requires_grad=True); w2 = torch.randn(4, 32, 8, device=dev)\n"
        "idx = torch.randint(0, 4, (5, 2), device=dev); w = torch.rand(5, 2, device=dev)\n"
        "out = second.moe_experts(x, idx, w, w1, w2); out.sum().backward()\n"
        "ref = second.reference.moe_experts(x.detach(), idx, w, w1.detach(), w2)\n"
        "torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4); print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(build_dir), str(second)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_build_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError, match="build.toml"):
        build_kernel(tmp_path)
    with pytest.raises(ValueError, match="not in build.toml"):
        build_kernel(ROOT, out_dir=tmp_path / "out", backends=["rocm"])
