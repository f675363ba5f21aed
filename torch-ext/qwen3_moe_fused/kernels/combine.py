"""Per-token gather-sum over the K slots, in slot order: deterministic, no atomics.

    out[t] = Σ_k w[t, k] · rows[pair_row[t·K + k]]      (WEIGHTED: forward combine of y)
    out[t] = Σ_k rows[pair_row[t·K + k]]                (not WEIGHTED: dX from the per-row dx)
Dropped pairs (pair_row = -1) contribute nothing. Accumulates in ACC, stores in out's dtype.

The routing weights' gradient is the same gather over dgrad's per-column-block partial sums, done by the same
launch as dX's (WEIGHT_GRAD, in the programs of the first column block; alone where dX is not asked for):
    dw[t, k] = Σ_b ds_partial[b, pair_row[t·K + k]]     (b in order; 0 for dropped pairs)
"""

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    rows_ptr, w_ptr, pair_row_ptr, out_ptr, ds_partial_ptr, dw_ptr,
    T, N, K_SLOTS, NUM_ROWS, N_BLOCKS,
    stride_wt, stride_wk, stride_ot, stride_on,
    ROWS: tl.constexpr, WEIGHTED: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """out [T, N] (ROWS) and dw [T, K] (WEIGHT_GRAD) as above; saves nothing. Grid: (token blocks, column
    blocks of N, or 1 without ROWS)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    if ROWS:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
        for k in range(K_SLOTS):
            row = tl.load(pair_row_ptr + tokens.to(tl.int64) * K_SLOTS + k, mask=token_mask, other=-1)
            used = row >= 0
            vals = tl.load(
                rows_ptr + row[:, None].to(tl.int64) * N + cols[None, :], mask=used[:, None] & col_mask[None, :],
                other=0.0,
            ).to(ACC)
            if WEIGHTED:
                w = tl.load(w_ptr + tokens.to(tl.int64) * stride_wt + k * stride_wk, mask=used, other=0.0).to(ACC)
                vals = vals * w[:, None]
            acc += vals
        out = out_ptr + tokens[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :])
    if WEIGHT_GRAD:
        if tl.program_id(1) == 0:
            slots = tl.arange(0, BLOCK_K)
            pairs = tokens[:, None] * K_SLOTS + slots[None, :]
            pair_mask = token_mask[:, None] & (slots < K_SLOTS)[None, :]
            row = tl.load(pair_row_ptr + pairs, mask=pair_mask, other=-1)
            used = row >= 0
            dw = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
            for b in range(N_BLOCKS):
                dw += tl.load(ds_partial_ptr + b * NUM_ROWS + row, mask=used, other=0.0)
            tl.store(dw_ptr + pairs, dw.to(dw_ptr.dtype.element_ty), mask=pair_mask)
