"""LoRA epilogue shared by the grouped GEMMs: acc += la[r] · LB[e][:, cols] for the rows r of one M-tile.

la [TK, LORA_R] is the thin product already scaled by the adapter's s (e.g. s·x·A1ᵀ), in expert order;
LB[e][k, n] is read at lb_ptr + e·stride_lbe + n·stride_lbn + k·stride_lbr. The product accumulates into the
tile's own accumulator (no second register tile).
"""

import triton
import triton.language as tl


@triton.jit
def add_lora(acc, la_ptr, lb_ptr, rows, row_mask, cols, col_mask, expert, stride_lbe, stride_lbn, stride_lbr,
             LORA_R: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < LORA_R
    la = tl.load(la_ptr + rows[:, None].to(tl.int64) * LORA_R + rs[None, :],
                 mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    lb = tl.load(lb_ptr + expert.to(tl.int64) * stride_lbe + cols[None, :] * stride_lbn + rs[:, None] * stride_lbr,
                 mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    return tl.dot(la, lb, acc, input_precision=PRECISION, out_dtype=ACC)
