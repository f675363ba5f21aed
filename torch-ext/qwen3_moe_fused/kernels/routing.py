"""Routing metadata on the device in two small kernels, without host synchronisation or atomics.

Same content as ``reference.route`` plus the per-tile table the M-tiled grouped GEMMs launch over: tile t
covers rows ``tile_row[t] : tile_row[t] + BLOCK_M`` (clipped to its expert's end) of expert ``tile_expert[t]``.
The rows of dropped pairs (ids outside [0, E), after the last expert's rows) are tiled too, with expert -2,
so the forward can define every row of its outputs; unused tiles have expert -1. The tile count is
bounded by ``TK // BLOCK_M + min(E + 1, TK)``, since Σ_b ceil(c_b / BLOCK_M) ≤ Σ_b (c_b // BLOCK_M + [c_b > 0])
over the E + 1 buckets (E experts, then the dropped pairs).

A stable counting sort over chunks of pairs (bucket b of pair i: its expert, or E when dropped):
    routing_count_kernel    counts[c, b] = pairs of chunk c in bucket b                  (one program per chunk)
    routing_place_kernel    row of pair i = starts[b] + before[c, b] + (earlier pairs of chunk c in bucket b),
                            with before[c, b] = Σ_{c' < c} counts[c', b] and
                            starts[b] = Σ_{b' < b} Σ_c counts[c, b'],
                            which every program sums from the counts itself (no third launch for a scan);
                            row_pair[row] = i, pair_row[i] = row (-1 when dropped); program c also writes its
                            share of the tile table, program 0 the bounds                (one program per chunk)
Every sum is over int32 counts in a fixed order: the result is one permutation, the same on every run.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch import launcher
from ..tuning import cdiv, max_tiles, next_power_of_2

_SUB = 64  # pairs a chunk's programs take per step (a [SUB, buckets] one-hot in registers)
_MAX_CHUNKS = 256  # chunks per routing at most: each placing program reads every chunk's counts


class DeviceRouting(NamedTuple):
    """int32 tensors on the routing's device (TK = T·K rows)."""

    row_pair: torch.Tensor  # [TK] flat pair id (t·K + k) of each row, expert-major, stable; dropped pairs last
    pair_row: torch.Tensor  # [TK] row of each pair, -1 for dropped pairs (ids outside [0, E))
    offsets: torch.Tensor  # [E+1] expert e owns rows offsets[e]:offsets[e+1]
    tile_expert: torch.Tensor  # [max_tiles] expert of each M-tile; -2 over dropped pairs, -1 past the last tile
    tile_row: torch.Tensor  # [max_tiles] first row of each M-tile


@triton.jit
def _buckets(ids_ptr, pairs, num_pairs, num_experts, NUM_BUCKETS: tl.constexpr):
    """(one-hot [SUB, NUM_BUCKETS] int32 of each pair's bucket, bucket, in range): expert id, or E when dropped;
    pairs past the end match no bucket."""
    in_range = pairs < num_pairs
    ids = tl.load(ids_ptr + pairs, mask=in_range, other=0)
    bucket = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)
    bucket = tl.where(in_range, bucket, NUM_BUCKETS)
    one_hot = (bucket[:, None] == tl.arange(0, NUM_BUCKETS)[None, :]).to(tl.int32)
    return one_hot, bucket, in_range


@triton.jit
def routing_count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, chunk,
                         SUB: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """counts[c, b]: pairs of chunk c (``chunk`` pairs from c·chunk) in bucket b."""
    c = tl.program_id(0)
    counts = tl.zeros((NUM_BUCKETS,), dtype=tl.int32)
    for start in range(0, chunk, SUB):
        one_hot, _, _ = _buckets(ids_ptr, c * chunk + start + tl.arange(0, SUB), num_pairs, num_experts, NUM_BUCKETS)
        counts += tl.sum(one_hot, axis=0)
    tl.store(counts_ptr + c * NUM_BUCKETS + tl.arange(0, NUM_BUCKETS), counts)


