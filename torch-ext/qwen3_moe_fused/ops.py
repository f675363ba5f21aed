"""torch.library custom ops around the Triton kernels, with fake implementations and registered autograd.

    experts_forward(x, w, W1, W2, routing..., block_m, A1, B1, A2, B2, s1, s2, W1_q, W2_q, q_blocks)
        -> (out [T, H], z, xa, ha)
        [xa = s1·x·A1ᵀ] -> gate_up_swiglu (+ xa·B1ᵀ) -> [ha = s2·h·A2ᵀ] -> grouped_gemm (down, + ha·B2ᵀ) -> combine.
        Saved for backward: x, w, z, the routing and the LoRA intermediates xa, ha [TK, r] (W1, W2 and the LoRA
        factors are the caller's tensors, saved by reference). LoRA factors are optional per projection:
        A1 [E, r1, H], B1 [E, 2I, r1], A2 [E, r2, I], B2 [E, H, r2]; W + s·B·A is never formed. A weight may be
        4-bit (frozen): then W1/W2 are its packed bytes [E, N, K // 2] (``weights4bit.stacked``), the trailing
        arguments gate_up_q / down_q its other tensors (``q_list``) and q_blocks the block sizes, and every kernel
        that reads it dequantizes each tile as it loads it.
    experts_backward(dOut, x, w, W1, W2, z, xa, ha, routing..., LoRA..., needs...) -> (dx, dw, dW1, dW2, dA1, dB1, dA2, dB2)
        [dob = s2·dOut·B2] -> down_dgrad_dswiglu (+ dob·A2) -> [dzb = s1·dz·B1] -> grouped_gemm (dz·W1 + dzb·A1)
        -> combine (gather-sum) -> expert_wgrad for each weight or factor asked for.
        Gradients not asked for are skipped and returned as empty tensors (None to autograd).

``experts`` (what ``moe_experts`` calls) runs experts_forward with its autograd: through the custom op when
torch.compile or export traces it, through a plain ``autograd.Function`` over the same functions in eager mode
(fewer host microseconds per call). ``route`` builds the routing the ops take (``kernels/routing.py``).

Triton is imported when a kernel first runs, so the package imports (and its reference path works) without it.
"""

import functools
import os
from typing import Optional

import torch

from . import tuning
from ._ops import add_op_namespace_prefix
from .launch import launcher
from .tuning import block_m_for  # noqa: F401  (the functional API's M-tile height)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PRECISION = "ieee"  # exact float32/float64 products (no tf32); bf16/fp16 dots are unaffected


_TRITON = None


def _triton():
    """(triton, triton.language, the kernels package with its modules loaded), imported on first use."""
    global _TRITON
    if _TRITON is not None:
        return _TRITON
    try:
        import triton
        import triton.language as tl

        from . import kernels
        from .kernels import (  # noqa: F401
            combine, dequant4bit, down_dgrad_dswiglu, expert_wgrad, gate_up_swiglu, grouped_gemm, routing,
        )
    except ImportError as err:
        raise ImportError(f"qwen3-moe-fused's kernels need Triton ({err}); install triton, or use CPU tensors") from err
    _TRITON = triton, tl, kernels
    return _TRITON


def route(top_k_index, num_experts, block_m):
    """The routing metadata the kernels launch over (``kernels.routing``: three small launches); a custom op
    when torch.compile or export traces it."""
    if torch.compiler.is_compiling():
        return routing_op(top_k_index, num_experts, block_m)
    return _triton()[2].routing.route(top_k_index, num_experts, block_m)


def _route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> list[torch.Tensor]:
    return list(_triton()[2].routing.route(top_k_index, num_experts, block_m, one_buffer=False))


def _route_fake(top_k_index, num_experts, block_m):
    rows, tiles = top_k_index.numel(), tuning.max_tiles(top_k_index.numel(), num_experts, block_m)
    return [top_k_index.new_empty(n, dtype=torch.int32) for n in (rows, rows, num_experts + 1, tiles, tiles)]


