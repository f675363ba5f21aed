"""Fine-tune a Qwen3-MoE on real text with one experts implementation or several side by side.

Each implementation starts from the same weights (``seed``) and sees the same batches, so the loss curves are
comparable step by step. The loop is a plain one (AdamW, no scheduler, no gradient accumulation) rather than
transformers' Trainer, so the timed region is exactly forward + backward + optimizer step; the plugin works
the same under Trainer (README, "Fine-tune").

Data: bytes of a text file, or by default the Python standard library's own source files (real text that
every machine has offline), as byte-level tokens (vocab 256, no tokenizer download); or, for a checkpoint with
a tokenizer, its tokens. Batches are random windows drawn with ``seed``.

Implementations: "fused" (this project's kernel through ``patch_qwen3_moe``), "fused-liger" (the same with
``liger=True``: Liger-Kernel's RMSNorm, RoPE and fused linear cross-entropy around our experts), transformers'
"grouped_mm" and "eager" experts, and "liger" (Liger-Kernel's ``fused_moe`` registered as a transformers experts
function).
"""

import dataclasses
import math
import sys
import sysconfig
import time
from pathlib import Path

IMPLS = ("fused", "grouped_mm", "eager", "liger", "fused-liger")
LIGER_NAME = "liger_fused_moe"


def stdlib_corpus(max_bytes: int = 16 << 20) -> bytes:
    """The standard library's .py files in sorted order, concatenated up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources under {root}; pass --data FILE")
    return b"".join(chunks)[:max_bytes]


def token_stream(data_path=None, tokenizer=None):
    """1-D int64 tensor of tokens: bytes (vocab 256) or the tokenizer's ids."""
    import torch

    raw = Path(data_path).read_bytes() if data_path else stdlib_corpus()
    if tokenizer is not None:
        return torch.tensor(tokenizer(raw.decode("utf-8", errors="replace"))["input_ids"], dtype=torch.long)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def make_batches(tokens, steps: int, batch: int, seq: int, seed: int):
    """``steps`` batches [batch, seq] of random windows of ``tokens`` (same windows for the same seed)."""
    import torch

    if tokens.numel() <= seq:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of {seq}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq, (steps, batch), generator=gen)
    return [torch.stack([tokens[s:s + seq] for s in row.tolist()]) for row in starts]


def register_liger():
    """Liger-Kernel's fused_moe as transformers experts implementation "liger_fused_moe"."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except ImportError as err:
        raise ImportError(f"--impl liger needs liger-kernel ({err}): pip install liger-kernel==0.8.5 (the tested "
                          "version)") from err
    from transformers.integrations.moe import ExpertsInterface

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return LigerFusedMoEFunction.apply(hidden_states, self.gate_up_proj, self.down_proj, top_k_index.int(),
                                           top_k_weights.to(hidden_states.dtype))

    ExpertsInterface.register(LIGER_NAME, forward)
    return LIGER_NAME


@dataclasses.dataclass
class RunResult:
    impl: str
    losses: list  # training loss per step (language model + router aux loss × its coefficient)
    step_seconds: list
    tokens_per_step: int
    peak_mib: float  # peak CUDA memory allocated over the run (0 on CPU)
    memory_mib: dict | None = None  # what the resident tensors are, after the first step (``memory_breakdown``)

    def tokens_per_second(self, skip: int = 2) -> float:
        """Steady-state throughput: the first ``skip`` steps (compilation, autotuning) are left out."""
        timed = self.step_seconds[skip:] if len(self.step_seconds) > skip else self.step_seconds
        return self.tokens_per_step * len(timed) / sum(timed)

    def final_loss(self, last: int = 10) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def _distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def preset_checkpoint(preset, seed, config_overrides, dtype):
    """A checkpoint of the preset's model (rank 0 writes it once into the temp folder; the others wait), for
    loaders that take a path: transformers' expert parallelism is applied by ``from_pretrained``."""
    import hashlib
    import tempfile

    import torch
    import torch.distributed as dist

    from .presets import make_model

    key = hashlib.sha1(repr((preset, seed, sorted((config_overrides or {}).items()), dtype)).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"qwen3-moe-fused-{preset}-{key}"
    if (not _distributed() or dist.get_rank() == 0) and not (path / "config.json").exists():
        model = make_model(preset, seed=seed, **(config_overrides or {})).to(getattr(torch, dtype))
        model.save_pretrained(path)
    if _distributed():
        dist.barrier()
    return path


def qlora_config(dtype="bfloat16"):
    """QLoRA's quantization (NF4, nested scales; compute in the model's dtype) as a transformers BitsAndBytesConfig."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, dtype))


def build_model(impl, *, preset="tiny", model_path=None, lora_r=0, gradient_checkpointing=False, device="cpu",
                dtype="float32", seed=0, kernel=None, config_overrides=None, fsdp=False, ep=0, qlora=False,
                piecewise=False, lora_dtype="float32"):
    """The model for one run: same initial weights for the same seed, whatever the implementation.
    ``config_overrides`` change the preset's config (e.g. num_hidden_layers). Under torchrun: ``fsdp`` wraps each
    decoder layer and the root in FSDP2; ``ep`` loads with transformers' expert parallelism over ``ep`` ranks and
    FSDP over all of them (``DistributedConfig(fsdp_size=world, ep_size=ep)``). ``qlora``: the decoder layers in
    4-bit (``qlora_config``; experts as ``Tensor4bit``, linear layers as bitsandbytes Linear4bit), built layer by
    layer on the device (``presets.make_model_piecewise``; a ``model_path`` checkpoint is loaded on the CPU and
    quantized weight by weight onto the device); ``piecewise`` builds the dense preset the same way (the same
    weights as the 4-bit run before quantization). ``lora_dtype``: the adapters' dtype (PEFT's default: float32)."""
    import torch

    from .presets import make_model

    experts_impl = {"fused": "grouped_mm", "fused-liger": "grouped_mm", "grouped_mm": "grouped_mm",
                    "eager": "eager"}.get(impl)
    if impl == "liger":
        experts_impl = register_liger()
    if experts_impl is None:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if (fsdp or ep) and not _distributed():
        raise ValueError("--fsdp and --ep need several processes: launch with torchrun --nproc_per_node N")
    if qlora and not lora_r:
        raise ValueError("--qlora trains LoRA adapters on the 4-bit model: give --lora-r (e.g. 16)")
    if (qlora or piecewise) and (fsdp or ep):
        raise ValueError(f"--{'qlora' if qlora else 'piecewise'} builds the model on one GPU: drop --fsdp / --ep")
    if piecewise and model_path:
        raise ValueError("--piecewise builds a preset; a --model checkpoint is loaded as it is: drop one of them")
    if ep and not model_path:
        model_path = preset_checkpoint(preset, seed, config_overrides, dtype)
    if (qlora or piecewise) and not model_path:
        from .presets import make_model_piecewise

        model = make_model_piecewise(preset, seed=seed, device=device, dtype=dtype,
                                     quantization_config=qlora_config(dtype) if qlora else None,
                                     experts_implementation=experts_impl, **(config_overrides or {}))
    elif model_path:
        from transformers import AutoModelForCausalLM

        load = dict(dtype=getattr(torch, dtype), experts_implementation=experts_impl)
        if ep:
            import torch.distributed as dist

            from .parallel import distributed_config

            load["distributed_config"] = distributed_config(fsdp_size=dist.get_world_size(), ep_size=ep)
        model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        if qlora:
            from .quantize import quantize_4bit

            quantize_4bit(model, qlora_config(dtype), device=device)
    else:
        with torch.device(device):  # initialise on the device: seconds instead of minutes for billions of weights
            model = make_model(preset, seed=seed, experts_implementation=experts_impl, **(config_overrides or {}))
    model.config.use_cache = False
    if not ep and not qlora:
        model = model.to(device, getattr(torch, dtype))
    elif qlora:
        model = model.to(device)  # the 4-bit weights keep their storage; dense ones are already in dtype
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)  # LoRA A initialisation
        config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, config, autocast_adapter_dtype=lora_dtype == "float32")
        if gradient_checkpointing:
            model.enable_input_require_grads()
    if fsdp and not ep:
        from .parallel import fsdp2

        model = fsdp2(model)
    if impl in ("fused", "fused-liger"):
        from .patch import patch_qwen3_moe

        patch_qwen3_moe(model, kernel=kernel, liger=impl == "fused-liger")
    return model


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(model, *, lr=1e-4, device="cpu", optim="adamw"):
    """AdamW over the trainable parameters: torch's, fused on CUDA as transformers' Trainer does by default
    (``optim="adamw_torch_fused"``), or bitsandbytes' 8-bit AdamW (``adamw8bit``, Trainer's ``adamw_bnb_8bit``:
    QLoRA's memory-lean choice)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw8bit":
        from .quantize import bitsandbytes_module

        return bitsandbytes_module().optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if optim != "adamw":
        raise ValueError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=torch.device(device).type == "cuda")


