"""4-bit weights (bitsandbytes' storage, ``weights4bit.py``) read inside a kernel, and dequantized whole.

    load_4bit(...)[i] = code[c_i] · absmax[i // BLOCKSIZE]   in float32, 0 where masked
with c_i the high (i even) or low (i odd) nibble of packed[i // 2] and, NESTED, absmax[b] = code2[absmax_q[b]] ·
absmax2[b // BLOCKSIZE2] + offset: ``weights4bit.dequantize`` element for element. A GEMM's weight tile is such a
load over the flat indices of its elements, so no dequantized copy of the weight exists; the dequantize kernel
writes one (for saving or merging), rounded once to the output's dtype. Launch with ``enable_fp_fusion=False``
where the nested scale must match bitsandbytes bit for bit (its multiply and add are separately rounded).
``offset_ptr`` points to the nested scales' float32 offset (read only when NESTED).

``block`` (the elements' block indices) may have a smaller, broadcastable shape than ``index``: a GEMM tile that
lies inside one block along the weight's contiguous dimension needs one scale per row or column of the tile, not
one per element (``tile_blocks``). Scales loaded per element would be staged in shared memory at each pipeline
stage (four fp32 tiles per weight tile when nested: more than a Hopper SM has at four stages).
"""

import triton
import triton.language as tl


@triton.jit
def tile_blocks(at, base, k0, k, k_mask, col_mask, stride_k, K_CONTIG: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """(block indices, their mask) of a weight tile whose element (k, n) is at ``at[0, n] + k * stride_k`` (``base``
    = at[0, 0]): one per column when the reduction dimension is the contiguous one (K_CONTIG, stride_k = 1) and the
    tile's BLOCK_K rows lie in one block, one per row when the columns are contiguous and the tile's BLOCK_N columns
    lie in one block (k0 and the first column are multiples of BLOCK_K and BLOCK_N, the contiguous dimension a
    multiple of the block size), else one per element."""
    if K_CONTIG and BLOCKSIZE % BLOCK_K == 0:
        return (at + k0) // BLOCKSIZE, col_mask[None, :]
    elif (not K_CONTIG) and BLOCKSIZE % BLOCK_N == 0:
        return (base + k[:, None].to(tl.int64) * stride_k) // BLOCKSIZE, k_mask[:, None]
    else:
        return (at + k[:, None].to(tl.int64) * stride_k) // BLOCKSIZE, k_mask[:, None] & col_mask[None, :]


@triton.jit
def load_4bit(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, mask, block, block_mask,
              BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    byte = tl.load(packed_ptr + index // 2, mask=mask, other=0)
    nibble = tl.where(index % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
    value = tl.load(code_ptr + nibble)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=block_mask, other=0.0) \
            + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, NUMEL,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < NUMEL
    values = load_4bit(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, mask,
                       index // BLOCKSIZE, mask, BLOCKSIZE, NESTED, BLOCKSIZE2)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=mask)
