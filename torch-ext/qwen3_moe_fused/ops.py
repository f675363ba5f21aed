"""torch.library custom ops around the Triton kernels, with fake implementations and registered autograd.

    experts_forward(x, w, W1, W2, routing..., block_m) -> (out [T, H], z [TK, 2I])
        gate_up_swiglu -> grouped_gemm (down) -> combine.   Saved for backward: x, w, z and the routing
        (W1, W2 are the caller's parameters, saved by reference).
    experts_backward(dOut, x, w, W1, W2, z, routing..., block_m, needs...) -> (dx, dw, dW1, dW2)
        down_dgrad_dswiglu -> [grouped_gemm (dz·W1) -> combine (gather-sum)] -> [expert_wgrad ×2].
        Gradients not asked for are skipped and returned as empty tensors (None to autograd).

Triton is imported when a kernel first runs, so the package imports (and its reference path works) without it.
"""

import os

import torch

from ._ops import add_op_namespace_prefix

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PRECISION = "ieee"  # exact float32/float64 products (no tf32); bf16/fp16 dots are unaffected


def _triton():
    """(triton, triton.language, the kernels package with its modules loaded), imported on first use."""
    try:
        import triton
        import triton.language as tl

        from . import kernels
        from .kernels import combine, down_dgrad_dswiglu, expert_wgrad, gate_up_swiglu, grouped_gemm  # noqa: F401
    except ImportError as err:
        raise ImportError(f"qwen3-moe-fused's kernels need Triton ({err}); install triton, or use CPU tensors") from err
    return triton, tl, kernels


def block_m_for(num_rows: int, num_experts: int) -> int:
    """M-tile height shared by the routing tables and every M-tiled kernel of one call."""
    if _INTERPRET:
        return 16
    return 128 if num_rows >= 256 * num_experts else 64


# Launch configuration per kernel on the GPU, for 2-byte dtypes: BLOCK_K shrinks for wider ones so the
# shared-memory stages keep their size. The M-tile height of the tile-table kernels is block_m_for's. The
# interpreter uses 32-wide blocks.
GPU_CONFIG = {  # from benchmarks/sweep_configs.py on an H100 (benchmarks/NOTES.md)
    "gate_up": dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "grouped_gemm": dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    "dgrad": dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    "wgrad": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
}
_INTERPRETER_CONFIG = dict(BLOCK_N=32, BLOCK_K=32)