def dequantize_4bit(weight) -> torch.Tensor:
    """``weights4bit.dequantize(weight)`` computed by the dequantize kernel (bit for bit the same values)."""
    kernels = _triton()[2]
    # Triton 3.6's interpreter does not round float32 to bfloat16 to nearest: there the kernel writes float32
    # and torch rounds (the same single rounding the GPU's conversion makes)
    via_float32 = _INTERPRET and weight.dtype == torch.bfloat16
    out = torch.empty(weight.shape, dtype=torch.float32 if via_float32 else weight.dtype, device=weight.packed.device)
    block = 1024 if not _INTERPRET else 256
    q = _weight(weight.packed.view(1, 1, -1), q_list(weight), (weight.blocksize, weight.blocksize2))[2]
    launcher(kernels.dequant4bit.dequantize_4bit_kernel)(
        (tuning.cdiv(weight.numel, block),), weight.packed, q["wq_absmax_ptr"], q["wq_code_ptr"], q["wq_absmax2_ptr"],
        q["wq_code2_ptr"], q["wq_offset_ptr"], out, weight.numel, BLOCKSIZE=q["W4_BLOCK"], NESTED=q["W4_NESTED"],
        BLOCKSIZE2=q["W4_BLOCK2"], BLOCK=block, **({} if _INTERPRET else {"enable_fp_fusion": False}),
    )
    return out.to(weight.dtype)


def q_list(weight) -> list:
    """The tensors of a 4-bit weight (``weights4bit.Weight4bit``) besides its bytes, as the ops take them: absmax
    and code book, then (nested) absmax2, code2 and the offset."""
    return [weight.absmax, weight.code] + ([weight.absmax2, weight.code2, weight.offset] if weight.nested else [])


def _weight(w, q, blocks):
    """(dims [E, N, K] and element strides of the dense weight ``w`` stands for, its kernel arguments): ``w``
    itself (``q`` empty), or the packed bytes [E, N, K // 2] of a 4-bit weight with its tensors ``q``
    (``q_list``) and (blocksize, blocksize2) ``blocks``."""
    if not q:
        return tuple(w.shape), w.stride(), dict(
            wq_absmax_ptr=w, wq_code_ptr=w, wq_absmax2_ptr=w, wq_code2_ptr=w, wq_offset_ptr=w, W4BIT=False,
            W4_NESTED=False, W4_BLOCK=64, W4_BLOCK2=256)
    E, N, half = w.shape
    nested = len(q) == 5
    absmax, code = q[:2]
    absmax2, code2, offset = q[2:] if nested else (code, code, code)
    return (E, N, 2 * half), (N * 2 * half, 2 * half, 1), dict(
        wq_absmax_ptr=absmax, wq_code_ptr=code, wq_absmax2_ptr=absmax2, wq_code2_ptr=code2, wq_offset_ptr=offset,
        W4BIT=True, W4_NESTED=nested, W4_BLOCK=blocks[0], W4_BLOCK2=blocks[1])


