"""Grouped GEMM over the M-tiles: c[r] = a[r] · B[e] for the rows r of each expert e (rows in expert order).

B[e] is addressed through strides, so the same kernel computes
    down projection   y[r]  = h[r]  · W2[e]ᵀ   (B = W2 with its last two strides swapped), and
    dX per row        dx[r] = dz[r] · W1[e]    (B = W1 as stored).
a [TK, Ka] and c [TK, N] are contiguous, in expert order; rows past the last expert's end are not written.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    tile_expert_ptr, tile_row_ptr, offsets_ptr,
    N, KA,
    stride_be, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_rows = a_ptr + rows[:, None].to(tl.int64) * KA
    b_cols = b_ptr + expert.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, KA, BLOCK_K):
        k = k0 + ks
        k_mask = k < KA
        a = tl.load(a_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    c = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
