"""Stacked experts weights in bitsandbytes' 4-bit format, and their dequantization: the spec of the 4-bit path.

bitsandbytes' ``quantize_4bit`` (NF4 or FP4) of a weight, e.g. ``gate_up_proj [E, 2I, H]``, flattens it
row-major: element i has the 4-bit code ``packed[i // 2] >> 4`` (i even) or ``packed[i // 2] & 15`` (i odd) and
the scale ``absmax[i // blocksize]``; its value is ``code[c] · absmax`` in float32, rounded once to the weight's
dtype. With nested statistics (``compress_statistics=True``) absmax is itself 8-bit blockwise:
``absmax[b] = code2[absmax_q[b]] · absmax2[b // blocksize2] + offset``, in float32. ``dequantize`` computes
exactly that (bit for bit what ``bitsandbytes.functional.dequantize_4bit`` gives, tested); the kernels read
the same storage and compute the same values (``kernels/dequant4bit.py``). bitsandbytes is not needed here:
``from_bnb`` reads its tensors and ``QuantState`` as they are.

``Tensor4bit`` holds a ``Weight4bit`` as a frozen parameter of a model: it has the dense weight's shape, dtype and
device, so the experts module keeps its parameter names and PEFT's LoRA on parameters sees the weight's shape; the
fused experts read its 4-bit storage; any other torch op gets the dequantized weight (a dense copy, said once).
"""

import logging
from typing import NamedTuple

import torch
from torch.utils._pytree import tree_map

__all__ = ["Tensor4bit", "Weight4bit", "dequantize", "from_bnb", "scales", "stacked"]