def memory_breakdown(model, optimizer) -> dict:
    """MiB held by: 4-bit experts weights (their storage and scales), bitsandbytes 4-bit linear weights, other
    frozen weights, trainable parameters, their gradients (where still held: train_run measures them before the
    optimizer step frees them), the optimizer's states (each tensor counted once)."""
    import torch

    seen, sizes = set(), dict.fromkeys(("experts 4-bit", "linear 4-bit", "frozen dense", "trainable", "gradients",
                                        "optimizer"), 0)

    def nbytes(t):
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        if hasattr(t, "weight4bit"):  # Tensor4bit: its storage
            return sum(x.numel() * x.element_size() for x in t.weight4bit if isinstance(x, torch.Tensor))
        size = t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit
        if state is not None:
            size += sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if x is not None)
            if getattr(state, "state2", None) is not None:
                size += sum(x.numel() * x.element_size() for x in (state.state2.absmax, state.state2.code))
        return size

    for p in model.parameters():
        kind = ("experts 4-bit" if hasattr(p, "weight4bit") else "linear 4-bit" if hasattr(p, "quant_state")
                else "trainable" if p.requires_grad else "frozen dense")
        sizes[kind] += nbytes(p)
        sizes["gradients"] += nbytes(p.grad)
    for state in optimizer.state.values():
        sizes["optimizer"] += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return {k: round(v / 2**20, 3) for k, v in sizes.items()}


def train_run(model, batches, *, impl, lr=1e-4, device="cpu", progress=None, log_every=0, log=print,
              zero3=False, optim="adamw") -> RunResult:
    """Train ``model`` on ``batches`` (AdamW; with ``zero3`` inside a DeepSpeed ZeRO-3 engine); the loss and the
    wall time of every step."""
    import torch

    cuda = torch.device(device).type == "cuda"
    optimizer = make_optimizer(model, lr=lr, device=device, optim=optim)
    if zero3:
        from .parallel import deepspeed_zero3

        model, optimizer = deepspeed_zero3(model, optimizer, device=device)
        backward, optimizer_step = model.backward, model.step  # the engine steps and zeroes the gradients itself
    else:
        def backward(loss):
            loss.backward()

        def optimizer_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, seconds, memory = [], [], None
    for step, input_ids in enumerate(batches):
        input_ids = input_ids.to(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, labels=input_ids)  # loss includes the router's aux loss (× its coef)
        backward(out.loss)
        if step == 0 and not zero3:
            grad_mib = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                           if p.grad is not None) / 2**20
        optimizer_step()
        lm_loss = out.loss.item()  # synchronises
        seconds.append(time.perf_counter() - start)
        losses.append(lm_loss)
        if step == 0 and not zero3 and not _distributed():  # (sharded parameters would count whole)
            memory = dict(memory_breakdown(model, optimizer), gradients=round(grad_mib, 3))
        if not math.isfinite(lm_loss):
            raise FloatingPointError(f"{impl}: loss is {lm_loss} at step {step}")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{lm_loss:.4f}")
        if log_every and (step + 1) % log_every == 0:
            log(f"{impl} step {step + 1}/{len(batches)}: loss {lm_loss:.4f}, {1e3 * seconds[-1]:.0f} ms/step")
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    return RunResult(impl, losses, seconds, batches[0].numel() if batches else 0, peak, memory)