def _cfg(kind, dtype):
    """(block sizes, launch options) for kernel ``kind`` on ``dtype`` operands."""
    if _INTERPRET:
        blocks = dict(_INTERPRETER_CONFIG, **({"BLOCK_M": 32} if kind == "wgrad" else {}))
        return blocks, {}
    config = dict(GPU_CONFIG[kind])
    launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
    config["BLOCK_K"] = max(16, config["BLOCK_K"] * 2 // dtype.itemsize)
    return config, launch


def _acc(tl, dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _combine(rows, weights, pair_row, out):
    triton, tl, kernels = _triton()
    T, N = out.shape
    K = pair_row.numel() // max(T, 1)
    block_t, block_n = (16, 32) if _INTERPRET else (4, 512)
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    w = weights if weights is not None else out
    kernels.combine.combine_kernel[grid](
        rows, w, pair_row, out, T, N, K,
        w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        WEIGHTED=weights is not None, BLOCK_T=block_t, BLOCK_N=block_n, ACC=_acc(tl, out.dtype),
    )
    return out


def _grouped_gemm(a, b, stride_bk, stride_bn, n, tile_expert, tile_row, offsets, block_m):
    triton, tl, kernels = _triton()
    c = a.new_empty(a.shape[0], n)
    blocks, launch = _cfg("grouped_gemm", a.dtype)
    grid = (tile_expert.numel(), triton.cdiv(n, blocks["BLOCK_N"]))
    kernels.grouped_gemm.grouped_gemm_kernel[grid](
        a, b, c, tile_expert, tile_row, offsets, n, a.shape[1], b.stride(0), stride_bk, stride_bn,
        BLOCK_M=block_m, **blocks, ACC=_acc(tl, a.dtype), PRECISION=_PRECISION, **launch,
    )
    return c


def _expert_wgrad(a, b, row_pair, offsets, out, stride_om, stride_on, K):
    triton, tl, kernels = _triton()
    M, N = a.shape[1], b.shape[1]
    blocks, launch = _cfg("wgrad", a.dtype)
    grid = (out.shape[0], triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
    kernels.expert_wgrad.expert_wgrad_kernel[grid](
        a, b, out, row_pair, offsets, M, N, K, b.stride(0), b.stride(1), out.stride(0), stride_om, stride_on,
        **blocks, ACC=_acc(tl, a.dtype), PRECISION=_PRECISION, **launch,
    )
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
) -> tuple[torch.Tensor, torch.Tensor]:
    triton, tl, kernels = _triton()
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2
    K = top_k_weights.shape[1]
    z = hidden.new_empty(T * K, two_i)
    h = hidden.new_empty(T * K, I)
    blocks, launch = _cfg("gate_up", hidden.dtype)
    grid = (tile_expert.numel(), triton.cdiv(I, blocks["BLOCK_N"]))
    kernels.gate_up_swiglu.gate_up_swiglu_kernel[grid](
        hidden, gate_up_proj, z, h, row_pair, tile_expert, tile_row, offsets, I, H, K, T * K,
        hidden.stride(0), hidden.stride(1), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        BLOCK_M=block_m, **blocks, ACC=_acc(tl, hidden.dtype), PRECISION=_PRECISION, **launch,
    )
    y = _grouped_gemm(h, down_proj, down_proj.stride(2), down_proj.stride(1), H, tile_expert, tile_row, offsets, block_m)
    out = _combine(y, top_k_weights, pair_row, hidden.new_empty(T, H))
    return out, z


def _experts_forward_fake(hidden, top_k_weights, gate_up_proj, down_proj, row_pair, pair_row, offsets, tile_expert,
                          tile_row, block_m):
    return hidden.new_empty(hidden.shape), hidden.new_empty(row_pair.shape[0], gate_up_proj.shape[1])


def _experts_backward(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    z: torch.Tensor,
    row_pair: torch.Tensor,
    pair_row: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    block_m: int,
    need_hidden: bool,
    need_weights: bool,
    need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    triton, tl, kernels = _triton()
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    I = two_i // 2
    K = top_k_weights.shape[1]
    acc = _acc(tl, z.dtype)
    grad_out = grad_out.to(z.dtype)
    blocks, launch = _cfg("dgrad", z.dtype)
    n_blocks = triton.cdiv(I, blocks["BLOCK_N"])
    dz = torch.empty_like(z)
    hs = z.new_empty(T * K, I) if need_down else z.new_empty(0)
    ds_partial = torch.empty(n_blocks, T * K, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=z.device)
    kernels.down_dgrad_dswiglu.down_dgrad_dswiglu_kernel[(tile_expert.numel(), n_blocks)](
        grad_out, down_proj, z, top_k_weights, dz, hs, ds_partial,
        row_pair, tile_expert, tile_row, offsets, I, H, K, T * K,
        grad_out.stride(0), grad_out.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        top_k_weights.stride(0), top_k_weights.stride(1),
        STORE_HS=need_down, BLOCK_M=block_m, **blocks, ACC=acc, PRECISION=_PRECISION, **launch,
    )
    d_weights = z.new_empty(0)  # a distinct empty tensor per skipped gradient: op outputs must not alias
    if need_weights:
        ds = ds_partial.sum(0)
        d_weights = torch.where(pair_row >= 0, ds[pair_row.clamp(min=0).long()], 0).view(T, K).to(top_k_weights.dtype)
    d_hidden = z.new_empty(0)
    if need_hidden:
        dx_rows = _grouped_gemm(dz, gate_up_proj, gate_up_proj.stride(1), gate_up_proj.stride(2), H,
                                tile_expert, tile_row, offsets, block_m)
        d_hidden = _combine(dx_rows, None, pair_row, hidden.new_empty(T, H))
    d_gate_up = z.new_empty(0)
    if need_gate_up:
        d_gate_up = torch.empty_like(gate_up_proj, memory_format=torch.contiguous_format)
        _expert_wgrad(dz, hidden, row_pair, offsets, d_gate_up, d_gate_up.stride(1), d_gate_up.stride(2), K)
    d_down = z.new_empty(0)
    if need_down:
        d_down = torch.empty_like(down_proj, memory_format=torch.contiguous_format)
        _expert_wgrad(hs, grad_out, row_pair, offsets, d_down, d_down.stride(2), d_down.stride(1), K)
    return d_hidden, d_weights, d_gate_up, d_down


def _experts_backward_fake(grad_out, hidden, top_k_weights, gate_up_proj, down_proj, z, row_pair, pair_row, offsets,
                           tile_expert, tile_row, block_m, need_hidden, need_weights, need_gate_up, need_down):
    def maybe(need, like):
        return torch.empty_like(like, memory_format=torch.contiguous_format) if need else z.new_empty(0)

    return maybe(need_hidden, hidden), maybe(need_weights, top_k_weights), maybe(need_gate_up, gate_up_proj), maybe(
        need_down, down_proj)


def _setup_context(ctx, inputs, output):
    hidden, top_k_weights, gate_up_proj, down_proj, *routing, block_m = inputs
    ctx.save_for_backward(hidden, top_k_weights, gate_up_proj, down_proj, output[1], *routing)
    ctx.block_m = block_m
    ctx.set_materialize_grads(False)  # z's gradient is always None; no [TK, 2I] zero tensor for it


def _backward(ctx, grad_out, _grad_z):
    hidden, top_k_weights, gate_up_proj, down_proj, z, *routing = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = experts_backward(grad_out, hidden, top_k_weights, gate_up_proj, down_proj, z, *routing, ctx.block_m, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 6


def _register():
    forward = torch.library.custom_op(add_op_namespace_prefix("experts_forward"), _experts_forward, mutates_args=())
    forward.register_fake(_experts_forward_fake)
    backward = torch.library.custom_op(add_op_namespace_prefix("experts_backward"), _experts_backward, mutates_args=())
    backward.register_fake(_experts_backward_fake)
    forward.register_autograd(_backward, setup_context=_setup_context)
    return forward, backward


# Two variants of one build (module ids _qwen3_moe_fused_cuda_<uid> and _cpu_<uid>, e.g. get_kernel(...) and
# get_kernel(..., backend="cpu") on a CUDA torch) share one op namespace, which _ops.py takes from the running
# torch and the source tree. Ops already registered under it are this code's: reuse them (holding them keeps
# them alive). Registering them again would let the first copy's teardown unregister the op under the second.
_OPDEFS = torch._library.custom_ops.OPDEFS
_NAMES = (add_op_namespace_prefix("experts_forward"), add_op_namespace_prefix("experts_backward"))
experts_forward, experts_backward = (_OPDEFS[_NAMES[0]], _OPDEFS[_NAMES[1]]) if _NAMES[0] in _OPDEFS else _register()
