"""One rank of the 2-rank distributed tests (run by torchrun, see test_distributed.py).

For each requested setup (``qwen3_moe_patch.parallel.SETUPS``; or a named check of ``CHECKS``): load the tiny checkpoint, apply the engine,
optionally PEFT LoRA on experts and attention, make the experts one implementation — "patched"
(``patch_qwen3_moe``), "stock" (transformers' grouped_mm) or "experts_impl" (``experts_implementation=
"qwen3_moe_fused"`` without the patch) — train a few AdamW steps and write this rank's losses to
``OUT/<setup>.rank<r>.json`` (or the error). Data: ``batch(step, r)``, rank r's micro-batch; setups where every
rank holds the same batch use ``batch(step, 0)`` on all ranks.
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

STEPS, LR, SEQ, ROWS = 3, 1e-3, 12, 2
LORA_TARGETS = dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], target_modules=["q_proj"])


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (ROWS, SEQ), generator=torch.Generator().manual_seed(1000 * step + rank))


def lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **LORA_TARGETS))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero: give every factor values, the same on every rank
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)
    return model


def count_fused_calls():
    """A counter of the calls of transformers' experts implementation "qwen3_moe_fused" in this process."""
    from transformers.integrations.moe import ExpertsInterface

    import qwen3_moe_patch

    qwen3_moe_patch.register_experts_implementation()
    fused = ExpertsInterface._global_mapping["qwen3_moe_fused"]
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fused(*args, **kwargs)

    ExpertsInterface.register("qwen3_moe_fused", counted)
    return calls


def build(ckpt, setup, impl, use_lora, kernel_dir, dtype):
    from transformers import AutoModelForCausalLM

    from qwen3_moe_patch import patch_qwen3_moe
    from qwen3_moe_patch import parallel

    experts = "qwen3_moe_fused" if impl == "experts_impl" else "grouped_mm"
    load = dict(dtype=getattr(torch, dtype), attn_implementation="eager", experts_implementation=experts)
    if setup.load:
        load["distributed_config"] = parallel.distributed_config(**setup.load)
    model = AutoModelForCausalLM.from_pretrained(ckpt, **load)
    model.config.use_cache = False
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if use_lora:
        model = lora(model)
    optimizer = None
    if setup.wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif setup.wrap == "fsdp2":
        model = parallel.fsdp2(model, experts_unit=setup.experts_unit, reshard=setup.reshard,
                               mixed_precision=setup.mixed_precision)
    if impl == "patched":  # after the engine wrapped the model: blocks are found by class hierarchy
        patch_qwen3_moe(model, local_path=kernel_dir)
    elif impl == "experts_impl":
        import qwen3_moe_patch

        qwen3_moe_patch.register_experts_implementation(local_path=kernel_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    if setup.wrap == "zero3":
        model, optimizer = parallel.deepspeed_zero3(model, optimizer)
    return model, optimizer


def single_process(ckpt, setup, dtype, use_lora, kernel_dir=None, world=2):
    """Losses [step][rank] of one process (no engine) on the data the ranks see: the shared batch, or gradient
    accumulation over the ranks' micro-batches (what data parallelism computes). Patched with the kernel in
    ``kernel_dir`` when given (so the same kernel path runs as in the ranks), else stock grouped_mm."""
    from transformers import AutoModelForCausalLM

    from qwen3_moe_patch import parallel, patch_qwen3_moe

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype), attn_implementation="eager",
                                                 experts_implementation="grouped_mm")
    if use_lora:
        model = lora(model)
    if kernel_dir is not None:
        patch_qwen3_moe(model, local_path=kernel_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    shared = parallel.shares_batch(setup)
    losses = []
    for step in range(STEPS):
        row = []
        for rank in range(1 if shared else world):
            ids = batch(step, rank)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / (1 if shared else world)).backward()
            row.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(row * world if shared else row)
    return losses


def train(model, optimizer, setup, rank):
    from qwen3_moe_patch import parallel

    source = 0 if parallel.shares_batch(setup) else rank
    zero3 = setup.wrap == "zero3"
    losses = []
    for step in range(STEPS):
        ids = batch(step, source)
        loss = model(input_ids=ids, labels=ids).loss
        if zero3:
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))
    return losses