def compare(impls, *, steps, batch, seq, seed=0, data=None, preset="tiny", model_path=None, lora_r=0,
            gradient_checkpointing=False, device="cpu", dtype="float32", lr=1e-4, kernel=None, log_every=0,
            show_progress=True, log=print, config_overrides=None, fsdp=False, ep=0, zero3=False, qlora=False,
            piecewise=False, lora_dtype="float32", optim="adamw"):
    """One run per implementation on the same batches from the same weights; list of RunResult. Under torchrun
    each rank draws its own batches (seed + rank) and the results are this rank's."""
    import torch

    tokenizer = None
    if model_path and (Path(model_path) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    rank = 0
    if _distributed():
        import torch.distributed as dist

        rank = dist.get_rank()
    if zero3 and (qlora or piecewise):
        raise ValueError(f"--{'qlora' if qlora else 'piecewise'} builds the model on one GPU: drop --zero3")
    batches = make_batches(token_stream(data, tokenizer), steps, batch, seq, seed + rank)
    results = []
    for impl in impls:
        model = build_model(impl, preset=preset, model_path=model_path, lora_r=lora_r,
                            gradient_checkpointing=gradient_checkpointing, device=device, dtype=dtype, seed=seed,
                            kernel=kernel, config_overrides=config_overrides, fsdp=fsdp, ep=ep, qlora=qlora,
                            piecewise=piecewise, lora_dtype=lora_dtype)
        if model.config.vocab_size < 256 and tokenizer is None:
            raise ValueError(f"byte-level data needs vocab_size ≥ 256, the model has {model.config.vocab_size}")
        progress = None
        if show_progress and rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=steps, desc=impl, file=sys.stderr, leave=False)
        try:
            results.append(train_run(model, batches, impl=impl, lr=lr, device=device, progress=progress,
                                     log_every=log_every, log=log, zero3=zero3, optim=optim))
        finally:
            if progress is not None:
                progress.close()
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return results


