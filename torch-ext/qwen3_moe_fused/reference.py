"""Pure-torch reference of the Qwen3-MoE experts computation: the spec every kernel is tested against.

It follows the decomposition of the fused kernels step by step, so each intermediate can be compared:

1. ``route``: stable expert-major order of the T·K (token, slot) pairs, per-expert counts and offsets,
   gather index (row -> token) and its inverse (pair -> row). Ids outside [0, E) (transformers'
   expert-parallel sentinel is E) are dropped: they sort after every real expert and contribute nothing.
2. ``gate_up``: z = gather(x)·W1[e]ᵀ per expert (z is the pre-activation, kept for backward), and
   ``swiglu``: h = silu(z[:, :I]) · z[:, I:]  (rows [:I] of ``gate_up_proj`` are gate, [I:] are up).
3. ``down``: y = h·W2[e]ᵀ per expert (rows in expert order).
4. ``combine``: out[t] = Σ_k w[t, k] · y[inverse[t, k]], summed over k in slot order.

Everything is differentiable through autograd, which defines the backward the kernels must match. Works in
any floating dtype, float64 included; it is also the package's CPU path.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ExpertsLora", "Routing", "route", "gate_up", "swiglu", "down", "combine", "moe_experts"]


class ExpertsLora(NamedTuple):
    """LoRA on the stacked experts, per projection (a projection's A and B are both None without LoRA):
    gate_up_proj[e] + gate_up_scale · gate_up_b[e] · gate_up_a[e] and likewise for down_proj.

    gate_up_a [E, r1, H], gate_up_b [E, 2I, r1], down_a [E, r2, I], down_b [E, H, r2]."""

    gate_up_a: torch.Tensor | None = None
    gate_up_b: torch.Tensor | None = None
    down_a: torch.Tensor | None = None
    down_b: torch.Tensor | None = None
    gate_up_scale: float = 1.0
    down_scale: float = 1.0


class Routing(NamedTuple):
    """Routing metadata for T tokens with K slots each over E experts (TK = T·K rows).

    counts   [E]    int64  rows routed to each expert
    offsets  [E+1]  int64  expert e owns rows offsets[e]:offsets[e+1]; offsets[E] = number of valid rows
    order    [TK]   int64  flat pair id (t·K + k) of each row, expert-major, stable in pair id;
                           dropped pairs fill the rows from offsets[E] on
    token    [TK]   int64  gather index: token of each row (order // K)
    inverse  [T, K] int64  row of each pair (order's inverse)
    valid    [T, K] bool   pair routed to a real expert (0 <= id < E)
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    order: torch.Tensor
    token: torch.Tensor
    inverse: torch.Tensor
    valid: torch.Tensor


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Routing metadata for ``top_k_index [T, K]`` (any integer dtype) over ``num_experts`` experts."""
    T, K = top_k_index.shape
    ids = top_k_index.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, torch.full_like(ids, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=ids.device)
    return Routing(counts, offsets, order, order // K, inverse.view(T, K), valid.view(T, K))


def _grouped_linear(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows[offsets[e]:offsets[e+1]] · weight[e]ᵀ for each expert e; rows past offsets[-1] give zeros."""
    out = rows.new_zeros(rows.shape[0], weight.shape[1])
    bounds = offsets.tolist()
    for e in range(weight.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = rows[lo:hi] @ weight[e].t()
    return out


def gate_up(hidden: torch.Tensor, gate_up_proj: torch.Tensor, routing: Routing) -> torch.Tensor:
    """z [TK, 2I] = hidden[token] · gate_up_proj[e]ᵀ over each expert's rows."""
    return _grouped_linear(hidden[routing.token], gate_up_proj, routing.offsets)


def swiglu(z: torch.Tensor) -> torch.Tensor:
    """h [TK, I] = silu(gate) · up with gate = z[:, :I], up = z[:, I:]."""
    gate, up = z.chunk(2, dim=-1)
    return F.silu(gate) * up


def down(h: torch.Tensor, down_proj: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y [TK, H] = h · down_proj[e]ᵀ over each expert's rows."""
    return _grouped_linear(h, down_proj, routing.offsets)


def combine(y: torch.Tensor, top_k_weights: torch.Tensor, routing: Routing) -> torch.Tensor:
    """out [T, H] = Σ_k w[t, k] · y[inverse[t, k]] over valid slots, accumulated in slot order."""
    weights = torch.where(routing.valid, top_k_weights, torch.zeros_like(top_k_weights))
    slots = y[routing.inverse]  # [T, K, H]
    out = slots[:, 0] * weights[:, :1]
    for k in range(1, slots.shape[1]):
        out = out + slots[:, k] * weights[:, k : k + 1]
    return out


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
    """Experts output [T, H] for ``hidden [T, H]`` routed by ``top_k_index``/``top_k_weights [T, K]``.

    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` are transformers 5.x's stacked expert
    weights; ``lora`` adds s·B·A to them (here, as the spec, by forming W + s·B·A). The result has ``hidden``'s
    dtype.
    """
    if activation != "silu":
        raise ValueError(f"activation {activation!r} is not supported; Qwen3-MoE experts use 'silu' (SwiGLU)")
    if lora is not None and lora.gate_up_a is not None:
        gate_up_proj = gate_up_proj + lora.gate_up_scale * torch.bmm(lora.gate_up_b, lora.gate_up_a)
    if lora is not None and lora.down_a is not None:
        down_proj = down_proj + lora.down_scale * torch.bmm(lora.down_b, lora.down_a)
    routing = route(top_k_index, gate_up_proj.shape[0])
    z = gate_up(hidden, gate_up_proj, routing)
    y = down(swiglu(z), down_proj, routing)
    return combine(y, top_k_weights.to(y.dtype), routing).to(hidden.dtype)
