"""Backward of the down projection and SwiGLU, one grouped GEMM with a fused epilogue.

For each row r of expert e (pair p = row_pair[r], token t = p // K, routing weight s = w[t, p % K]):
    dA[r] = dOut[t] · W2[e]                          (gathered dOut; [I])
            + dob[r] · A2[e]                         (down LoRA, LORA_R > 0: dob = s2 · dOut[t] · B2[e])
    h[r]  = silu(g) · u  recomputed from z[r] = [g, u]
    dS partial over this program's I-columns:  Σ dA[r] · h[r]   (d out / d s; summed over column blocks later)
    dz[r] = [ s·dA · u · silu'(g),  s·dA · silu(g) ]   (dSwiGLU)
    hs[r] = s · h[r]                                 (input of dW2; only when STORE_HS)
Writes dz [TK, 2I] and hs [TK, I] in z's dtype, ds_partial [cdiv(I, BLOCK_N), TK] in ACC.
Its M-tiles may be lower than the routing table's: each table tile is TILE_SPLIT tiles of BLOCK_M rows (a
sub-tile past its expert's last row returns at once), so no second table is built.
W4BIT: the weight is bitsandbytes' 4-bit storage (``w_ptr`` its packed bytes, the strides those of the dense
weight it holds, ``wq_*`` its scales and code books: ``dequant4bit.load_4bit_tile``), dequantized tile by tile as
it is loaded; no dense copy of it exists.
"""

import triton
import triton.language as tl

from .dequant4bit import load_4bit_tile
from .lora import add_lora


@triton.jit
def down_dgrad_dswiglu_kernel(
    dout_ptr, w_ptr, z_ptr, s_ptr, dz_ptr, hs_ptr, ds_partial_ptr, la_ptr, lb_ptr,
    row_pair_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr,
    wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
    I, H, K_SLOTS, NUM_ROWS,
    stride_dt, stride_dh, stride_we, stride_wh, stride_wi, stride_st, stride_sk, stride_lbe, stride_lbn, stride_lbr,
    STORE_HS: tl.constexpr, LORA_R: tl.constexpr, TILE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    W4BIT: tl.constexpr, W4_NESTED: tl.constexpr, W4_BLOCK: tl.constexpr, W4_BLOCK2: tl.constexpr,
):
    # one program per (M-tile, column block), column blocks fastest: the programs that run together
    # share their rows of the A operand (and one expert's weights) in L2
    n_blocks = tl.cdiv(I, BLOCK_N)
    tile = tl.program_id(0) // (n_blocks * TILE_SPLIT)
    sub_tile = tl.program_id(0) // n_blocks % TILE_SPLIT
    col_block = tl.program_id(0) % n_blocks
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row_end = tl.load(offsets_ptr + expert + 1)
    first_row = tl.load(tile_row_ptr + tile) + sub_tile * BLOCK_M
    if first_row >= row_end:
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(row_pair_ptr + rows, mask=row_mask, other=0)
    tokens = (pairs // K_SLOTS).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)

    dout_rows = dout_ptr + tokens[:, None] * stride_dt
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_mask = k < H
        a = tl.load(dout_rows + k[None, :] * stride_dh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if W4BIT:  # tiles [H, output columns] along the weight's contiguous I
            b = load_4bit_tile(w_ptr, wq_absmax_ptr, wq_code_ptr, wq_absmax2_ptr, wq_code2_ptr, wq_offset_ptr,
                               expert.to(tl.int64) * stride_we + k.to(tl.int64) * stride_wh, k_mask,
                               col_block * BLOCK_N, I, BLOCK_K, BLOCK_N, W4_BLOCK, W4_NESTED,
                               W4_BLOCK2).to(dout_ptr.dtype.element_ty)
        else:
            b = tl.load(w_cols + k[:, None].to(tl.int64) * stride_wh, mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    if LORA_R > 0:
        acc = add_lora(acc, la_ptr, lb_ptr, rows, row_mask, cols, col_mask, expert, stride_lbe, stride_lbn, stride_lbr,
                       LORA_R, BLOCK_R, ACC, PRECISION)

    mask = row_mask[:, None] & col_mask[None, :]
    z_rows = z_ptr + rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]
    gate = tl.load(z_rows, mask=mask, other=0.0).to(ACC)
    up = tl.load(z_rows + I, mask=mask, other=0.0).to(ACC)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    tl.store(ds_partial_ptr + col_block.to(tl.int64) * NUM_ROWS + rows, tl.sum(acc * h, axis=1), mask=row_mask)

    s = tl.load(s_ptr + tokens * stride_st + (pairs % K_SLOTS) * stride_sk, mask=row_mask, other=0.0).to(ACC)
    dh = acc * s[:, None]
    dz_rows = dz_ptr + rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]
    tl.store(dz_rows, (dh * up * (sig + silu * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_rows + I, (dh * silu).to(dz_ptr.dtype.element_ty), mask=mask)
    if STORE_HS:
        hs = hs_ptr + rows[:, None].to(tl.int64) * I + cols[None, :]
        tl.store(hs, (h * s[:, None]).to(hs_ptr.dtype.element_ty), mask=mask)