def _commit() -> str:
    """The code measured: $QWEN3_MOE_FUSED_COMMIT (set where the checkout travels without .git, as to the GPU
    machine), else the checkout's short commit id, "-dirty" with uncommitted changes; "unknown" outside one."""
    import os
    import subprocess

    if os.environ.get("QWEN3_MOE_FUSED_COMMIT"):
        return os.environ["QWEN3_MOE_FUSED_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device="cpu") -> dict:
    """Date, versions and device of a run, for its results file."""
    import datetime
    import platform

    import torch
    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("triton", "peft", "liger_kernel"):
        try:
            env[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    if torch.device(device).type == "cuda":
        import subprocess

        env["device"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
    return env


def build_config(preset="tiny", model_path=None, layers=None):
    """The config a run trains: the checkpoint's, or the preset's (with ``layers`` decoder layers if given)."""
    if model_path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path)
    from .presets import make_config

    return make_config(preset, **({"num_hidden_layers": layers} if layers is not None else {}))


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token of a Qwen3-MoE config: 6 × the matrix parameters a token goes through (attention
    projections, router, its top-k experts, the LM head) plus 12 × layers × attention width × sequence length for
    the attention scores and their use (forward and backward, no causal discount)."""
    H, L = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = H * q * 2 + H * kv * 2  # q and o, k and v
    experts = config.num_experts_per_tok * 3 * H * config.moe_intermediate_size
    per_layer = attention + H * config.num_experts + experts
    return 6 * (L * per_layer + H * config.vocab_size) + 12 * L * q * seq


def window_means(losses, window: int = 20) -> list:
    """Means of consecutive ``window``-step blocks of a loss curve (a trailing partial block is left out): the
    curves of two bfloat16 runs differ step by step by rounding noise; their block means show any drift."""
    return [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1, window)]


def gather_ranks(results) -> list | None:
    """Per rank, per implementation: (impl, tokens/s, peak MiB, first step s); None outside torchrun. All ranks
    must call it (it gathers)."""
    if not _distributed():
        return None
    import torch.distributed as dist

    mine = [(r.impl, r.tokens_per_second(), r.peak_mib, r.step_seconds[0] if r.step_seconds else 0.0)
            for r in results]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def per_rank_table(results, every) -> str | None:
    """Markdown: tokens/s and peak memory of every rank (``gather_ranks``) for each implementation."""
    if every is None:
        return None
    lines = ["| impl | rank | tokens/s | peak MiB |", "|---|---|---|---|"]
    for i, r in enumerate(results):
        lines += [f"| {r.impl} | {rank} | {ranks[i][1]:.0f} | {ranks[i][2]:.0f} |" for rank, ranks in enumerate(every)]
        total = sum(ranks[i][1] for ranks in every)
        lines.append(f"| {r.impl} | all | {total:.0f} | max {max(ranks[i][2] for ranks in every):.0f} |")
    return "\n".join(lines)


def table(results, baseline="grouped_mm") -> str:
    """Markdown: tokens/s (and ÷ the baseline's), peak memory, final loss (mean of the last 10 steps)."""
    base = next((r for r in results if r.impl == baseline), None)
    lines = ["| impl | tokens/s | × " + baseline + " | peak MiB | mean loss, last 10 steps | max abs loss diff vs "
             + baseline + " |", "|---|---|---|---|---|---|"]
    for r in results:
        speed = f"{r.tokens_per_second() / base.tokens_per_second():.2f}" if base else "–"
        diff = f"{max(abs(a - b) for a, b in zip(r.losses, base.losses)):.2e}" if base else "–"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib else "n/a (CPU)"
        lines.append(f"| {r.impl} | {r.tokens_per_second():.0f} | {speed} | {peak} | {r.final_loss():.4f} | {diff} |")
    return "\n".join(lines)


def plot(results, path, title=""):
    """Loss curves (distinct line styles, so equal curves stay visible) and, below, each curve minus the
    first's, step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, diff) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    styles = ("-", "--", ":", "-.")
    base = results[0]
    for i, r in enumerate(results):
        steps = range(1, len(r.losses) + 1)
        ax.plot(steps, r.losses, styles[i % len(styles)], label=r.impl, linewidth=1.5 if i else 2.5, alpha=0.9)
        if i:
            diff.plot(steps, [a - b for a, b in zip(r.losses, base.losses)], styles[i % len(styles)],
                      label=f"{r.impl} − {base.impl}", linewidth=1)
    ax.set(ylabel="loss", title=title)
    ax.legend()
    diff.axhline(0, color="grey", linewidth=0.5)
    diff.set(xlabel="step", ylabel=f"loss − {base.impl}")
    diff.legend()
    diff.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


__all__ = ["IMPLS", "RunResult", "build_config", "build_model", "compare", "environment", "flops_per_token", "gather_ranks",
           "make_batches", "make_optimizer", "per_rank_table", "plot", "preset_checkpoint", "stdlib_corpus", "table",
           "token_stream", "train_run", "window_means"]
