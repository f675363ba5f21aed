"""Grouped GEMM over the M-tiles: c[r] = scale · (a[r] · B[e] + la[r] · LB[e]) for the rows r of each expert e.

B[e] is addressed through strides, so the same kernel computes
    down projection   y[r]  = h[r]  · W2[e]ᵀ   (+ ha[r] · B2[e]ᵀ with down-projection LoRA)
    dX per row        dx[r] = dz[r] · W1[e]    (+ dzb[r] · A1[e] with gate/up LoRA)
    LoRA's thin GEMMs xa[r] = s1 · x[t] · A1[e]ᵀ (GATHER_A: row r reads token t = row_pair[r] // K),
                      ha[r] = s2 · h[r] · A2[e]ᵀ, dob[r] = s2 · dOut[t] · B2[e], dzb[r] = s1 · dz[r] · B1[e]
                      (SCALE: the adapter's scale s applied to the fp32 accumulator, one rounding).
a's rows are addressed by stride; c [TK, N] and la [TK, LORA_R] are contiguous, in expert order. The rows of
dropped pairs (tiles with expert -2) get zeros, so c is defined everywhere.
W4BIT: b is bitsandbytes' 4-bit storage of B's weight (``b_ptr`` its packed bytes, the strides those of the dense
weight, ``wq_*`` its scales and code books), read with ``dequant4bit.load_4bit_tile`` along its contiguous dimension
(W4_K_CONTIG: K, as in the down projection; else N, as in dX); no dense copy of it exists.
"""

import triton
import triton.language as tl

from .dequant4bit import load_4bit_tile
from .lora import add_lora


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, la_ptr, lb_ptr,
    row_pair_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
    N, KA, K_SLOTS, NUM_ROWS, out_scale,
    stride_at, stride_ak, stride_be, stride_bk, stride_bn, stride_lbe, stride_lbn, stride_lbr,
    GATHER_A: tl.constexpr, SCALE: tl.constexpr, LORA_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    W4BIT: tl.constexpr, W4_NESTED: tl.constexpr, W4_BLOCK: tl.constexpr, W4_BLOCK2: tl.constexpr,
    W4_K_CONTIG: tl.constexpr,
):
    # one program per (M-tile, column block), column blocks fastest: the programs that run together
    # share their rows of the A operand (and one expert's weights) in L2
    n_blocks = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0) // n_blocks
    col_block = tl.program_id(0) % n_blocks
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
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
    b_col_at = expert.to(tl.int64) * stride_be + cols.to(tl.int64) * stride_bn  # element offsets of B[e][0, cols]
    b_cols = b_ptr + b_col_at[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, KA, BLOCK_K):
        k = k0 + ks
        k_mask = k < KA
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if W4BIT and W4_K_CONTIG:  # tiles [output columns, K] along the weight's contiguous K, transposed
            b = tl.trans(load_4bit_tile(b_ptr, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
                                        b_col_at, col_mask, k0, KA, BLOCK_N, BLOCK_K, W4_BLOCK, W4_NESTED,
                                        W4_BLOCK2).to(a_ptr.dtype.element_ty))
        elif W4BIT:  # tiles [K, output columns] along the weight's contiguous N
            b = load_4bit_tile(b_ptr, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
                               expert.to(tl.int64) * stride_be + k.to(tl.int64) * stride_bk, k_mask,
                               col_block * BLOCK_N, N, BLOCK_K, BLOCK_N, W4_BLOCK, W4_NESTED,
                               W4_BLOCK2).to(a_ptr.dtype.element_ty)
        else:
            b = tl.load(b_cols + k[:, None] * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    if LORA_R > 0:
        acc = add_lora(acc, la_ptr, lb_ptr, rows, row_mask, cols, col_mask, expert, stride_lbe, stride_lbn, stride_lbr,
                       LORA_R, BLOCK_R, ACC, PRECISION)
    if SCALE:
        acc = acc * out_scale
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
