"""One rank of the 2-rank distributed tests (run by torchrun, see test_distributed.py).

For each requested setup (``qwen3_moe_patch.parallel.SETUPS``): load the tiny checkpoint, apply the engine,
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
            model, optimizer = build(args.ckpt, parallel.SETUPS[name], args.impl, args.lora, args.kernel, args.dtype)
            calls = count_fused_calls()
            result["losses"] = train(model, optimizer, parallel.SETUPS[name], rank)
            result["fused_calls"] = calls[0]
        except Exception as err:  # reported by the test, which fails on it
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc()
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
