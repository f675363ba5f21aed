"""Stacked experts in bitsandbytes' 4-bit storage: the reference dequantization is bitsandbytes' own, bit for bit,
and the dequantize kernel (Triton's interpreter on CPU) gives the same bits."""

import bitsandbytes.functional as bnb
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 40, 72), (2, 5, 7)]  # the second: numel neither a multiple of the block size nor even


def _quantized(shape, dtype, quant_type, nested, blocksize, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
    w[0, 0, :3] = 0.0  # an all-zero start of a block and exact zeros among the values
    packed, state = bnb.quantize_4bit(w.to(DEVICE), blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=nested)
    return packed, state


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=["40x72", "5x7"])
def test_dequantize_is_bitsandbytes_bit_for_bit(kernel, shape, dtype, quant_type, nested):
    for seed, blocksize in ((0, 64), (1, 128)):
        packed, state = _quantized(shape, dtype, quant_type, nested, blocksize, seed)
        weight = kernel.weights4bit.from_bnb(packed, state)
        want = bnb.dequantize_4bit(packed, state)
        assert weight.nested == nested and weight.shape == shape and weight.dtype == dtype
        ref = kernel.weights4bit.dequantize(weight)
        assert ref.dtype == dtype and ref.shape == shape and torch.equal(ref, want)
        got = kernel.dequantize_4bit(weight)  # the kernel (interpreter on CPU): the same bits
        assert got.dtype == dtype and torch.equal(got, want), (seed, blocksize)
        assert want.abs().max() > 0 and (want == 0).any()


def test_inconsistent_storage_is_refused(kernel):
    packed, state = _quantized((2, 8, 64), torch.float32, "nf4", False, 64, 2)
    state.shape = torch.Size((2, 8, 128))  # a shape the bytes do not hold
    with pytest.raises(ValueError, match="inconsistent 4-bit storage"):
        kernel.weights4bit.from_bnb(packed, state)
    with pytest.raises(TypeError, match="uint8"):
        kernel.weights4bit.from_bnb(packed.view(torch.int8), state)
    with pytest.raises(TypeError, match="Weight4bit"):
        kernel.dequantize_4bit(packed)
