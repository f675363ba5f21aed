"""Forward up projection: one grouped GEMM over the M-tiles with the row gather and SwiGLU fused.

For each row r of expert e (token t = row_pair[r] // K):
    z[r, :I] = x[t] · W1[e, :I]ᵀ (gate),  z[r, I:] = x[t] · W1[e, I:]ᵀ (up),  h[r] = silu(z[r, :I]) · z[r, I:]
with LoRA (LORA_R > 0) z[r] += xa[r] · B1[e]ᵀ, xa = s · x · A1[e]ᵀ computed beforehand (grouped_gemm).
Both accumulators share the gathered x tile; x is read through the gather index, never copied to T·K×H.
Writes z [TK, 2I] (kept for backward) and h [TK, I] (input of the down projection), in x's dtype; the rows
of dropped pairs (tiles with expert -2) get zeros in z, so the output is defined everywhere.
W4BIT: the weight is bitsandbytes' 4-bit storage (``w_ptr`` its packed bytes, the strides those of the dense
weight it holds, ``wq_*`` its scales and code books: ``dequant4bit.load_4bit_tile``), dequantized tile by tile as
it is loaded; no dense copy of it exists.
"""

import triton
import triton.language as tl

from .dequant4bit import load_4bit_tile
from .lora import add_lora


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr, w_ptr, z_ptr, h_ptr, la_ptr, lb_ptr,
    row_pair_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
    I, H, K_SLOTS, NUM_ROWS,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_lbe, stride_lbn, stride_lbr,
    LORA_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    W4BIT: tl.constexpr, W4_NESTED: tl.constexpr, W4_BLOCK: tl.constexpr, W4_BLOCK2: tl.constexpr,
):
    # one program per (M-tile, column block), column blocks fastest: the programs that run together
    # share their rows of the A operand (and one expert's weights) in L2
    n_blocks = tl.cdiv(I, BLOCK_N)
    tile = tl.program_id(0) // n_blocks
    col_block = tl.program_id(0) % n_blocks
    expert = tl.load(tile_expert_ptr + tile)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    z_rows = z_ptr + rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]
    if expert < 0:
        if expert == -2:  # dropped pairs' rows
            zero_mask = (rows < NUM_ROWS)[:, None] & col_mask[None, :]
            zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=z_ptr.dtype.element_ty)
            tl.store(z_rows, zeros, mask=zero_mask)
            tl.store(z_rows + I, zeros, mask=zero_mask)
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    row_mask = rows < row_end
    tokens = (tl.load(row_pair_ptr + rows, mask=row_mask, other=0) // K_SLOTS).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    x_rows = x_ptr + tokens[:, None] * stride_xt
    w_row_at = expert.to(tl.int64) * stride_we + cols.to(tl.int64) * stride_wn  # element offsets of W1[e, cols]
    w_gate = w_ptr + w_row_at[None, :]
    w_up = w_gate + I * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_mask = k < H
        a = tl.load(x_rows + k[None, :] * stride_xh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        if W4BIT:  # tiles [output columns, H] (H is the weight's contiguous dimension), transposed for the dot
            b_gate = tl.trans(load_4bit_tile(w_ptr, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr,
                                             wq_offset_ptr, w_row_at, col_mask, k0, H, BLOCK_N, BLOCK_K, W4_BLOCK,
                                             W4_NESTED, W4_BLOCK2).to(x_ptr.dtype.element_ty))
            b_up = tl.trans(load_4bit_tile(w_ptr, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr,
                                           wq_offset_ptr, w_row_at + I * stride_wn, col_mask, k0, H, BLOCK_N, BLOCK_K,
                                           W4_BLOCK, W4_NESTED, W4_BLOCK2).to(x_ptr.dtype.element_ty))
        else:
            b_gate = tl.load(w_gate + k[:, None] * stride_wk, mask=w_mask, other=0.0)
            b_up = tl.load(w_up + k[:, None] * stride_wk, mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=PRECISION, out_dtype=ACC)
        acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION, out_dtype=ACC)

    if LORA_R > 0:
        acc_gate = add_lora(acc_gate, la_ptr, lb_ptr, rows, row_mask, cols, col_mask, expert, stride_lbe, stride_lbn,
                            stride_lbr, LORA_R, BLOCK_R, ACC, PRECISION)
        acc_up = add_lora(acc_up, la_ptr, lb_ptr, rows, row_mask, cols + I, col_mask, expert, stride_lbe, stride_lbn,
                          stride_lbr, LORA_R, BLOCK_R, ACC, PRECISION)

    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(z_rows, acc_gate.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(z_rows + I, acc_up.to(z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)
