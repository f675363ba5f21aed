"""4-bit weights (bitsandbytes' storage, ``weights4bit.py``) read inside a kernel, and dequantized whole.

    load_4bit(...)[i] = code[c_i] · absmax[i // BLOCKSIZE]   in float32, 0 where masked
with c_i the high (i even) or low (i odd) nibble of packed[i // 2] and, NESTED, absmax[b] = code2[absmax_q[b]] ·
absmax2[b // BLOCKSIZE2] + offset: ``weights4bit.dequantize`` element for element. A GEMM's weight tile is such a
load over the flat indices of its elements, so no dequantized copy of the weight exists; the dequantize kernel
writes one (for saving or merging), rounded once to the output's dtype. Launch with ``enable_fp_fusion=False``
where the nested scale must match bitsandbytes bit for bit (its multiply and add are separately rounded).
``offset_ptr`` points to the nested scales' float32 offset (read only when NESTED).
"""

import triton
import triton.language as tl


@triton.jit
def load_4bit(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, mask,
              BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    byte = tl.load(packed_ptr + index // 2, mask=mask, other=0)
    nibble = tl.where(index % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
    value = tl.load(code_ptr + nibble)
    block = index // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0) \
            + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, NUMEL,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < NUMEL
    values = load_4bit(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, mask, BLOCKSIZE,
                       NESTED, BLOCKSIZE2)
    tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=mask)
