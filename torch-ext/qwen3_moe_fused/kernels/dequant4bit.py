"""4-bit weights (bitsandbytes' storage, ``weights4bit.py``) read inside a kernel, and dequantized whole.

    w[i] = code[c_i] · absmax[i // BLOCKSIZE]   in float32
with i the flat index of the element, c_i the high (i even) or low (i odd) nibble of packed[i // 2] and, NESTED,
absmax[b] = code2[absmax_q[b]] · absmax2[b // BLOCKSIZE2] + offset: ``weights4bit.dequantize`` element for element.
Launch with ``enable_fp_fusion=False`` where the nested scale must match bitsandbytes bit for bit (its multiply and
add are separately rounded). ``offset_ptr`` points to the nested scales' float32 offset (read only when NESTED).

``load_4bit_tile`` is how a GEMM reads its weight tile: the packed bytes of the tile as a 2-D tile along the
weight's contiguous dimension (16-byte aligned rows: vectorised, pipelined loads, one byte per two elements),
decoded in registers, and one scale per tile row where the tile's columns lie inside one block; no dequantized copy
of the weight exists. On the GPU the code book is looked up by byte permutes (``_decode_bytes``: ~7 instructions
per element, exact float32 values); the interpreter, which runs no PTX, uses a tree of selects (``_code_value``)
that computes the same values. ``dequantize_4bit_kernel`` writes one (for saving or merging), rounded once to the
output's dtype, element by element (any numel).
"""

import os

import triton
import triton.language as tl

_PERMUTES = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")  # inline PTX: not in the interpreter


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
    """code[nibbles] (float32) by a tree of selects over the book's 16 entries, in registers (the interpreter's
    decoding; a gather from the book in memory would be software-pipelined like a tile load, one 4-byte asynchronous
    copy per element)."""
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


def _nibble_lookup(plane, lut_at):
    """PTX computing, into ``$plane``, byte ``plane`` of the code-book entries of the 4 nibbles whose indices are
    in ``s7`` (3 low bits per nibble) and ``sel`` (which half of the book)."""
    a, b, c, d = (lut_at + 4 * (4 * plane + q) for q in range(4))
    return (f"prmt.b32 r0, ${a}, ${b}, s7; prmt.b32 r1, ${c}, ${d}, s7; prmt.b32 q{plane}, r0, r1, sel; ")


def _nibbles_to_floats(outputs, lut_at):
    """PTX decoding the 4 nibbles in ``x`` (one in the low 4 bits of each byte) into 4 float32 bit patterns."""
    # s: the nibbles of bytes 0, 2, 1, 3 as 4 hex digits (prmt reads one selector digit per output byte)
    asm = "shr.b32 s, x, 12; or.b32 s, s, x; and.b32 s7, s, 0x7777; shr.b32 sel, s, 1; and.b32 sel, sel, 0x4444; " \
          "or.b32 sel, sel, 0x3210; "
    asm += "".join(_nibble_lookup(plane, lut_at) for plane in range(4))
    # q{p} holds byte p of the 4 values (in the order 0, 2, 1, 3): transpose the 4x4 bytes
    asm += "prmt.b32 t0, q0, q1, 0x5140; prmt.b32 t1, q0, q1, 0x7362; prmt.b32 t2, q2, q3, 0x5140; " \
           "prmt.b32 t3, q2, q3, 0x7362; "
    o = outputs
    return asm + (f"prmt.b32 ${o}, t0, t2, 0x5410; prmt.b32 ${o + 1}, t1, t3, 0x5410; "
                  f"prmt.b32 ${o + 2}, t0, t2, 0x7632; prmt.b32 ${o + 3}, t1, t3, 0x7632; ")


