"""Distributed setups people train Qwen3-MoE with, for the ``train`` CLI and the tests: the torchrun process
group, FSDP2 per decoder layer (optionally the experts as their own unit), transformers' TP / EP plans
(``DistributedConfig``) and DeepSpeed ZeRO-3. Each is the engine's own API; ``patch_qwen3_moe`` is applied on the
result as on a single-GPU model (before or after wrapping).
"""

import dataclasses
import os

__all__ = ["Setup", "SETUPS", "deepspeed_zero3", "distributed_config", "fsdp2", "init_process_group",
           "shares_batch"]


@dataclasses.dataclass(frozen=True)
class Setup:
    """One distributed setup: how the model is loaded (``distributed_config`` kwargs for ``from_pretrained``) and
    wrapped (``wrap``: None, "ddp", "fsdp2", "zero3"), and the FSDP2 options."""

    load: dict | None = None
    wrap: str | None = None
    experts_unit: bool = False  # FSDP2: the experts module and the MoE block are units of their own in the layer
    reshard: bool = True  # FSDP2 reshard_after_forward
    mixed_precision: str | None = None  # FSDP2 param dtype ("float16", "bfloat16"); gradients reduced in float32
    checkpointing: bool = False  # transformers' gradient checkpointing (activation recomputation per layer)


SETUPS = {
    "ddp": Setup(wrap="ddp"),
    "fsdp2": Setup(wrap="fsdp2"),
    "fsdp2-no-reshard": Setup(wrap="fsdp2", reshard=False),
    "fsdp2-experts-unit": Setup(wrap="fsdp2", experts_unit=True),
    "fsdp2-fp16": Setup(wrap="fsdp2", mixed_precision="float16"),
    "fsdp2-checkpointing": Setup(wrap="fsdp2", checkpointing=True),
    "tp": Setup(load=dict(tp_size=2)),
    "ep-all-to-all": Setup(load=dict(tp_size=2, ep_size=2, ep_implementation="all_to_all")),
    "ep-all-reduce": Setup(load=dict(tp_size=2, ep_size=2, ep_implementation="all_reduce")),
    "ep-fsdp": Setup(load=dict(fsdp_size=2, ep_size=2)),
    "zero3": Setup(wrap="zero3"),
}


def init_process_group(device: str = "cpu"):
    """(rank, world size) of the process group torchrun describes (gloo on CPU, NCCL on CUDA)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def distributed_config(tp_size=None, ep_size=None, fsdp_size=None, ep_implementation="auto"):
    """transformers' ``DistributedConfig`` for these sizes, on the installed transformers: 5.21+ takes ``ep_size``
    and ``ep_implementation``; 5.17–5.20 have one EP flavour, ``enable_expert_parallel`` (EP over the TP group,
    routes to other ranks masked and the outputs all-reduced), and refuse the rest clearly."""
    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if not ep_size or "ep_size" in fields:
        extra = dict(ep_size=ep_size, ep_implementation=ep_implementation) if ep_size else {}
        return DistributedConfig(tp_size=tp_size, fsdp_size=fsdp_size, **extra)
    import transformers

    if fsdp_size or ep_implementation == "all_to_all" or (tp_size and tp_size != ep_size):
        raise ValueError(
            f"transformers {transformers.__version__} has one expert-parallel mode (ep_size == tp_size, no FSDP, "
            "routes masked and outputs all-reduced); all-to-all dispatch and EP with FSDP need transformers >= 5.21"
        )
    return DistributedConfig(tp_size=ep_size, enable_expert_parallel=True, tp_plan={})


def shares_batch(setup: Setup) -> bool:
    """Whether every rank trains on the same batch (transformers TP, and EP over the TP group)."""
    load = setup.load or {}
    return bool(load.get("tp_size", 1) > 1 and not load.get("fsdp_size"))


def _decoder_layers(model):
    """The decoder layers (the classes in the PreTrainedModel's ``_no_split_modules``) under ``model``."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names or type(m).__name__.removeprefix("FSDP") in names]


def fsdp2(model, *, experts_unit=False, reshard=True, mixed_precision=None):
    """FSDP2 ``fully_shard`` on each decoder layer (first on its experts module and its MoE block when
    ``experts_unit``, as transformers does under EP), then on the root; ``mixed_precision`` is the compute dtype of
    the parameters (gradients reduced in float32)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = dict(reshard_after_forward=reshard)
    if mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, mixed_precision),
                                                    reduce_dtype=torch.float32)
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers to shard (no _no_split_modules)")
    for layer in layers:
        if experts_unit:
            fully_shard(layer.mlp.experts, **options)
            fully_shard(layer.mlp, **options)  # the block's class becomes FSDPQwen3MoeSparseMoeBlock
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def deepspeed_zero3(model, optimizer, *, device="cpu"):
    """(engine, optimizer) of DeepSpeed ZeRO-3 around ``model`` with ``optimizer``; on CPU through DeepSpeed's CPU
    accelerator (install with ``DS_BUILD_OPS=0``). A bfloat16 model trains in DeepSpeed's bf16 mode (its optimizer
    keeps float32 master weights)."""
    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    world = int(os.environ.get("WORLD_SIZE", 1))
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}
    import torch

    if next(model.parameters()).dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer
