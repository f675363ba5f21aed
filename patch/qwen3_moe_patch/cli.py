"""qwen3-moe-fused: build the Hub kernel without Nix, lock it, check it end to end on a tiny model, train.

    qwen3-moe-fused build [--project DIR] [--out DIR] [--backend B ...] [--hub-cache DIR]
    qwen3-moe-fused lock  [--project DIR] [--out FILE]
    qwen3-moe-fused check [--project DIR] [--steps N] [--device cpu|cuda] [--dtype float32|bfloat16]
    qwen3-moe-fused train [--preset tiny|30b-a3b-4layers|30b-a3b [--layers N] | --model PATH] [--impl fused ...]
                          [--lora-r R] [--gradient-checkpointing] [--data FILE] [--steps N] [--seq S] [--out DIR]
                          [--fsdp | --ep N | --zero3]   (under torchrun --nproc_per_node N)
    qwen3-moe-fused convert SRC DST --to stacked|per-expert [--max-shard-size 5GB] [--config-for transformers4]
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
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


@contextlib.contextmanager
def _offline_kernel(project):
    """(kernel module, version, revision): ``project`` built and loaded with get_kernel from a private Hub cache."""
    with tempfile.TemporaryDirectory(prefix="qwen3-moe-fused-") as tmp:
        # Offline, from a private Hub cache. The Hub client read its environment when this package imported
        # transformers, so its constants are set directly.
        import huggingface_hub.constants as hub

        saved = hub.HF_HUB_OFFLINE, hub.HF_HUB_CACHE
        hub.HF_HUB_OFFLINE = True
        hub.HF_HUB_CACHE = str(Path(tmp) / "hub")
        try:
            version = kernel_config(project)["general"]["version"]
            build_kernel(project, out_dir=Path(tmp) / "build")
            revision = install_in_hub_cache(Path(tmp) / "build", Path(tmp) / "hub", DEFAULT_REPO_ID, version)

            import kernels

            kernel = kernels.get_kernel(DEFAULT_REPO_ID, version=version)
            print(f"loaded {DEFAULT_REPO_ID} v{version} offline from the local Hub cache: module {kernel.__name__}, "
                  f"revision {revision[:12]}")
            yield kernel, version, revision
        finally:
            hub.HF_HUB_OFFLINE, hub.HF_HUB_CACHE = saved


def _checkout(project):
    """The kernel project to build: ``--project``, else the checkout this plugin runs from (an editable install,
    ``pip install -e ./patch``), else None (a pip-installed plugin without the sources)."""
    if project:
        return Path(project)
    root = Path(__file__).resolve().parents[2]
    return root if (root / "build.toml").is_file() and (root / "torch-ext").is_dir() else None


@contextlib.contextmanager
def _cli_kernel(project):
    """(kernel module, version): built from the checkout and loaded offline, or, without one, the plugin's default
    kernel source (the local Hub cache, else the Hub)."""
    root = _checkout(project)
    if root is not None:
        with _offline_kernel(root) as (kernel, version, _):
            yield kernel, version
        return
    from .kernel_source import KernelSource

    source = KernelSource.resolve()
    kernel = source.load()
    print(f"no kernel sources here (pip-installed plugin): loaded {source.label} from "
          f"{Path(kernel.__file__).parent}")
    yield kernel, source.version


def _positive(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return int(text)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}): use --device cpu, "
                         "or install a CUDA build of torch")


def _check(args) -> int:
    _check_device(args.device)
    with _cli_kernel(args.project) as (kernel, version):
        import torch

        from .patch import patch_qwen3_moe
        from .presets import make_model

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
    eager_ms, fused_ms = (1e3 * statistics.median(t[steady]) for t in (eager_s, fused_s))
    where = (f"{args.device}, {args.dtype}, batch {args.batch}x{args.seq}, median of {len(eager_s[steady])} steps "
             "after the first")
    if args.device.startswith("cuda"):
        print(f"time per step: HF eager experts {eager_ms:.1f} ms, patched {fused_ms:.1f} ms ({where})")
    else:
        print(f"time per step: HF eager experts {eager_ms:.1f} ms, patched {fused_ms:.1f} ms ({where}); on the CPU the "
              "kernel runs its pure-torch reference path, so this is no measure of its speed (benchmarks/ has GPU "
              "figures)")
    ok = worst <= tol
    print("check passed" if ok else "check FAILED: the patched model does not train like HF eager")
    return 0 if ok else 1


def _train_command(args) -> int:
    import os

    from . import train

    _check_device(args.device)
    impls = args.impl or ["fused"]
    liger = [impl for impl in impls if "liger" in impl]
    if liger and not args.device.startswith("cuda"):
        raise ValueError(f"--impl {liger[0]}: Liger-Kernel's kernels run on CUDA only: add --device cuda, or drop it")
    if args.layers is not None and args.model:
        raise ValueError("--layers sets a preset's depth; a --model checkpoint has its own: drop one of them")
    scale = "--fsdp" if args.fsdp else ("--ep" if args.ep else ("--zero3" if args.zero3 else None))
    if scale and "RANK" not in os.environ:
        raise ValueError(f"{scale} needs several processes: launch with torchrun --nproc_per_node N -m "
                         "qwen3_moe_patch.cli train ...")
    if args.memory_cap_gib:
        if not args.device.startswith("cuda"):
            raise ValueError("--memory-cap-gib caps CUDA memory: add --device cuda, or drop it")
        import torch

        device = torch.device(args.device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), index)
    rank = 0
    if scale:
        from .parallel import init_process_group

        rank, _ = init_process_group(args.device)
        if args.device.startswith("cuda"):
            import torch

            args.device = f"cuda:{torch.cuda.current_device()}"
    with contextlib.ExitStack() as stack:
        kernel = None
        if {"fused", "fused-liger"} & set(impls):
            kernel = stack.enter_context(_cli_kernel(args.project))[0]
        results = train.compare(
            impls, steps=args.steps, batch=args.batch, seq=args.seq, seed=args.seed, data=args.data,
            preset=args.preset, model_path=args.model, lora_r=args.lora_r,
            gradient_checkpointing=args.gradient_checkpointing, device=args.device, dtype=args.dtype, lr=args.lr,
            kernel=kernel, log_every=args.log_every if rank == 0 else 0,
            show_progress=not args.no_progress and sys.stderr.isatty(),
            fsdp=args.fsdp, ep=args.ep, zero3=args.zero3, qlora=args.qlora, piecewise=args.piecewise,
            lora_dtype=args.lora_dtype, optim=args.optim,
            config_overrides={"num_hidden_layers": args.layers} if args.layers is not None else None)
    engine = f", EP {args.ep} + FSDP2" if args.ep else (
        ", FSDP2" if args.fsdp else (", DeepSpeed ZeRO-3" if args.zero3 else ""))
    tuning = "".join([", 4-bit NF4 base (QLoRA)" if args.qlora else "",
                      f", LoRA in {args.lora_dtype}" if args.lora_r and args.lora_dtype != "float32" else "",
                      ", 8-bit AdamW" if args.optim == "adamw8bit" else "",
                      f", capped at {args.memory_cap_gib:g} GiB" if args.memory_cap_gib else ""])
    what = (f"{args.model or args.preset}, {'LoRA r' + str(args.lora_r) if args.lora_r else 'full fine-tune'}, "
            f"{args.batch}x{args.seq} tokens/step{' per rank' if engine else ''}, {args.steps} steps, {args.dtype} on "
            f"{args.device}{engine}{', gradient checkpointing' if args.gradient_checkpointing else ''}{tuning}")
    every = train.gather_ranks(results)
    ranks = train.per_rank_table(results, every)
    if scale:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"\n{what}\n" + train.table(results) + (f"\n\nper rank:\n{ranks}" if ranks else ""))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.json").write_text(json.dumps({
            "environment": train.environment(args.device),
            "setup": {**{k: v for k, v in vars(args).items() if k != "func"}, "description": what},
            "runs": [dataclasses.asdict(r) | {"tokens_per_second": r.tokens_per_second(), "final_loss": r.final_loss()}
                     for r in results],
            "ranks": [[dict(zip(("impl", "tokens_per_second", "peak_mib", "first_step_seconds"), run)) for run in rank]
                      for rank in every] if every else None,
            "flops_per_token": train.flops_per_token(train.build_config(args.preset, args.model, args.layers), args.seq),
        }, indent=1))
        if len(results) > 1:
            try:
                train.plot(results, out / "loss.png", what)
            except ImportError:
                print("matplotlib is not installed: no loss plot (pip install matplotlib)")
        print(f"wrote {out}/")
    return 0


def _convert(args) -> int:
    """A model checkpoint or, when SRC holds adapter_config.json, a PEFT LoRA adapter."""
    if not Path(args.src).is_dir():
        raise FileNotFoundError(f"{args.src} is not a folder: give a checkpoint folder (safetensors) or a PEFT adapter "
                                "folder (with adapter_config.json)")
    if (Path(args.src) / "adapter_config.json").exists():
        from .adapters import convert_adapter

        if args.max_shard_size or args.config_for:
            raise ValueError(f"{args.src} is a LoRA adapter; --max-shard-size and --config-for apply to model "
                             "checkpoints only: drop them")
        summary = convert_adapter(args.src, args.dst, to=args.to)
        ranks = ", ".join(f"{name}_proj r{p['rank']} alpha {p['alpha']}" for name, p in summary["projections"].items())
        print(f"{args.dst}: LoRA adapter {summary['from']} -> {summary['to']}, {summary['layers']} layers ({ranks})")
        return 0
    from .checkpoints import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size,
                                 config_for=args.config_for)
    print(f"{args.dst}: experts {summary['from']} -> {summary['to']}, {summary['input_shards']} -> "
          f"{summary['output_shards']} shards, {summary['bytes'] / 2**20:.1f} MiB of tensors "
          f"(shards of at most {summary['max_shard_bytes'] / 2**20:.1f} MiB)")
    return 0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (ValueError, RuntimeError, FileNotFoundError, FileExistsError, TypeError, ImportError)):
        return text
    return f"{type(err).__name__}: {text}"


class _HelpFormatter(argparse.HelpFormatter):
    """Help texts with their defaults, where there is one to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def main(argv=None) -> int:
    """Entry point: every failure is one line on stderr (what is wrong, what to do) and exit status 2;
    ``--debug`` shows the traceback instead."""
    from .train import IMPLS as train_impls
    from .train import OPTIMIZERS as train_optimizers

    formatter = _HelpFormatter
    parser = argparse.ArgumentParser(prog="qwen3-moe-fused", description=__doc__.splitlines()[0],
                                     formatter_class=formatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", formatter_class=formatter, help="build build/torch-<backend>/ as kernel-builder does, without Nix")
    build.add_argument("--project", default=".", help="kernel project root (holds build.toml)")
    build.add_argument("--out", help="output folder; default <project>/build")
    build.add_argument("--backend", action="append", help="backend to build (repeatable); default: all in build.toml")
    build.add_argument("--hub-cache", help="also install the build into this Hugging Face Hub cache folder")
    lock = sub.add_parser("lock", formatter_class=formatter, help="write the plugin's kernels.lock for the current kernel source")
    lock.add_argument("--project", default=".", help="kernel project root (holds build.toml)")
    lock.add_argument("--out", default=str(LOCKFILE), help=f"lock file to write; default {LOCKFILE}")
    check = sub.add_parser("check", formatter_class=formatter, help="build, load through get_kernel offline, patch a tiny model, train vs HF eager")
    project_help = ("kernel project root (holds build.toml) to build the kernel from; default: the checkout of an "
                    "editable install, else the installed kernel source (local Hub cache, then the Hub)")
    check.add_argument("--project", help=project_help)
    check.add_argument("--steps", type=int, default=5, help="training steps per model")
    check.add_argument("--batch", type=int, default=4, help="sequences per step")
    check.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    check.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    check.add_argument("--device", default="cpu", help="cpu or cuda")
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    tr = sub.add_parser("train", formatter_class=formatter, help="fine-tune a Qwen3-MoE on real text; several --impl compare loss and speed")
    tr.add_argument("--project", help=project_help)
    tr.add_argument("--preset", default="tiny", help="local config: tiny, 30b-a3b-4layers or 30b-a3b (full depth)")
    tr.add_argument("--model", help="path of a Qwen3-MoE checkpoint instead of a preset")
    tr.add_argument("--impl", action="append", choices=train_impls,
                    help="experts implementation (repeatable, run in order; fused-liger = fused with "
                         "patch_qwen3_moe(liger=True)); default fused")
    tr.add_argument("--lora-r", type=int, default=0, help="LoRA rank on attention and experts; 0 = full fine-tune")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer's activations in backward")
    tr.add_argument("--data", help="text file to train on; default: the Python standard library's sources")
    tr.add_argument("--steps", type=int, default=50, help="optimizer steps per implementation")
    tr.add_argument("--batch", type=int, default=4, help="sequences per step (per rank under torchrun)")
    tr.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    tr.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    tr.add_argument("--device", default="cpu", help="cpu or cuda")
    tr.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    tr.add_argument("--log-every", type=int, default=10, help="one summary line every N steps (0: none)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar (none either when stderr is not a terminal)")
    tr.add_argument("--out", help="folder for train.json and, with several --impl, loss.png")
    scale = tr.add_mutually_exclusive_group()
    scale.add_argument("--fsdp", action="store_true", help="FSDP2 per decoder layer (launch with torchrun)")
    scale.add_argument("--ep", type=int, default=0, metavar="N",
                       help="transformers expert parallelism over N ranks, FSDP over all (launch with torchrun)")
    scale.add_argument("--zero3", action="store_true", help="DeepSpeed ZeRO-3 (launch with torchrun)")
    tr.add_argument("--layers", type=_positive, help="decoder layers of the preset (default: the preset's)")
    tr.add_argument("--qlora", action="store_true",
                    help="QLoRA: decoder layers in 4-bit NF4 (experts read by the fused kernels, linear layers as "
                         "bitsandbytes Linear4bit), built layer by layer; needs --lora-r and bitsandbytes")
    tr.add_argument("--piecewise", action="store_true",
                    help="build the dense preset layer by layer on the device (the weights --qlora quantizes)")
    tr.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="adapters' dtype (PEFT's default float32; bfloat16 halves their memory)")
    tr.add_argument("--optim", default="adamw", choices=train_optimizers,
                    help="adamw: torch's (fused on CUDA); adamw8bit: bitsandbytes' 8-bit AdamW")
    tr.add_argument("--memory-cap-gib", type=float, default=0,
                    help="cap this process's CUDA memory (torch.cuda.set_per_process_memory_fraction), e.g. 22")
    conv = sub.add_parser("convert", formatter_class=formatter, help="experts' checkpoint or LoRA adapter: per-expert <-> stacked, losslessly")
    conv.add_argument("src", help="checkpoint folder (safetensors) or PEFT adapter folder")
    conv.add_argument("dst", help="output folder (new or without weights)")
    conv.add_argument("--to", required=True, choices=["stacked", "per-expert"],
                      help="per-expert: transformers 4.x/5.x on-disk keys and per-expert LoRA; stacked: 5.x parameters "
                           "(gate_up_proj/down_proj) and PEFT target_parameters LoRA")
    conv.add_argument("--max-shard-size", help="model output shard size, e.g. 5GB; default: the largest input shard")
    conv.add_argument("--config-for", choices=["transformers4"],
                      help="also write num_experts and rope_theta into config.json so transformers 4.x reads it")
    args = parser.parse_args(argv)
    commands = {"build": _build, "lock": _lock, "check": _check, "train": _train_command, "convert": _convert}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"qwen3-moe-fused {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"qwen3-moe-fused {args.command}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
