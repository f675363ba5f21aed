"""Per-expert weight gradient: out[e] = Σ_{rows r of e} a[r]ᵀ ⊗ b[token(r)], reduced in row order.

    dW1[e]  = Σ dz[r]ᵀ ⊗ x[t]       (a = dz [TK, 2I], b = x [T, H], out = dW1 [E, 2I, H])
    dW2[e]ᵀ = Σ hs[r]ᵀ ⊗ dOut[t]    (a = hs [TK, I], b = dOut [T, H], out = dW2 with its last strides swapped)
and LoRA's factor gradients, with b gathered by token (GATHER_B) or read by row (b in expert order). ROW_WEIGHT
scales each row of a by its pair's routing weight first (dB2 = Σ (s_r·ha[r])ᵀ ⊗ dOut[t]: the product in ACC,
rounded once to a's dtype, as the dot's operand).
One program per (expert, M-block, N-block) output tile, expert-major, looping over that expert's rows: deterministic,
no atomics, and experts without rows store exact zeros. ``expert_wgrad_persistent_kernel`` computes the same tiles,
the same sums in the same order, with one program per (output tile, group of experts) looping over all its experts'
rows: a tile's reduction is short (one expert's rows, ~16 steps at 16384 tokens), so per expert the pipeline's fill
and the store are a large share of a program's time; across experts the loop keeps the pipeline full. Its steps
are the routing's M-tiles (``tile_expert``, ``tile_row``), so every load address derives from the loop counter
through table loads, which Triton's software pipeliner prefetches (addresses carried from step to step it does not).
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


@triton.jit
def expert_wgrad_persistent_kernel(
    a_ptr, b_ptr, out_ptr,
    row_pair_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, w_ptr,
    M, N, K_SLOTS, NUM_EXPERTS, NUM_TILES,
    stride_bt, stride_bn, stride_oe, stride_om, stride_on, stride_wt, stride_wk,
    GATHER_B: tl.constexpr, ROW_WEIGHT: tl.constexpr, TILE_M: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """expert_wgrad_kernel's tiles, one program per (M-block, N-block, group of EXPERTS_PER_PROGRAM experts), output
    blocks fastest: it walks the routing's TILE_M-row tiles of its experts in order, TILE_M / BLOCK_K steps each,
    storing an expert's tile after its last step (experts without rows: zeros, first); saves nothing."""
    m_blocks = tl.cdiv(M, BLOCK_M)
    n_blocks = tl.cdiv(N, BLOCK_N)
    block = tl.program_id(0) % (m_blocks * n_blocks)
    first_expert = tl.program_id(0) // (m_blocks * n_blocks) * EXPERTS_PER_PROGRAM
    ms = (block // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (block % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_mask = (ms < M)[:, None] & (ns < N)[None, :]
    outs = out_ptr + ms[:, None].to(tl.int64) * stride_om + ns[None, :] * stride_on

    # this group's routing tiles: [Σ tiles of the experts before it, Σ tiles of the experts up to its end)
    experts = tl.arange(0, EXPERTS_POW2)
    counts = tl.load(offsets_ptr + experts + 1, mask=experts < NUM_EXPERTS, other=0) \
        - tl.load(offsets_ptr + experts, mask=experts < NUM_EXPERTS, other=0)
    tiles = (counts + TILE_M - 1) // TILE_M
    last_expert = tl.minimum(first_expert + EXPERTS_PER_PROGRAM, NUM_EXPERTS)
    first_tile = tl.sum(tl.where(experts < first_expert, tiles, 0), axis=0)
    end_tile = tl.sum(tl.where(experts < last_expert, tiles, 0), axis=0)
    empty = (experts >= first_expert) & (experts < last_expert) & (counts == 0)
    empty_rank = tl.cumsum(empty.to(tl.int32), axis=0) - 1
    for i in range(0, tl.sum(empty.to(tl.int32), axis=0)):
        expert = tl.sum(tl.where(empty & (empty_rank == i), experts, 0), axis=0)
        tl.store(outs + expert.to(tl.int64) * stride_oe, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                 mask=tile_mask)

    steps_per_tile: tl.constexpr = TILE_M // BLOCK_K
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for step in range(first_tile * steps_per_tile, end_tile * steps_per_tile):
        tile = step // steps_per_tile
        expert = tl.load(tile_expert_ptr + tile)
        r0 = tl.load(tile_row_ptr + tile) + (step % steps_per_tile) * BLOCK_K
        acc = _row_step(acc, a_ptr, b_ptr, row_pair_ptr, w_ptr, r0 + ks, tl.load(offsets_ptr + expert + 1), ms, ms < M,
                        ns, ns < N, M, K_SLOTS, stride_bt, stride_bn, stride_wt, stride_wk, GATHER_B, ROW_WEIGHT, ACC,
                        PRECISION)
        next_expert = tl.load(tile_expert_ptr + tile + 1, mask=tile + 1 < NUM_TILES, other=-1)
        if ((step + 1) % steps_per_tile == 0) & (next_expert != expert):
            tl.store(outs + expert.to(tl.int64) * stride_oe, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
