"""``qwen3-moe-fused``: build the Hub kernel without Nix, lock it, and check it end to end on a tiny model.

    qwen3-moe-fused build [--project DIR] [--out DIR] [--backend B ...] [--hub-cache DIR]
    qwen3-moe-fused lock  [--project DIR] [--out FILE]
    qwen3-moe-fused check [--project DIR] [--steps N] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .kernel_build import build_kernel, build_revision, install_in_hub_cache, kernel_config
from .kernel_source import DEFAULT_REPO_ID, LOCKFILE


def _build(args) -> int:
    variants = build_kernel(args.project, out_dir=args.out, backends=args.backend or None)
    for backend, path in variants.items():
        print(f"built torch-{backend}: {path}")
    if args.hub_cache:
        out = Path(args.out) if args.out else Path(args.project) / "build"
        version = kernel_config(args.project)["general"]["version"]
        revision = install_in_hub_cache(out, args.hub_cache, DEFAULT_REPO_ID, version)
        print(f"installed as {DEFAULT_REPO_ID} v{version} (revision {revision}) in Hub cache {args.hub_cache}")
    return 0


def _lock(args) -> int:
    """Offline equivalent of ``kernels lock patch/``: pin the revision ``build --hub-cache`` installs."""
    version = kernel_config(args.project)["general"]["version"]
    with tempfile.TemporaryDirectory() as tmp:
        build_kernel(args.project, out_dir=tmp)
        revision = build_revision(tmp)
    lock = [{"dependency": {"repo-id": DEFAULT_REPO_ID, "version": version}, "lock": {"commit": revision}}]
    Path(args.out).write_text(json.dumps(lock, indent=2) + "\n")
    print(f"{args.out}: {DEFAULT_REPO_ID} v{version} -> {revision}")
    return 0


def _train(model, batches, lr):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, seconds = [], []
    for input_ids in batches:
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append((out.loss.item(), out.aux_loss.item()))
    return losses, seconds


def _check(args) -> int:
    with tempfile.TemporaryDirectory(prefix="qwen3-moe-fused-") as tmp:
        # Offline, from a private Hub cache. The Hub client read its environment when this package imported
        # transformers, so its constants are set directly.
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True
        hub.HF_HUB_CACHE = str(Path(tmp) / "hub")
        version = kernel_config(args.project)["general"]["version"]
        build_kernel(args.project, out_dir=Path(tmp) / "build")
        revision = install_in_hub_cache(Path(tmp) / "build", Path(tmp) / "hub", DEFAULT_REPO_ID, version)

        import kernels
        import torch

        from .patch import patch_qwen3_moe
        from .presets import make_model

        kernel = kernels.get_kernel(DEFAULT_REPO_ID, version=version)
        print(f"loaded {DEFAULT_REPO_ID} v{version} offline from the local Hub cache: module {kernel.__name__}, "
              f"revision {revision[:12]}")

        dtype = getattr(torch, args.dtype)
        eager = make_model(seed=0, experts_implementation="eager").to(args.device, dtype)
        fused = make_model(seed=0).to(args.device, dtype)
        report = patch_qwen3_moe(fused, version=version)
        print(report)

        gen = torch.Generator().manual_seed(1)
        vocab = eager.config.vocab_size
        batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device) for _ in range(args.steps)]
        eager_losses, eager_s = _train(eager, batches, args.lr)
        fused_losses, fused_s = _train(fused, batches, args.lr)

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    print(f"\n{'step':>4} {'loss eager':>11} {'loss fused':>11} {'aux eager':>10} {'aux fused':>10}")
    worst = 0.0
    for i, ((le, ae), (lf, af)) in enumerate(zip(eager_losses, fused_losses)):
        worst = max(worst, abs(le - lf) / abs(le), abs(ae - af) / abs(ae))
        print(f"{i:>4} {le:>11.6f} {lf:>11.6f} {ae:>10.6f} {af:>10.6f}")
    param_diff = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), fused.parameters()))
    steady = slice(1, None) if len(eager_s) > 1 else slice(None)
    print(f"\nmax relative loss/aux difference {worst:.2e} (tolerance {tol:.0e}); "
          f"max parameter difference after {args.steps} steps {param_diff:.2e}")
    print(f"time per step (after the first): HF eager experts {1e3 * sum(eager_s[steady]) / len(eager_s[steady]):.1f} ms, "
          f"patched {1e3 * sum(fused_s[steady]) / len(fused_s[steady]):.1f} ms "
          f"({args.device}, {args.dtype}, batch {args.batch}x{args.seq})")
    ok = worst <= tol
    print("check passed" if ok else "check FAILED: the patched model does not train like HF eager")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3-moe-fused", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build build/torch-<backend>/ as kernel-builder does, without Nix")
    build.add_argument("--project", default=".", help="kernel project root (holds build.toml); default .")
    build.add_argument("--out", help="output folder; default <project>/build")
    build.add_argument("--backend", action="append", help="backend to build (repeatable); default: all in build.toml")
    build.add_argument("--hub-cache", help="also install the build into this Hugging Face Hub cache folder")
    lock = sub.add_parser("lock", help="write the plugin's kernels.lock for the current kernel source")
    lock.add_argument("--project", default=".", help="kernel project root (holds build.toml); default .")
    lock.add_argument("--out", default=str(LOCKFILE), help=f"lock file to write; default {LOCKFILE}")
    check = sub.add_parser("check", help="build, load through get_kernel offline, patch a tiny model, train vs HF eager")
    check.add_argument("--project", default=".", help="kernel project root (holds build.toml); default .")
    check.add_argument("--steps", type=int, default=5)
    check.add_argument("--batch", type=int, default=4)
    check.add_argument("--seq", type=int, default=64)
    check.add_argument("--lr", type=float, default=1e-3)
    check.add_argument("--device", default="cpu")
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    return {"build": _build, "lock": _lock, "check": _check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