# 4 packed bytes ($8) -> the values of their high nibbles ($0-$3) and low nibbles ($4-$7); the book's 16 float32
# entries as 16 byte planes (byte p of entries 4q..4q+3 in operand $(9 + 4 (4p + q)): packed 4 to a call, each
# broadcast operand takes 4)
_DECODE_PTX = tl.constexpr(
    "{ .reg .b32 x, s, s7, sel, r0, r1, q0, q1, q2, q3, t0, t1, t2, t3; "
    "shr.b32 x, $8, 4; and.b32 x, x, 0x0F0F0F0F; " + _nibbles_to_floats(0, 9) +
    "and.b32 x, $8, 0x0F0F0F0F; " + _nibbles_to_floats(4, 9) + "}")


@triton.jit
def _plane(code_ptr, p: tl.constexpr, q: tl.constexpr):
    """Byte p of the float32 entries 4q..4q+3 of the code book, as the 4 bytes of an int32."""
    plane = (tl.load(code_ptr + 4 * q).to(tl.int32, bitcast=True) >> (8 * p)) & 255
    for r in tl.static_range(1, 4):
        plane |= ((tl.load(code_ptr + 4 * q + r).to(tl.int32, bitcast=True) >> (8 * p)) & 255) << (8 * r)
    return plane


@triton.jit
def _decode_bytes(code_ptr, packed):
    """(code[packed >> 4], code[packed & 15]) in float32, exactly, by byte permutes (``_DECODE_PTX``)."""
    return tl.inline_asm_elementwise(
        _DECODE_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r" + ",r" * 64,
        [packed, _plane(code_ptr, 0, 0), _plane(code_ptr, 0, 1), _plane(code_ptr, 0, 2), _plane(code_ptr, 0, 3),
         _plane(code_ptr, 1, 0), _plane(code_ptr, 1, 1), _plane(code_ptr, 1, 2), _plane(code_ptr, 1, 3),
         _plane(code_ptr, 2, 0), _plane(code_ptr, 2, 1), _plane(code_ptr, 2, 2), _plane(code_ptr, 2, 3),
         _plane(code_ptr, 3, 0), _plane(code_ptr, 3, 1), _plane(code_ptr, 3, 2), _plane(code_ptr, 3, 3)],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def load_4bit_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_at, row_mask, c0,
                   C_TOTAL, R: tl.constexpr, C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   BLOCKSIZE2: tl.constexpr):
    """The tile w[row r][c0 + c] (r < R, c < C) in float32, 0 where masked: the tile's rows run along a strided
    dimension of the weight (row r starts at flat element offset ``row_at[r]``, int64, a multiple of 32) and its C
    columns along the contiguous one (C_TOTAL long, a multiple of BLOCKSIZE; c0 a multiple of C). A row's C columns
    lie in one block when C divides BLOCKSIZE: one scale per row; else one per element."""
    tl.static_assert(C >= 32, "a 4-bit tile row is at least 16 bytes")
    ONE_BLOCK: tl.constexpr = BLOCKSIZE % C == 0  # then C divides C_TOTAL: no column is out of range
    j = tl.arange(0, C // 2)
    row_byte = tl.multiple_of(row_at // 2 + c0 // 2, 16)
    if ONE_BLOCK:
        byte_mask = tl.broadcast_to(row_mask[:, None], (R, C // 2))  # constant along a row: vectorised loads
    else:
        byte_mask = row_mask[:, None] & (c0 + 2 * j < C_TOTAL)[None, :]
    packed = tl.load(packed_ptr + (row_byte[:, None] + j[None, :]), mask=byte_mask, other=0)
    if _PERMUTES:
        high, low = _decode_bytes(code_ptr, packed)
    else:
        high, low = _code_value(code_ptr, packed >> 4), _code_value(code_ptr, packed & 15)
    values = tl.reshape(tl.join(high, low), (R, C))  # element 2j: the high nibble of byte j
    if ONE_BLOCK:  # masked rows get scale 0 (their codes are those of byte 0: finite)
        scale = _scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, (row_at + c0) // BLOCKSIZE, row_mask, NESTED,
                       BLOCKSIZE2)
        return values * scale[:, None]
    c = c0 + tl.arange(0, C)
    mask = row_mask[:, None] & (c < C_TOTAL)[None, :]
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