@triton.jit
def routing_place_kernel(ids_ptr, counts_ptr, bounds_ptr, tile_expert_ptr, tile_row_ptr, row_pair_ptr, pair_row_ptr,
                         num_pairs, num_experts, chunk, num_chunks, block_m, num_tiles, tiles_per_program,
                         SUB: tl.constexpr, CHUNKS: tl.constexpr, TILES: tl.constexpr, NUM_BUCKETS: tl.constexpr):
    """Places chunk c's pairs (row_pair, pair_row); writes tiles [c·tiles_per_program, (c+1)·tiles_per_program) of
    the table (``num_tiles`` entries, height ``block_m``, over the E + 1 buckets) and, in program 0, bounds[b]
    (b ≤ E + 1) = rows of buckets < b."""
    c = tl.program_id(0)
    buckets = tl.arange(0, NUM_BUCKETS)
    totals = tl.zeros((NUM_BUCKETS,), dtype=tl.int32)
    before = tl.zeros((NUM_BUCKETS,), dtype=tl.int32)  # this chunk's: pairs of earlier chunks, per bucket
    for c0 in range(0, num_chunks, CHUNKS):
        chunks = c0 + tl.arange(0, CHUNKS)
        counts = tl.load(counts_ptr + chunks[:, None] * NUM_BUCKETS + buckets[None, :],
                         mask=(chunks < num_chunks)[:, None], other=0)
        totals += tl.sum(counts, axis=0)
        before += tl.sum(tl.where((chunks < c)[:, None], counts, 0), axis=0)
    starts = tl.cumsum(totals, axis=0) - totals  # first row of each bucket; starts[E + 1] = TK
    tl.store(bounds_ptr + buckets, starts, mask=(buckets <= num_experts + 1) & (c == 0))

    tiles = tl.where(buckets <= num_experts, (totals + block_m - 1) // block_m, 0)
    tile_end = tl.cumsum(tiles, axis=0)
    share_end = tl.minimum((c + 1) * tiles_per_program, num_tiles)
    for t0 in range(c * tiles_per_program, share_end, TILES):
        t = t0 + tl.arange(0, TILES)
        bucket = tl.sum((t[:, None] >= tile_end[None, :]).to(tl.int32), axis=1)  # bucket holding tile t
        mine = bucket[:, None] == buckets[None, :]
        first_row = tl.sum(tl.where(mine, starts[None, :], 0), axis=1)
        first_tile = tl.sum(tl.where(mine, (tile_end - tiles)[None, :], 0), axis=1)
        used = bucket <= num_experts
        expert = tl.where(bucket == num_experts, -2, bucket)  # the dropped pairs' tiles
        tl.store(tile_expert_ptr + t, tl.where(used, expert, -1), mask=t < share_end)  # -1: past the last tile
        tl.store(tile_row_ptr + t, tl.where(used, first_row + (t - first_tile) * block_m, 0), mask=t < share_end)

    placed = starts + before  # first row of this chunk's pairs, per bucket; then advanced past those placed
    for start in range(0, chunk, SUB):
        pairs = c * chunk + start + tl.arange(0, SUB)
        one_hot, bucket, in_range = _buckets(ids_ptr, pairs, num_pairs, num_experts, NUM_BUCKETS)
        row = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - 1 + placed[None, :]), axis=1)
        tl.store(row_pair_ptr + row, pairs, mask=in_range)
        tl.store(pair_row_ptr + pairs, tl.where(bucket < num_experts, row, -1), mask=in_range)
        placed += tl.sum(one_hot, axis=0)


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int, one_buffer: bool = True) -> DeviceRouting:
    """Routing metadata of ``top_k_index [T, K]`` (any integer dtype) over ``num_experts`` experts, with the tile
    table of height ``block_m``: two launches and one int32 allocation (``one_buffer``; else one per tensor, as
    a custom op's outputs must not share storage)."""
    ids = top_k_index.contiguous().view(-1)  # the kernels read ids at unit stride
    num_pairs = ids.numel()
    num_buckets = next_power_of_2(num_experts + 2)  # E experts, the dropped pairs, and bounds' end
    chunk = max(_SUB, next_power_of_2(cdiv(num_pairs, _MAX_CHUNKS)))
    num_chunks = max(1, cdiv(num_pairs, chunk))
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    tiles_per_program = cdiv(num_tiles, num_chunks)
    sizes = (num_pairs, num_pairs, num_experts + 2, num_tiles, num_tiles, num_chunks * num_buckets)
    if one_buffer:
        buffers = torch.empty(sum(sizes), dtype=torch.int32, device=ids.device).split(sizes)
    else:
        buffers = [torch.empty(size, dtype=torch.int32, device=ids.device) for size in sizes]
    row_pair, pair_row, bounds, tile_expert, tile_row, counts = buffers
    launcher(routing_count_kernel)(
        (num_chunks,), ids, counts, num_pairs, num_experts, chunk, SUB=_SUB, NUM_BUCKETS=num_buckets, num_warps=4,
    )
    launcher(routing_place_kernel)(
        (num_chunks,), ids, counts, bounds, tile_expert, tile_row, row_pair, pair_row, num_pairs, num_experts, chunk,
        num_chunks, block_m, num_tiles, tiles_per_program, SUB=_SUB, CHUNKS=16,
        TILES=min(64, next_power_of_2(tiles_per_program)), NUM_BUCKETS=num_buckets, num_warps=4,
    )
    return DeviceRouting(row_pair, pair_row, bounds[: num_experts + 1], tile_expert, tile_row)