def _acc(tl, dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _combine(rows, weights, pair_row, out, weight_grad=None):
    """out [T, N] = the (``weights``-weighted) gather-sum of ``rows`` over each token's K slots; with
    ``weight_grad`` = (ds_partial, dw) the same launch writes the routing weights' gradient dw [T, K] from dgrad's
    partial sums; ``rows`` and ``out`` None: only that. One ``combine_kernel`` launch; returns ``out``."""
    _, tl, kernels = _triton()
    has_rows, has_dw = rows is not None, weight_grad is not None
    ds_partial, dw = weight_grad if has_dw else (rows, out)  # stand-ins for pointers a launch does not read
    if not has_rows:
        rows, out = ds_partial, dw
    T, N = out.shape if has_rows else (dw.shape[0], 0)
    K = pair_row.numel() // max(T, 1)
    block_t, block_n = (16, 32) if _INTERPRET else (4, 512)
    grid = (tuning.cdiv(T, block_t), tuning.cdiv(N, block_n) if has_rows else 1)
    w = weights if weights is not None else out
    launcher(kernels.combine.combine_kernel)(
        grid, rows, w, pair_row, out, ds_partial, dw, T, N, K, pair_row.numel(), ds_partial.shape[0] if has_dw else 0,
        w.stride(0), w.stride(-1), out.stride(0), out.stride(-1), ROWS=has_rows, WEIGHTED=weights is not None,
        WEIGHT_GRAD=has_dw, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=tuning.next_power_of_2(K),
        ACC=_acc(tl, rows.dtype),
    )
    return out if has_rows else None


def _lora(la, lb, n_dim, r_dim, dummy):
    """Kernel arguments of the LoRA epilogue c += la[r] · LB[e] with LB[e][r, n] = lb[e] indexed on dims
    (r_dim, n_dim) and ``la`` already scaled; no epilogue when ``la`` is None."""
    if la is None:
        return dict(la_ptr=dummy, lb_ptr=dummy, stride_lbe=0, stride_lbn=0, stride_lbr=0, LORA_R=0, BLOCK_R=16)
    rank = la.shape[1]
    return dict(la_ptr=la, lb_ptr=lb, stride_lbe=lb.stride(0), stride_lbn=lb.stride(n_dim), stride_lbr=lb.stride(r_dim),
                LORA_R=rank, BLOCK_R=max(16, tuning.next_power_of_2(rank)))


def _grouped_gemm(a, b, k_dim, n_dim, routing, block_m, gather_slots=0, lora=None, scale=None, b_q=(), b_blocks=()):
    """c[r] = scale · a[r or its token] · B[e] with B[e][k, n] = b[e] indexed on dims (k_dim, n_dim); ``gather_slots``
    = K reads a's rows by token; ``lora`` = (la, lb, n_dim, r_dim) adds a LoRA epilogue; ``scale`` (LoRA's thin
    products) multiplies the fp32 accumulator before the one rounding to a's dtype; ``b_q``/``b_blocks``: b is a
    4-bit weight's bytes (``_weight``)."""
    _, tl, kernels = _triton()
    row_pair, _, offsets, tile_expert, tile_row = routing
    b_shape, b_strides, b_args = _weight(b, b_q, b_blocks)
    n = b_shape[n_dim]
    c = a.new_empty(row_pair.numel(), n)
    lora_args = _lora(*(lora or (None, None, 0, 0)), dummy=c)
    thin = n <= 64  # LoRA's rank-wide products

    def run(blocks, options):
        grid = (tile_expert.numel() * tuning.cdiv(n, blocks["BLOCK_N"]),)
        launcher(kernels.grouped_gemm.grouped_gemm_kernel)(
            grid, a, b, c, row_pair_ptr=row_pair, tile_expert_ptr=tile_expert, tile_row_ptr=tile_row,
            offsets_ptr=offsets, N=n, KA=a.shape[1], K_SLOTS=max(gather_slots, 1), NUM_ROWS=row_pair.numel(),
            stride_at=a.stride(0), stride_ak=a.stride(1), stride_be=b_strides[0], stride_bk=b_strides[k_dim],
            stride_bn=b_strides[n_dim], GATHER_A=gather_slots > 0, out_scale=1.0 if scale is None else float(scale),
            SCALE=scale is not None, **lora_args, **b_args, W4_K_CONTIG=k_dim == 2, BLOCK_M=block_m, **blocks,
            ACC=_acc(tl, a.dtype), PRECISION=_PRECISION, **options,
        )

    key = (n, a.shape[1], gather_slots > 0, lora_args["LORA_R"], block_m, tuning.rows_bucket(row_pair.numel(), b_shape[0]),
           *(("4bit",) if b_q else ()))
    kind = "thin" if thin else ("grouped_gemm_4bit" if b_q else "grouped_gemm")
    tuning.choose(kind, key, a.dtype, run, n, thin_n=n if thin else None)
    return c


def _expert_wgrad(a, b, routing, like, m_dim, n_dim, gather_slots=0, row_weights=None):
    """out[e] (indexed on dims (m_dim, n_dim)) = Σ_{rows r of e} a[r]ᵀ ⊗ b[r or its token (gather_slots = K)]; out
    is a new contiguous tensor shaped like ``like`` (the parameter whose gradient it is). ``row_weights`` [T, K]
    (with gather_slots = K): each a[r] first scaled by its pair's weight, rounded once to a's dtype."""
    _, tl, kernels = _triton()
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    row_pair, _, offsets, _, _ = routing
    M, N = a.shape[1], b.shape[1]
    w = row_weights if row_weights is not None else out

    def run(blocks, options):
        blocks = dict(blocks)
        for dim, size in (("BLOCK_M", M), ("BLOCK_N", N)):  # LoRA's rank-sized factors: A's rows, B's columns
            if size < blocks[dim]:
                blocks[dim] = max(16, tuning.next_power_of_2(size))
        out_blocks = tuning.cdiv(M, blocks["BLOCK_M"]) * tuning.cdiv(N, blocks["BLOCK_N"])
        launcher(kernels.expert_wgrad.expert_wgrad_kernel)(
            (out.shape[0] * out_blocks,), a, b, out, row_pair, offsets, w, M, N, max(gather_slots, 1), b.stride(0),
            b.stride(1), out.stride(0), out.stride(m_dim), out.stride(n_dim), w.stride(0), w.stride(-1),
            GATHER_B=gather_slots > 0, ROW_WEIGHT=row_weights is not None, **blocks, ACC=_acc(tl, a.dtype),
            PRECISION=_PRECISION, **options)

    key = (M, N, gather_slots > 0, tuning.rows_bucket(row_pair.numel(), out.shape[0]),
           *(("row_weights",) if row_weights is not None else ()))
    tuning.choose("wgrad", key, a.dtype, run, N)
    return out


def _experts_forward(
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    row_pair: torch.Tensor,
    pair_row: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    block_m: int,
    gate_up_a: Optional[torch.Tensor],
    gate_up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
    gate_up_scale: float,
    down_scale: float,
    gate_up_q: list[torch.Tensor],
    down_q: list[torch.Tensor],
    q_blocks: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, tl, kernels = _triton()
    routing = (row_pair, pair_row, offsets, tile_expert, tile_row)
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    _, w1_strides, w1_args = _weight(gate_up_proj, gate_up_q, q_blocks[:2])
    I = two_i // 2
    K = top_k_weights.shape[1]
    xa = ha = None
    if gate_up_a is not None:
        xa = _grouped_gemm(hidden, gate_up_a, 2, 1, routing, block_m, gather_slots=K, scale=gate_up_scale)
    z = hidden.new_empty(T * K, two_i)
    h = hidden.new_empty(T * K, I)
    lora_args = _lora(xa, gate_up_b, 1, 2, dummy=z)

    def run(blocks, options):
        grid = (tile_expert.numel() * tuning.cdiv(I, blocks["BLOCK_N"]),)
        launcher(kernels.gate_up_swiglu.gate_up_swiglu_kernel)(
            grid, hidden, gate_up_proj, z, h, row_pair_ptr=row_pair, tile_expert_ptr=tile_expert, tile_row_ptr=tile_row,
            offsets_ptr=offsets, I=I, H=H, K_SLOTS=K, NUM_ROWS=T * K, stride_xt=hidden.stride(0),
            stride_xh=hidden.stride(1), stride_we=w1_strides[0], stride_wn=w1_strides[1], stride_wk=w1_strides[2],
            **lora_args, **w1_args, BLOCK_M=block_m, **blocks, ACC=_acc(tl, hidden.dtype), PRECISION=_PRECISION,
            **options,
        )

    key = (I, H, lora_args["LORA_R"], block_m, tuning.rows_bucket(T * K, E), *(("4bit",) if gate_up_q else ()))
    tuning.choose("gate_up_4bit" if gate_up_q else "gate_up", key, hidden.dtype, run, I)
    if down_a is not None:
        ha = _grouped_gemm(h, down_a, 2, 1, routing, block_m, scale=down_scale)
    y = _grouped_gemm(h, down_proj, 2, 1, routing, block_m, lora=(ha, down_b, 1, 2) if ha is not None else None,
                      b_q=down_q, b_blocks=q_blocks[2:])
    out = _combine(y, top_k_weights, pair_row, hidden.new_empty(T, H))
    return out, z, xa, ha  # xa, ha None without LoRA (``_op_impl`` makes them empty tensors for the custom op)


def _experts_forward_fake(hidden, top_k_weights, gate_up_proj, down_proj, row_pair, pair_row, offsets, tile_expert,
                          tile_row, block_m, gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale,
                          gate_up_q, down_q, q_blocks):
    rows = row_pair.shape[0]
    return (hidden.new_empty(hidden.shape), hidden.new_empty(rows, gate_up_proj.shape[1]),
            hidden.new_empty(rows, gate_up_a.shape[1]) if gate_up_a is not None else hidden.new_empty(0),
            hidden.new_empty(rows, down_a.shape[1]) if down_a is not None else hidden.new_empty(0))


def _experts_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    z: torch.Tensor,
    xa: torch.Tensor,
    ha: torch.Tensor,
    row_pair: torch.Tensor,
    pair_row: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    block_m: int,
    gate_up_a: Optional[torch.Tensor],
    gate_up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
    gate_up_scale: float,
    down_scale: float,
    gate_up_q: list[torch.Tensor],
    down_q: list[torch.Tensor],
    q_blocks: list[int],
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients for (hidden, top_k_weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b), each
    only where ``needs`` says so (else an empty tensor)."""
    _, tl, kernels = _triton()
    routing = (row_pair, pair_row, offsets, tile_expert, tile_row)
    need_hidden, need_weights, need_gate_up, need_down, need_gu_a, need_gu_b, need_down_a, need_down_b = needs
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2
    K = top_k_weights.shape[1]
    acc = _acc(tl, z.dtype)
    grad_out = grad_out.to(z.dtype)
    grads = [None] * 8

    dob = None
    if down_a is not None:
        dob = _grouped_gemm(grad_out, down_b, 1, 2, routing, block_m, gather_slots=K, scale=down_scale)
    store_hs = need_down or need_down_a
    dz = torch.empty_like(z)
    hs = z.new_empty(T * K, I) if store_hs else z.new_empty(0)
    lora_args = _lora(dob, down_a, 2, 1, dummy=dz)
    partial_dtype = torch.float64 if acc == tl.float64 else torch.float32
    _, w2_strides, w2_args = _weight(down_proj, down_q, q_blocks[2:])

    def run(blocks, options):
        # dgrad may run lower M-tiles (its epilogue fits in registers at 64 rows): each routing tile is then split
        tile_m = blocks.get("BLOCK_M", block_m)
        if tile_m > block_m or block_m % tile_m:  # (the interpreter's 16-row routing under a forced 64-row config)
            tile_m = block_m
        n_blocks = tuning.cdiv(I, blocks["BLOCK_N"])
        ds_partial = torch.empty(n_blocks, T * K, dtype=partial_dtype, device=z.device)
        grid = (tile_expert.numel() * (block_m // tile_m) * n_blocks,)
        launcher(kernels.down_dgrad_dswiglu.down_dgrad_dswiglu_kernel)(
            grid, grad_out, down_proj, z, top_k_weights, dz, hs, ds_partial, row_pair_ptr=row_pair,
            tile_expert_ptr=tile_expert, tile_row_ptr=tile_row, offsets_ptr=offsets, I=I, H=H, K_SLOTS=K,
            NUM_ROWS=T * K, stride_dt=grad_out.stride(0), stride_dh=grad_out.stride(1), stride_we=w2_strides[0],
            stride_wh=w2_strides[1], stride_wi=w2_strides[2], stride_st=top_k_weights.stride(0),
            stride_sk=top_k_weights.stride(1), **lora_args, **w2_args, STORE_HS=store_hs, TILE_SPLIT=block_m // tile_m,
            **dict(blocks, BLOCK_M=tile_m), ACC=acc, PRECISION=_PRECISION, **options,
        )
        return ds_partial

    key = (I, H, lora_args["LORA_R"], store_hs, block_m, tuning.rows_bucket(T * K, E), *(("4bit",) if down_q else ()))
    ds_partial = tuning.choose("dgrad", key, z.dtype, run, I)
    weight_grad = None
    if need_weights:  # written by dX's gather-sum launch below, or alone here
        grads[1] = torch.empty(T, K, dtype=top_k_weights.dtype, device=z.device)
        weight_grad = (ds_partial, grads[1])
        if not need_hidden:
            _combine(None, None, pair_row, None, weight_grad)
    dzb = None
    if gate_up_a is not None and (need_hidden or need_gu_a):
        dzb = _grouped_gemm(dz, gate_up_b, 1, 2, routing, block_m, scale=gate_up_scale)
    # Buffers die as soon as their last reader is done (the [TK, H] dx rows before any weight gradient is
    # allocated, hs before gate_up's): the layer's backward high-water mark is what sets a training step's peak.
    if need_hidden:
        dx_rows = _grouped_gemm(dz, gate_up_proj, 1, 2, routing, block_m,
                                lora=(dzb, gate_up_a, 2, 1) if dzb is not None else None, b_q=gate_up_q,
                                b_blocks=q_blocks[:2])
        grads[0] = _combine(dx_rows, None, pair_row, hidden.new_empty(T, H), weight_grad)
        del dx_rows
    if need_down:
        grads[3] = _expert_wgrad(hs, grad_out, routing, down_proj, 2, 1, gather_slots=K)
    if need_down_a:
        grads[6] = _expert_wgrad(dob, hs, routing, down_a, 1, 2)
    del hs, dob
    if need_down_b:  # each row of the thin [TK, r] ha weighted by its routing weight inside the kernel
        grads[7] = _expert_wgrad(ha, grad_out, routing, down_b, 2, 1, gather_slots=K, row_weights=top_k_weights)
    if need_gate_up:
        grads[2] = _expert_wgrad(dz, hidden, routing, gate_up_proj, 1, 2, gather_slots=K)
    if need_gu_a:
        grads[4] = _expert_wgrad(dzb, hidden, routing, gate_up_a, 1, 2, gather_slots=K)
    if need_gu_b:
        grads[5] = _expert_wgrad(dz, xa, routing, gate_up_b, 1, 2)
    return grads  # None where not asked for (``_op_impl`` makes them empty tensors for the custom op)


def _experts_backward_fake(grad_out, hidden, top_k_weights, gate_up_proj, down_proj, z, xa, ha, row_pair, pair_row,
                           offsets, tile_expert, tile_row, block_m, gate_up_a, gate_up_b, down_a, down_b,
                           gate_up_scale, down_scale, gate_up_q, down_q, q_blocks, needs):
    likes = (hidden, top_k_weights, gate_up_proj, down_proj, gate_up_a, gate_up_b, down_a, down_b)
    return [torch.empty_like(like, memory_format=torch.contiguous_format) if need else z.new_empty(0)
            for need, like in zip(needs, likes)]


def _setup_context(ctx, inputs, output):
    hidden, top_k_weights, gate_up_proj, down_proj, *routing, block_m = inputs[:10]
    gate_up_q, down_q, q_blocks = inputs[16:19]
    ctx.save_for_backward(hidden, top_k_weights, gate_up_proj, down_proj, *output[1:], *routing, *inputs[10:14],
                          *gate_up_q, *down_q)
    ctx.block_m = block_m
    ctx.scales = inputs[14:16]
    ctx.q_split, ctx.q_blocks = len(gate_up_q), q_blocks
    ctx.set_materialize_grads(False)  # only out's gradient is ever set; no zero tensors for z, xa, ha


def _backward(ctx, grad_out, _grad_z, _grad_xa, _grad_ha, backward=None):
    hidden, top_k_weights, gate_up_proj, down_proj, z, xa, ha, *rest = ctx.saved_tensors
    routing, lora, q = rest[:5], rest[5:9], rest[9:]
    needs = list(ctx.needs_input_grad[:4]) + list(ctx.needs_input_grad[10:14])
    grads = (backward or experts_backward)(grad_out, hidden, top_k_weights, gate_up_proj, down_proj, z, xa, ha,
                                           *routing, ctx.block_m, *lora, *ctx.scales, q[:ctx.q_split],
                                           q[ctx.q_split:], ctx.q_blocks, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    if backward is None:  # the custom op's autograd: one None per tensor-list element (its inputs' tree structure)
        no_grads = ([None] * ctx.q_split, [None] * (len(q) - ctx.q_split), None)
    else:  # autograd.Function: one None per argument
        no_grads = (None, None, None)
    return (*grads[:4], *(None,) * 6, *grads[4:], None, None, *no_grads)


class _EagerExperts(torch.autograd.Function):
    """experts_forward and its registered autograd, minus the dispatcher's Python layers (eager calls only)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _experts_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, backward=_experts_backward)


def experts(*inputs):
    """``experts_forward(*inputs)`` with autograd: eager calls run the same functions through a plain
    ``autograd.Function`` (the custom op's dispatch costs more host time than the launches it wraps); calls
    traced by torch.compile or export go through the custom op, which they see as one opaque node."""
    if torch.compiler.is_compiling():
        return experts_forward(*inputs)
    return _EagerExperts.apply(*inputs)


def _op_impl(fn):
    """``fn`` as a custom op's implementation: an op returns tensors, none aliasing another, so each None ``fn``
    returns (an output not computed) becomes an empty tensor of its own. The eager path calls ``fn`` itself and
    keeps the None: no allocation for an output nobody reads."""

    @functools.wraps(fn)  # the op's schema is read from fn's signature
    def impl(*args, **kwargs):
        outputs = fn(*args, **kwargs)
        like = next((t for t in outputs if t is not None), None)
        if like is None:
            like = args[0]
        return type(outputs)(like.new_empty(0) if t is None else t for t in outputs)

    return impl


def _register():
    routing = torch.library.custom_op(add_op_namespace_prefix("route"), _route, mutates_args=())
    routing.register_fake(_route_fake)
    forward = torch.library.custom_op(add_op_namespace_prefix("experts_forward"), _op_impl(_experts_forward),
                                      mutates_args=())
    forward.register_fake(_experts_forward_fake)
    backward = torch.library.custom_op(add_op_namespace_prefix("experts_backward"), _op_impl(_experts_backward),
                                       mutates_args=())
    backward.register_fake(_experts_backward_fake)
    forward.register_autograd(_backward, setup_context=_setup_context)
    return forward, backward, routing


# Two variants of one build (module ids _qwen3_moe_fused_cuda_<uid> and _cpu_<uid>, e.g. get_kernel(...) and
# get_kernel(..., backend="cpu") on a CUDA torch) share one op namespace, which _ops.py takes from the running
# torch and the source tree. Ops already registered under it are this code's: reuse them (holding them keeps
# them alive). Registering them again would let the first copy's teardown unregister the op under the second.
_OPDEFS = torch._library.custom_ops.OPDEFS
_NAMES = tuple(add_op_namespace_prefix(name) for name in ("experts_forward", "experts_backward", "route"))
experts_forward, experts_backward, routing_op = \
    tuple(_OPDEFS[name] for name in _NAMES) if _NAMES[0] in _OPDEFS else _register()