def check_naive_localisation(ckpt, kernel_dir):
    """Under EP, the experts' weights are expert-sharded DTensors: handing them to ``moe_experts`` with the
    router's global ids (what the block did before it called ``self.experts``) must be refused, not computed; a
    replicated DTensor is computed on locally and equals the plain tensor's result."""
    import kernels
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from transformers import AutoModelForCausalLM

    from qwen3_moe_patch import parallel

    kernel = kernels.get_local_kernel(Path(kernel_dir))
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, distributed_config=parallel.distributed_config(**parallel.SETUPS["ep-all-reduce"].load))
    block = model.model.layers[0].mlp
    assert isinstance(block.experts.gate_up_proj, DTensor), type(block.experts.gate_up_proj)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, weights, index = block.gate(hidden)
    try:
        kernel.moe_experts(hidden, index, weights, block.experts.gate_up_proj, block.experts.down_proj)
    except ValueError as err:
        refused = str(err)
    else:
        raise AssertionError("moe_experts computed on expert-sharded weights")
    mesh = block.experts.gate_up_proj.device_mesh
    gen = torch.Generator().manual_seed(1)  # the same on every rank (distribute_tensor sends rank 0's)
    w1, w2, x = torch.randn(8, 64, 64, generator=gen), torch.randn(8, 64, 32, generator=gen), torch.randn(5, 64, generator=gen)
    idx, w = torch.randint(0, 8, (5, 2), generator=gen), torch.rand(5, 2, generator=gen)
    plain = kernel.moe_experts(x, idx, w, w1, w2)
    replicated = kernel.moe_experts(x, idx, w, *(distribute_tensor(t, mesh, [Replicate()]) for t in (w1, w2)))
    assert not isinstance(replicated, DTensor) and torch.equal(plain, replicated)
    return {"refused": refused}


def check_tp_layout(ckpt):
    """transformers TP shards gate_up_proj [E, 2I, H] with a strided shard: each rank must hold [its gate rows;
    its up rows], the layout the kernel reads (gate rows first)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qwen3_moe_patch import parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, distributed_config=parallel.distributed_config(**parallel.SETUPS["tp"].load))
    full = load_file(Path(ckpt) / "model.safetensors")
    local = model.model.layers[1].mlp.experts.gate_up_proj.to_local()
    E, I = model.config.num_experts, model.config.moe_intermediate_size
    gate = torch.stack([full[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(E)])
    up = torch.stack([full[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(E)])
    part = slice(rank * I // world, (rank + 1) * I // world)
    assert torch.equal(local, torch.cat([gate[:, part], up[:, part]], dim=1)), "TP gate_up shard is not [gate; up]"
    down = model.model.layers[1].mlp.experts.down_proj.to_local()
    assert torch.equal(down, torch.stack([full[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]
                                          for e in range(E)])[:, :, part])
    return {"local_shape": list(local.shape)}


CHECKS = {"naive-localisation": lambda args: check_naive_localisation(args.ckpt, args.kernel),
          "tp-layout": lambda args: check_tp_layout(args.ckpt)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--kernel", required=True, help="kernel build folder (patch_qwen3_moe local_path)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--impl", default="patched", choices=["patched", "stock", "experts_impl"])
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("setups", nargs="+")
    args = parser.parse_args()

    from qwen3_moe_patch import parallel

    rank, _ = parallel.init_process_group()
    out = Path(args.out)
    for name in args.setups:
        result = {}
        try:
            if name in CHECKS:
                result.update(CHECKS[name](args))
            else:
                model, optimizer = build(args.ckpt, parallel.SETUPS[name], args.impl, args.lora, args.kernel,
                                         args.dtype)
                calls = count_fused_calls()
                result["losses"] = train(model, optimizer, parallel.SETUPS[name], rank)
                result["fused_calls"] = calls[0]
                if rank == 0 and args.impl == "patched":
                    result["single_process"] = single_process(args.ckpt, parallel.SETUPS[name], args.dtype, args.lora,
                                                              args.kernel)
        except Exception as err:  # reported by the test, which fails on it
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc()
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
