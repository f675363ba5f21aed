"""Public functional API: validates inputs, then runs the experts on the best path for the tensors' device.

CUDA tensors (and any tensors under ``TRITON_INTERPRET=1``, except bfloat16 ones, whose dots Triton 3.6's
interpreter computes wrongly) go through the Triton kernels (``ops``); other tensors through the pure-torch
``reference``, which says so once. Distributed tensors: replicated DTensors are
computed on locally; sharded ones are refused (``_localize``), since their expert ids and weights could not match.
"""

import logging

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

from . import ops, reference, weights4bit
from .reference import ExpertsLora
from .weights4bit import Weight4bit

_logger = logging.getLogger(__name__)
_said_reference = False
_said_4bit_compile = False

__all__ = ["ExpertsLora", "Weight4bit", "dequantize_4bit", "moe_experts", "tune"]


def _check_lora(lora, gate_up_proj, down_proj):
    E, two_i, H = gate_up_proj.shape
    for name, a, b, w in (("gate_up", lora.gate_up_a, lora.gate_up_b, gate_up_proj),
                          ("down", lora.down_a, lora.down_b, down_proj)):
        if (a is None) != (b is None):
            raise ValueError(f"lora.{name}_a and lora.{name}_b must be given together")
        if a is None:
            continue
        out_dim, in_dim = w.shape[1:]
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != E or b.shape[0] != E or a.shape[2] != in_dim \
                or b.shape[1] != out_dim or a.shape[1] != b.shape[2]:
            raise ValueError(
                f"lora.{name}_a must be [E, r, {in_dim}] and lora.{name}_b [E, {out_dim}, r] with E = {E}, got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.dtype != w.dtype or b.dtype != w.dtype or a.device != w.device or b.device != w.device:
            raise TypeError(f"lora.{name} factors must have the weights' dtype {w.dtype} and device {w.device}")


def _localize(name, t):
    """``t`` itself, or the local tensor of a replicated DTensor; a sharded or partial DTensor is an error."""
    if DTensor is None or not isinstance(t, DTensor):
        return t
    if all(p.is_replicate() for p in t.placements):
        return t.to_local()
    raise ValueError(
        f"moe_experts got {name} as a DTensor placed {tuple(t.placements)} over a mesh of {t.device_mesh.size()} "
        "ranks, i.e. split by expert or tensor parallelism (transformers' EP/TP plans) or by FSDP2 with the experts as "
        "their own unit. Computing on its local shard with these expert ids would silently give a wrong result, so it "
        "is refused. Call the experts module (block.experts(hidden, top_k_index, top_k_weights)) instead of reading "
        "its weights: the engine's experts forward hands the kernel local weights and local expert ids "
        "(patch_qwen3_moe and experts_implementation='qwen3_moe_fused' both do that)."
    )


def _unwrap_4bit(name, w):
    """A ``Tensor4bit``'s storage (``Weight4bit``); other weights as they are."""
    if not isinstance(w, weights4bit.Tensor4bit):
        return w
    if w.lora is not None:
        raise ValueError(f"moe_experts got {name} as a 4-bit weight with a LoRA term folded in (PEFT's parametrized "
                         "weight): pass the frozen weight and its factors as ``lora`` (the experts module's forward "
                         "does)")
    return w.weight4bit


def _check_inputs(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation):
    if activation != "silu":
        raise ValueError(f"activation {activation!r} is not supported; Qwen3-MoE experts use 'silu' (SwiGLU)")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}")
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            "gate_up_proj must be [E, 2*I, H] and down_proj [E, H, I] (transformers 5.x stacked experts), got "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    E, two_i, H = gate_up_proj.shape
    if two_i % 2 or tuple(down_proj.shape) != (E, H, two_i // 2) or hidden.shape[1] != H:
        raise ValueError(
            f"inconsistent shapes: hidden {tuple(hidden.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
            f"down_proj {tuple(down_proj.shape)}; expected hidden [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]"
        )
    if top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"top_k_index and top_k_weights must both be [T, K] with T = {hidden.shape[0]}, got "
            f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
        )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if gate_up_proj.dtype != down_proj.dtype or not gate_up_proj.dtype.is_floating_point:
        raise TypeError(f"gate_up_proj and down_proj must share one floating dtype, got {gate_up_proj.dtype} "
                        f"and {down_proj.dtype}")
    devices = {t.device for t in (hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    lora: ExpertsLora | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """Qwen3-MoE experts: out[t] = Σ_k w[t,k] · W2[e]·(silu(W1g[e]·x[t]) ⊙ W1u[e]·x[t]), e = top_k_index[t,k].

    hidden [T, H]; top_k_index [T, K] integer, local to the weights given (ids outside [0, E) are dropped: zero
    output and zero routing-weight gradient, transformers' expert-parallel sentinel contract); top_k_weights [T, K];
    gate_up_proj [E, 2I, H] (gate rows first); down_proj [E, H, I]; either may be a ``Weight4bit`` or a
    ``Tensor4bit`` parameter holding one (bitsandbytes' 4-bit storage, frozen), which the kernels dequantize tile by tile as they load it (the CPU reference path
    dequantizes it whole). ``lora`` (``ExpertsLora``) makes each weight W + s·B·A without forming it (split
    LoRA: x·Aᵀ, then ·Bᵀ). Returns [T, H] in hidden's dtype.
    Differentiable w.r.t. hidden, top_k_weights, both weights and the LoRA factors. Replicated DTensors are used
    locally; sharded DTensors raise ``ValueError``.
    """
    if torch.compiler.is_compiling() and any(isinstance(w, weights4bit.Tensor4bit) for w in (gate_up_proj, down_proj)):
        return _moe_experts_outside_the_graph(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, lora=lora,
                                              activation=activation)
    gate_up_proj, down_proj = (_unwrap_4bit(name, w) for name, w in (("gate_up_proj", gate_up_proj),
                                                                        ("down_proj", down_proj)))
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj = (
        _localize(name, t) for name, t in (("hidden", hidden), ("top_k_index", top_k_index),
                                           ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj),
                                           ("down_proj", down_proj)))
    if lora is not None:
        lora = ExpertsLora(*(None if t is None else _localize(f"lora.{field}", t)
                             for field, t in zip(ExpertsLora._fields[:4], lora[:4])), *lora[4:])
    _check_inputs(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, activation)
    if lora is not None:
        _check_lora(lora, gate_up_proj, down_proj)
    weights = [(weights4bit.stacked(w)[0], ops.q_list(w), [w.blocksize, w.blocksize2]) if isinstance(w, Weight4bit)
               else (w, [], [64, 256]) for w in (gate_up_proj, down_proj)]  # (kernel operand, 4-bit tensors, blocks)
    if hidden.shape[0] == 0 or not (hidden.is_cuda or ops._INTERPRET) or (
            ops._INTERPRET and gate_up_proj.dtype == torch.bfloat16):
        _say_reference(hidden, gate_up_proj.dtype)
        dense = [weights4bit.dequantize(w) if isinstance(w, Weight4bit) else w for w in (gate_up_proj, down_proj)]
        return reference.moe_experts(hidden, top_k_index, top_k_weights, *dense, lora=lora)
    # Like transformers' grouped_mm path, compute in the weights' dtype and return hidden's.
    x = hidden.to(gate_up_proj.dtype)
    block_m = ops.block_m_for(top_k_index.numel(), gate_up_proj.shape[0])
    routing = ops.route(top_k_index, gate_up_proj.shape[0], block_m)
    # PEFT hands B over as a permuted view; the kernels read factor tiles, so give them dense rows (a few MB).
    lora = ExpertsLora(*(None if t is None else t.contiguous() for t in (lora or ExpertsLora())[:4]),
                       *(lora or ExpertsLora())[4:])
    (w1, w1_q, w1_blocks), (w2, w2_q, w2_blocks) = weights
    out, *_ = ops.experts(x, top_k_weights, w1, w2, *routing, block_m, lora.gate_up_a, lora.gate_up_b, lora.down_a,
                          lora.down_b, float(lora.gate_up_scale), float(lora.down_scale), w1_q, w2_q,
                          w1_blocks + w2_blocks)
    return out.to(hidden.dtype)


@torch.compiler.disable
def _moe_experts_outside_the_graph(*args, **kwargs):
    """``moe_experts`` run eagerly where torch.compile meets a ``Tensor4bit``, which dynamo cannot see into (it
    reads the subclass's Python attributes as opaque values): a graph break around the experts, said once."""
    global _said_4bit_compile
    if not _said_4bit_compile:
        _said_4bit_compile = True
        _logger.warning("qwen3-moe-fused: torch.compile does not trace 4-bit experts (Tensor4bit); the experts run "
                        "eagerly between the compiled graphs (a graph break per MoE layer; fullgraph=True cannot "
                        "compile such a model)")
    return moe_experts(*args, **kwargs)


def dequantize_4bit(weight: Weight4bit) -> torch.Tensor:
    """A 4-bit stacked weight (bitsandbytes' storage, ``Weight4bit``) as a dense tensor of its shape and dtype: by
    the dequantize kernel on CUDA (or under TRITON_INTERPRET=1), else by the reference; the same bits either way,
    and bitsandbytes' ``dequantize_4bit`` bits."""
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"dequantize_4bit takes a Weight4bit (weights4bit.from_bnb(packed, quant_state)), got "
                        f"{type(weight).__name__}")
    if weight.packed.is_cuda or ops._INTERPRET:
        return ops.dequantize_4bit(weight)
    return weights4bit.dequantize(weight)


