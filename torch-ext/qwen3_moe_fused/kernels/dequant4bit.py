"""4-bit weights (bitsandbytes' storage, ``weights4bit.py``) read inside a kernel, and dequantized whole.

    w[i] = code[c_i] · absmax[i // BLOCKSIZE]   in float32
with i the flat index of the element, c_i the high (i even) or low (i odd) nibble of packed[i // 2] and, NESTED,
absmax[b] = code2[absmax_q[b]] · absmax2[b // BLOCKSIZE2] + offset: ``weights4bit.dequantize`` element for element.
Launch with ``enable_fp_fusion=False`` where the nested scale must match bitsandbytes bit for bit (its multiply and
add are separately rounded). ``offset_ptr`` points to the nested scales' float32 offset (read only when NESTED).

``load_4bit_tile`` is how a GEMM reads its weight tile: the packed bytes of the tile as a 2-D tile along the
weight's contiguous dimension (coalesced, vectorised loads, one byte per two elements), split into nibbles in
registers and decoded there (a select tree over the code book), and one scale per tile row where the tile's columns
lie inside one block; no dequantized copy of the weight exists. ``dequantize_4bit_kernel`` writes one (for saving or merging), rounded once to the output's dtype,
element by element (any numel).
"""

import triton
import triton.language as tl


@triton.jit
def _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr,
           BLOCKSIZE2: tl.constexpr):
    """absmax of the blocks ``block`` (float32; 0 where masked)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0) \
            + tl.load(offset_ptr)
        scale = tl.where(mask, scale, 0.0)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _code_value(code_ptr, nibbles):
    """code[nibbles] (float32) by a tree of selects over the book's 16 entries, in registers: a gather from the
    book in memory would be software-pipelined like a tile load, one 4-byte asynchronous copy per element."""
    b0, b1, b2, b3 = (nibbles & 1) != 0, (nibbles & 2) != 0, (nibbles & 4) != 0, (nibbles & 8) != 0
    low = tl.where(b2, tl.where(b1, tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6)),
                                tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))),
                   tl.where(b1, tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2)),
                            tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))))
    high = tl.where(b2, tl.where(b1, tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14)),
                                 tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))),
                    tl.where(b1, tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10)),
                             tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))))
    return tl.where(b3, high, low)


@triton.jit
def load_4bit_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_at, row_mask, c0,
                   C_TOTAL, R: tl.constexpr, C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   BLOCKSIZE2: tl.constexpr):
    """The tile w[row r][c0 + c] (r < R, c < C) in float32, 0 where masked: the tile's rows run along a strided
    dimension of the weight (row r starts at flat element offset ``row_at[r]``, int64, even) and its C columns
    along the contiguous one (C_TOTAL long, c0 a multiple of C). A row's C columns lie in one block when C
    divides BLOCKSIZE (C_TOTAL a multiple of BLOCKSIZE): one scale per row; else one per element."""
    j = tl.arange(0, C // 2)
    byte_mask = row_mask[:, None] & (c0 + 2 * j < C_TOTAL)[None, :]
    packed = tl.load(packed_ptr + (row_at[:, None] // 2 + c0 // 2 + j[None, :]), mask=byte_mask, other=0)
    nibbles = tl.reshape(tl.join(packed >> 4, packed & 15), (R, C))  # element 2j: high nibble of byte j
    values = _code_value(code_ptr, nibbles)
    c = c0 + tl.arange(0, C)
    mask = row_mask[:, None] & (c < C_TOTAL)[None, :]
    if BLOCKSIZE % C == 0:
        scale = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (row_at + c0) // BLOCKSIZE, row_mask, NESTED,
                       BLOCKSIZE2)[:, None]
    else:
        scale = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (row_at[:, None] + c[None, :]) // BLOCKSIZE,
                       mask, NESTED, BLOCKSIZE2)
    return tl.where(mask, values * scale, 0.0)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, NUMEL,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           BLOCK: tl.constexpr):
    """out = the whole weight, flat, BLOCK elements a program (any NUMEL: odd, or not whole blocks)."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < NUMEL
    byte = tl.load(packed_ptr + index // 2, mask=mask, other=0)
    values = tl.load(code_ptr + tl.where(index % 2 == 0, byte >> 4, byte & 15).to(tl.int32))
    scale = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, index // BLOCKSIZE, mask, NESTED, BLOCKSIZE2)
    tl.store(out_ptr + index, (values * scale).to(out_ptr.dtype.element_ty), mask=mask)
