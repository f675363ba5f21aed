"""Stacked experts weights in bitsandbytes' 4-bit format, and their dequantization: the spec of the 4-bit path.

bitsandbytes' ``quantize_4bit`` (NF4 or FP4) of a weight, e.g. ``gate_up_proj [E, 2I, H]``, flattens it
row-major: element i has the 4-bit code ``packed[i // 2] >> 4`` (i even) or ``packed[i // 2] & 15`` (i odd) and
the scale ``absmax[i // blocksize]``; its value is ``code[c] · absmax`` in float32, rounded once to the weight's
dtype. With nested statistics (``compress_statistics=True``) absmax is itself 8-bit blockwise:
``absmax[b] = code2[absmax_q[b]] · absmax2[b // blocksize2] + offset``, in float32. ``dequantize`` computes
exactly that (bit for bit what ``bitsandbytes.functional.dequantize_4bit`` gives, tested); the kernels read
the same storage and compute the same values (``kernels/dequant4bit.py``). bitsandbytes is not needed here:
``from_bnb`` reads its tensors and ``QuantState`` as they are.
"""

from typing import NamedTuple

import torch

__all__ = ["Weight4bit", "dequantize", "from_bnb", "scales", "stacked"]


class Weight4bit(NamedTuple):
    """One stacked weight in bitsandbytes' 4-bit storage (the tensors are bitsandbytes' own, not copies)."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]: two codes per byte, the even element in the high nibble
    absmax: torch.Tensor  # float32 [blocks]; uint8 [blocks] when nested
    code: torch.Tensor  # float32 [16]: the NF4 or FP4 code book
    shape: tuple  # the weight's shape, e.g. (E, 2I, H)
    dtype: torch.dtype  # the weight's dtype: what dequantization rounds to
    blocksize: int = 64
    absmax2: torch.Tensor | None = None  # nested: float32 [ceil(blocks / blocksize2)]
    code2: torch.Tensor | None = None  # nested: float32 [256]
    offset: torch.Tensor | None = None  # nested: float32 [] added to every dequantized absmax
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def from_bnb(packed: torch.Tensor, quant_state) -> Weight4bit:
    """The storage of ``bitsandbytes.functional.quantize_4bit(weight)``'s ``(packed, quant_state)`` (uint8 storage)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"4-bit experts need bitsandbytes' uint8 quant_storage, got {packed.dtype}")
    nested = getattr(quant_state, "nested", False)
    state2 = quant_state.state2 if nested else None
    weight = Weight4bit(
        packed=packed.reshape(-1), absmax=quant_state.absmax, code=quant_state.code.float(),
        shape=tuple(quant_state.shape), dtype=quant_state.dtype, blocksize=int(quant_state.blocksize),
        absmax2=state2.absmax if nested else None, code2=state2.code.float() if nested else None,
        offset=quant_state.offset.float().reshape(()) if nested else None,
        blocksize2=int(state2.blocksize) if nested else 256,
    )
    blocks = -(-weight.numel // weight.blocksize)
    if weight.packed.numel() != -(-weight.numel // 2) or weight.absmax.numel() != blocks or weight.code.numel() != 16:
        raise ValueError(f"inconsistent 4-bit storage for shape {weight.shape}: {weight.packed.numel()} bytes, "
                         f"{weight.absmax.numel()} scales of {weight.blocksize}, a code book of {weight.code.numel()}")
    return weight


def scales(weight: Weight4bit) -> torch.Tensor:
    """float32 [blocks]: every block's absmax (dequantized when nested)."""
    if not weight.nested:
        return weight.absmax
    q = weight.absmax.reshape(-1).long()
    blocks = torch.arange(q.numel(), device=q.device) // weight.blocksize2
    return weight.code2[q] * weight.absmax2[blocks] + weight.offset


def dequantize(weight: Weight4bit) -> torch.Tensor:
    """The weight, shaped and typed as it was quantized."""
    n = weight.numel
    codes = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1)[:n].long()
    index = torch.arange(n, device=weight.packed.device)
    values = weight.code[codes] * scales(weight)[index // weight.blocksize]
    return values.reshape(weight.shape).to(weight.dtype)


def stacked(weight: Weight4bit) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed [E, N, K // 2], absmax [E, N, K // blocksize]): views of a stacked weight [E, N, K] in which every
    row holds its own bytes and blocks (K even and a multiple of the block size), as the grouped kernels read it."""
    if len(weight.shape) != 3:
        raise ValueError(f"a stacked experts weight is [E, N, K], got shape {weight.shape}")
    E, N, K = weight.shape
    if K % 2 or K % weight.blocksize:
        raise ValueError(f"4-bit experts need the weights' last dimension ({K}) even and a multiple of the block size "
                         f"({weight.blocksize}), so that each row holds whole bytes and blocks")
    return weight.packed.view(E, N, K // 2), weight.absmax.view(E, N, K // weight.blocksize)