def tune(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, tokens, *,
         dtype: torch.dtype = torch.bfloat16, lora_rank: int = 0, device="cuda") -> None:
    """Autotune the kernels ahead of training (see ``tuning``) for each number of tokens in ``tokens``: one
    forward and backward on random inputs with uniform routing, full fine-tuning and, with ``lora_rank``, LoRA on
    frozen experts. Choices are per rows-per-expert power of two, so one T per bucket is enough."""
    gen = torch.Generator(device=device).manual_seed(0)
    w1 = torch.randn(num_experts, 2 * intermediate_size, hidden_size, device=device, generator=gen, dtype=dtype) * 0.02
    w2 = torch.randn(num_experts, hidden_size, intermediate_size, device=device, generator=gen, dtype=dtype) * 0.02
    for T in tokens:
        x = torch.randn(T, hidden_size, device=device, generator=gen, dtype=dtype, requires_grad=True)
        index = torch.rand(T, num_experts, device=device, generator=gen).topk(top_k, dim=-1).indices
        weights = torch.full((T, top_k), 1.0 / top_k, device=device, dtype=dtype, requires_grad=True)
        runs = [(w1.requires_grad_(), w2.requires_grad_(), None)]
        if lora_rank:
            factors = ExpertsLora(*((torch.randn(*shape, device=device, generator=gen, dtype=dtype) * 0.02).requires_grad_()
                                    for shape in ((num_experts, lora_rank, hidden_size),
                                                  (num_experts, 2 * intermediate_size, lora_rank),
                                                  (num_experts, lora_rank, intermediate_size),
                                                  (num_experts, hidden_size, lora_rank))))
            runs.append((w1.detach(), w2.detach(), factors))
        for gate_up, down, factors in runs:
            moe_experts(x, index, weights, gate_up, down, lora=factors).sum().backward()


def _say_reference(hidden, dtype):
    global _said_reference
    if not _said_reference and hidden.shape[0]:
        _said_reference = True
        if ops._INTERPRET:  # Triton 3.6's interpreter multiplies bfloat16 dot operands as raw integers
            _logger.warning("qwen3-moe-fused: %s weights under TRITON_INTERPRET=1 use the pure-torch reference "
                            "path: Triton's interpreter computes bfloat16 dots wrongly (use float32 or float16 there)",
                            dtype)
        else:
            _logger.warning(
                "qwen3-moe-fused: %s tensors use the pure-torch reference path; the Triton kernels run on CUDA "
                "(or anywhere under TRITON_INTERPRET=1)", hidden.device.type,
            )
