"""Per-expert weight gradient: out[e] = Σ_{rows r of e} a[r]ᵀ ⊗ b[token(r)], reduced in row order.

    dW1[e]  = Σ dz[r]ᵀ ⊗ x[t]       (a = dz [TK, 2I], b = x [T, H], out = dW1 [E, 2I, H])
    dW2[e]ᵀ = Σ hs[r]ᵀ ⊗ dOut[t]    (a = hs [TK, I], b = dOut [T, H], out = dW2 with its last strides swapped)
and LoRA's factor gradients, with b gathered by token (GATHER_B) or read by row (b in expert order). ROW_WEIGHT
scales each row of a by its pair's routing weight first (dB2 = Σ (s_r·ha[r])ᵀ ⊗ dOut[t]: the product in ACC,
rounded once to a's dtype, as the dot's operand).
One program per (expert, M-block, N-block) output tile, expert-major, looping over that expert's rows: deterministic,
no atomics, and experts without rows store exact zeros.
"""

import triton
import triton.language as tl


@triton.jit
def _row_step(acc, a_ptr, b_ptr, row_pair_ptr, w_ptr, rows, row_end, ms, m_mask, ns, n_mask, M, K_SLOTS,
              stride_bt, stride_bn, stride_wt, stride_wk,
              GATHER_B: tl.constexpr, ROW_WEIGHT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a[rows, ms]ᵀ · b[rows (or their tokens), ns] over the ``rows`` before ``row_end`` (one BLOCK_K step)."""
    row_mask = rows < row_end
    if GATHER_B or ROW_WEIGHT:
        pair = tl.load(row_pair_ptr + rows, mask=row_mask, other=0)
    if GATHER_B:
        b_index = (pair // K_SLOTS).to(tl.int64)
    else:
        b_index = rows.to(tl.int64)
    a = tl.load(a_ptr + rows[None, :].to(tl.int64) * M + ms[:, None], mask=m_mask[:, None] & row_mask[None, :],
                other=0.0)
    if ROW_WEIGHT:
        weight = tl.load(w_ptr + (pair // K_SLOTS).to(tl.int64) * stride_wt + (pair % K_SLOTS) * stride_wk,
                         mask=row_mask, other=0.0)
        a = (a.to(ACC) * weight.to(ACC)[None, :]).to(a.dtype)
    b = tl.load(b_ptr + b_index[:, None] * stride_bt + ns[None, :] * stride_bn,
                mask=row_mask[:, None] & n_mask[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def expert_wgrad_kernel(
    a_ptr, b_ptr, out_ptr,
    row_pair_ptr, offsets_ptr, w_ptr,
    M, N, K_SLOTS,
    stride_bt, stride_bn, stride_oe, stride_om, stride_on, stride_wt, stride_wk,
    GATHER_B: tl.constexpr, ROW_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[e][ms, ns] of one (expert, M-block, N-block) tile per program; saves nothing."""
    # expert-major program order: the programs that run together read the same expert's rows from L2
    m_blocks = tl.cdiv(M, BLOCK_M)
    n_blocks = tl.cdiv(N, BLOCK_N)
    expert = tl.program_id(0) // (m_blocks * n_blocks)
    block = tl.program_id(0) % (m_blocks * n_blocks)
    ms = (block // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (block % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(row_start, row_end, BLOCK_K):
        acc = _row_step(acc, a_ptr, b_ptr, row_pair_ptr, w_ptr, r0 + ks, row_end, ms, ms < M, ns, ns < N, M, K_SLOTS,
                        stride_bt, stride_bn, stride_wt, stride_wk, GATHER_B, ROW_WEIGHT, ACC, PRECISION)

    out = out_ptr + expert.to(tl.int64) * stride_oe + ms[:, None].to(tl.int64) * stride_om + ns[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(ms < M)[:, None] & (ns < N)[None, :])
