"""Grouped GEMM over the M-tiles: c[r] = a[r] · B[e] (+ s · la[r] · LB[e]) for the rows r of each expert e.

B[e] is addressed through strides, so the same kernel computes
    down projection   y[r]  = h[r]  · W2[e]ᵀ   (+ s · ha[r] · B2[e]ᵀ with down-projection LoRA)
    dX per row        dx[r] = dz[r] · W1[e]    (+ s · (dz·B1)[r] · A1[e] with gate/up LoRA)
    LoRA's thin GEMMs xa[r] = x[t] · A1[e]ᵀ (GATHER_A: row r reads token t = row_pair[r] // K),
                      ha[r] = h[r] · A2[e]ᵀ, dob[r] = dOut[t] · B2[e], (dz·B1)[r] = dz[r] · B1[e].
a's rows are addressed by stride; c [TK, N] and la [TK, LORA_R] are contiguous, in expert order. The rows of
dropped pairs (tiles with expert -2) get zeros, so c is defined everywhere.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, la_ptr, lb_ptr,
    row_pair_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    N, KA, K_SLOTS, NUM_ROWS, lora_scale,
    stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_lbe, stride_lbn, stride_lbr,
    GATHER_A: tl.constexpr, LORA_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    c = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    if expert < 0:
        if expert == -2:  # dropped pairs' rows
            tl.store(c, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty),
                     mask=(rows < NUM_ROWS)[:, None] & col_mask[None, :])
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    row_mask = rows < row_end
    ks = tl.arange(0, BLOCK_K)

    if GATHER_A:
        a_index = (tl.load(row_pair_ptr + rows, mask=row_mask, other=0) // K_SLOTS).to(tl.int64)
    else:
        a_index = rows.to(tl.int64)
    a_rows = a_ptr + a_index[:, None] * stride_at
    b_cols = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, KA, BLOCK_K):
        k = k0 + ks
        k_mask = k < KA
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    if LORA_R > 0:
        rs = tl.arange(0, BLOCK_R)
        r_mask = rs < LORA_R
        la = tl.load(la_ptr + rows[:, None].to(tl.int64) * LORA_R + rs[None, :],
                     mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        lb = tl.load(lb_ptr + expert.to(tl.int64) * stride_lbe + cols[None, :] * stride_lbn + rs[:, None] * stride_lbr,
                     mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        acc += lora_scale * tl.dot(la, lb, input_precision=PRECISION, out_dtype=ACC)

    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
