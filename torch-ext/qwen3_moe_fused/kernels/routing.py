"""Routing metadata on the device, without host synchronisation (torch ops; sizes are host-computable).

Same content as ``reference.route`` plus the per-tile tables the M-tiled grouped GEMMs launch over:
tile t covers rows ``tile_row[t] : tile_row[t] + BLOCK_M`` (clipped to its expert's end) of expert
``tile_expert[t]``. The rows of dropped pairs (after the last expert's) are tiled too, with expert -2, so the
forward can define every row of its outputs; unused tiles have expert -1. The tile count is bounded by
``TK // BLOCK_M + min(E + 1, TK)`` since Σ_e ceil(c_e / BLOCK_M) ≤ Σ_e (c_e // BLOCK_M + [c_e > 0]).
"""

DROPPED = -2  # tile_expert of the tiles over dropped pairs' rows
UNUSED = -1  # tile_expert of the tiles past the last one

from typing import NamedTuple

import torch


class DeviceRouting(NamedTuple):
    """int32 tensors on the routing's device (TK = T·K rows)."""

    row_pair: torch.Tensor  # [TK] flat pair id (t·K + k) of each row, expert-major, stable; dropped pairs last
    pair_row: torch.Tensor  # [TK] row of each pair, -1 for dropped pairs (ids outside [0, E))
    offsets: torch.Tensor  # [E+1] expert e owns rows offsets[e]:offsets[e+1]
    tile_expert: torch.Tensor  # [max_tiles] expert of each M-tile; DROPPED, or UNUSED past the last tile
    tile_row: torch.Tensor  # [max_tiles] first row of each M-tile


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    return num_rows // block_m + min(num_experts + 1, num_rows)


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> DeviceRouting:
    ids = top_k_index.reshape(-1)
    num_rows = ids.numel()
    device = ids.device
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, num_experts).to(torch.int32)
    sorted_key, order = torch.sort(key, stable=True)
    buckets = torch.arange(num_experts + 2, device=device, dtype=torch.int32)  # E experts + the dropped pairs
    bounds = torch.searchsorted(sorted_key, buckets, out_int32=True)
    row_pair = order.to(torch.int32)
    rows = torch.arange(num_rows, device=device, dtype=torch.int32)
    pair_row = torch.empty_like(rows).index_put_((order,), rows)
    pair_row = torch.where(valid.reshape(-1), pair_row, -1)

    tile_expert, tile_row = tile_table(bounds, num_rows, block_m)
    return DeviceRouting(row_pair, pair_row, bounds[: num_experts + 1], tile_expert, tile_row)


def tile_table(bounds: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_expert, tile_row) of M-tiles of height ``block_m`` over the row buckets ``bounds`` (int32 [E + 2]:
    E experts, then the dropped pairs, ending at ``num_rows``). A kernel may use its own tile height: the table
    for another height is a few small torch ops on the routing's offsets (``bounds_of``)."""
    num_experts = bounds.numel() - 2
    counts = (bounds[1:] - bounds[:-1]).to(torch.int64)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_ids = torch.arange(max_tiles(num_rows, num_experts, block_m), device=bounds.device, dtype=torch.int64)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    e = tile_expert.clamp(max=num_experts)
    tile_row = bounds[e].to(torch.int64) + (tile_ids - (tile_end[e] - tiles[e])) * block_m
    tile_expert = torch.where(tile_expert == num_experts, DROPPED, tile_expert)
    tile_expert = torch.where(tile_expert > num_experts, UNUSED, tile_expert).to(torch.int32)
    tile_row = torch.where(tile_expert == UNUSED, 0, tile_row).to(torch.int32)
    return tile_expert, tile_row


def bounds_of(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The row buckets of ``tile_table`` from a routing's expert offsets [E + 1] (the dropped pairs follow)."""
    return torch.cat([offsets, torch.full((1,), num_rows, dtype=offsets.dtype, device=offsets.device)])