_logger = logging.getLogger(__name__)
_said = set()


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
    if weight.blocksize % 32:  # the kernels load each row's bytes as 16-byte aligned vectors
        raise ValueError(f"4-bit experts need a block size that is a multiple of 32 (bitsandbytes' 32 to 4096), got "
                         f"{weight.blocksize}")
    if K % 2 or K % weight.blocksize:
        raise ValueError(f"4-bit experts need the weights' last dimension ({K}) even and a multiple of the block size "
                         f"({weight.blocksize}), so that each row holds whole bytes and blocks")
    return weight.packed.view(E, N, K // 2), weight.absmax.view(E, N, K // weight.blocksize)


_FIELDS = ("packed", "absmax", "code", "absmax2", "code2", "offset")


def _loadable(weight, other) -> bool:
    """Whether ``other`` is a ``Tensor4bit`` of the same weight (shape, dtype, block size; neither carrying a
    LoRA term): what ``copy_`` (``load_state_dict``) may write into ``weight``."""
    if not isinstance(other, Tensor4bit) or weight.lora is not None or other.lora is not None:
        return False
    a, b = weight.weight4bit, other.weight4bit
    return (tuple(a.shape), a.dtype, a.blocksize) == (tuple(b.shape), b.dtype, b.blocksize)


def _same_layout(weight, other) -> bool:
    """Whether ``other`` (``_loadable``) stores its scales as ``weight`` does (nesting, group size, dtype)."""
    a, b = weight.weight4bit, other.weight4bit
    return (a.blocksize2, a.nested, a.absmax.dtype) == (b.blocksize2, b.nested, b.absmax.dtype)


_aten = torch.ops.aten


class Tensor4bit(torch.Tensor):
    """A frozen stacked weight in 4-bit storage (``weight4bit``) standing in for the dense weight: its shape, dtype
    and device are the dense weight's, so ``nn.Parameter(Tensor4bit(w), requires_grad=False)`` replaces a
    parameter without changing its name, shape or dtype.

    - ``moe_experts`` (the fused kernels) reads the 4-bit storage directly; nothing dense is formed.
    - ``.to(device)`` / ``.to(dtype)`` move the storage or change the dtype it dequantizes to; detach, alias and
      clone keep it 4-bit.
    - ``W.baddbmm(lhs, rhs, alpha=s)`` (PEFT's single-adapter LoRA parametrization, which torch evaluates whenever
      PEFT registers it) gives a ``Tensor4bit`` carrying ``W + s·lhs·rhs`` unevaluated (``lora``); the fused
      experts use PEFT's factors themselves.
    - ``copy_`` from a ``Tensor4bit`` of the same weight (shape, dtype, block size) replaces its storage with the
      source's (``load_state_dict``), in place where the scales are stored alike; other in-place writes are
      refused: 4-bit weights are frozen.
    - Any other op computes on the dequantized weight (plus its LoRA term): correct, but a dense copy of the
      weight, said once per op.
    """

    weight4bit: Weight4bit
    lora: tuple | None

    @staticmethod
    def __new__(cls, weight: Weight4bit, lora=None):
        return torch.Tensor._make_wrapper_subclass(cls, weight.shape, dtype=weight.dtype, device=weight.device,
                                                   requires_grad=False)

    def __init__(self, weight: Weight4bit, lora=None):
        self.weight4bit = weight
        self.lora = lora

    def __repr__(self, *, tensor_contents=None):
        w = self.weight4bit
        code = "nf4" if w.code.min() < -0.9 and w.code.max() > 0.99 and (w.code == 0).sum() == 1 else "fp4"
        return (f"Tensor4bit(shape={tuple(w.shape)}, dtype={w.dtype}, device={w.device}, {code}, blocksize "
                f"{w.blocksize}{', nested' if w.nested else ''}{', + LoRA' if self.lora else ''})")

    def __tensor_flatten__(self):
        w = self.weight4bit
        names = [f for f in _FIELDS if getattr(w, f) is not None]
        lora = None
        if self.lora is not None:
            names += ["lora_lhs", "lora_rhs"]
            lora = self.lora[2]
        return names, (w.shape, w.dtype, w.blocksize, w.blocksize2, lora)

    def __getattr__(self, name):  # the flattened inner tensors by name (torch's subclass protocol)
        if name.startswith("lora_") and name[5:] in ("lhs", "rhs"):
            return self.lora[0 if name == "lora_lhs" else 1]
        if name in _FIELDS:
            return getattr(self.weight4bit, name)
        raise AttributeError(name)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        shape, dtype, blocksize, blocksize2, alpha = meta
        weight = Weight4bit(inner["packed"], inner["absmax"], inner["code"], shape, dtype, blocksize,
                            inner.get("absmax2"), inner.get("code2"), inner.get("offset"), blocksize2)
        lora = (inner["lora_lhs"], inner["lora_rhs"], alpha) if "lora_lhs" in inner else None
        return Tensor4bit(weight, lora)

    def _map(self, fn, dtype=None):
        """The same weight with ``fn`` applied to every tensor of its storage (and LoRA term)."""
        w = self.weight4bit
        moved = {f: fn(getattr(w, f)) for f in _FIELDS if getattr(w, f) is not None}
        weight = w._replace(**moved, dtype=dtype or w.dtype)
        lora = None if self.lora is None else (fn(self.lora[0]), fn(self.lora[1]), self.lora[2])
        return Tensor4bit(weight, lora)

    def dense(self) -> torch.Tensor:
        """The weight it holds (plus its LoRA term), as a dense tensor: a full copy."""
        from .functional import dequantize_4bit  # the kernel on CUDA, else the reference: the same bits

        weight = dequantize_4bit(self.weight4bit)
        if self.lora is not None:
            lhs, rhs, alpha = self.lora
            weight = torch.baddbmm(weight, lhs, rhs, alpha=alpha)
        return weight

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args else None
        if func in (_aten.detach.default, _aten.alias.default):
            return self._map(lambda t: t)
        if func is _aten.clone.default:
            return self._map(torch.clone)
        if func is _aten._to_copy.default and isinstance(self, Tensor4bit):
            dtype, device = kwargs.get("dtype"), kwargs.get("device")
            if dtype is None or dtype.is_floating_point:
                return self._map(lambda t: t if device is None else t.to(device, non_blocking=kwargs.get(
                    "non_blocking", False)), dtype=dtype)
        if func is _aten.set_.source_Tensor and args[1] is self:  # parametrize re-registering the same tensor
            return self
        if func is _aten.baddbmm.default and isinstance(self, Tensor4bit) and self.lora is None \
                and kwargs.get("beta", 1) == 1 and not any(isinstance(a, Tensor4bit) for a in args[1:]):
            alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
            return Tensor4bit(self.weight4bit, (args[1], args[2], alpha))
        if func is _aten.copy_.default and isinstance(self, Tensor4bit) and _loadable(self, args[1]):
            source = args[1].weight4bit  # loading a state dict into a 4-bit model: its storage, bit for bit
            if _same_layout(self, args[1]):
                for field in _FIELDS:
                    if getattr(self.weight4bit, field) is not None:
                        getattr(self.weight4bit, field).copy_(getattr(source, field))
            else:  # the same weight with its scales stored otherwise (float32 or nested): the source's storage
                self.weight4bit = source._replace(**{f: getattr(source, f).to(self.device, copy=True)
                                                     for f in _FIELDS if getattr(source, f) is not None})
            return self
        if func._schema.is_mutable and any(isinstance(a, Tensor4bit) for a in args[:1]):
            raise RuntimeError(f"{func.name()} would write into a 4-bit weight ({self!r}); 4-bit experts are frozen: "
                               "train LoRA on them, or dequantize the model first (qwen3_moe_patch.dequantize_4bit)")
        if func.name() not in _said:
            _said.add(func.name())
            _logger.warning("qwen3-moe-fused: %s on a 4-bit weight computes on its dequantized copy (a dense "
                            "tensor of the weight's size); the fused experts read the 4-bit storage directly",
                            func.name())
        unwrap = lambda t: t.dense() if isinstance(t, Tensor4bit) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
