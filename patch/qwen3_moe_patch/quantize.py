"""QLoRA on Qwen3-MoE: the stacked experts in 4-bit (bitsandbytes' NF4/FP4 storage, read by the fused kernels),
the other linear layers as bitsandbytes ``Linear4bit``, quantized one module at a time.

    quantize_4bit(model, quantization_config)   in place: every experts weight becomes a frozen ``Tensor4bit``
                                                (same name, shape and dtype; bitsandbytes' ``quantize_4bit`` of
                                                it), every ``nn.Linear`` but the skipped ones a ``Linear4bit``
    dequantize_4bit(model)                      in place, back to dense experts weights (for a dense
                                                checkpoint, merging adapters, or the stock experts paths)

transformers' bitsandbytes integration replaces only ``nn.Linear`` modules, so with ``BitsAndBytesConfig(
load_in_4bit=True)`` the stacked experts (29.0 of Qwen3-30B-A3B's 30.5 B parameters) stay dense; this fills that
gap with the same settings (``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``llm_int8_skip_modules``,
block size 64 as transformers uses). Each weight is moved to ``device`` and quantized there on its own, so the
GPU never holds more than one dense weight: a model built on the meta device or on the CPU can be quantized
piece by piece (``presets.make_model_piecewise`` does that for the random-weight presets). Then PEFT LoRA and
``patch_qwen3_moe`` work as on the dense model; the fused kernels dequantize each 4-bit tile as they load it.

Checkpoints: the state dict of a quantized experts module holds its 4-bit weights as transformers writes a
bitsandbytes checkpoint of the per-expert model (transformers 4.x's layout, that of the bnb-4bit Qwen3-MoE
checkpoints people publish): one ``Linear4bit`` weight per expert and projection, ``experts.{e}.gate_proj.weight``,
``.up_proj.weight``, ``.down_proj.weight`` (packed bytes [n / 2, 1]), each with bitsandbytes'
``QuantState.as_dict(packed=True)`` entries beside it (``.absmax``, ``.quant_map``, ``.nested_absmax``,
``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``). Each expert's bytes and scales are slices of the
stacked storage, so bitsandbytes' ``dequantize_4bit`` of every entry is bit for bit that expert's rows. Nested
scales stay nested where each expert's blocks start a group of ``blocksize2`` (256) blocks (every real Qwen3-MoE
shape); otherwise (small test models) the entries carry their float32 scales, dequantized — the same values.
``save_pretrained`` writes these entries as they are (transformers' per-expert conversion passes them through),
and ``load_state_dict`` into a quantized model stacks them back: the same storage where nested scales could be
kept, the same values otherwise. ``dequantize_4bit`` first for a dense checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["dequantize_4bit", "quantize_4bit"]

_hooked = None  # experts module -> its state-dict hook handles (a WeakKeyDictionary, made on first use)

logger = logging.getLogger("qwen3_moe_patch")

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
BLOCKSIZE = 64  # transformers' Linear4bit block size (bitsandbytes' default)


def _settings(quantization_config):
    """(quant_type, nested, compute dtype, modules to skip) of a BitsAndBytesConfig (None: NF4, nested)."""
    import torch

    if quantization_config is None:
        return "nf4", True, None, ["lm_head"]
    if not getattr(quantization_config, "load_in_4bit", False):
        raise ValueError("quantize_4bit takes a BitsAndBytesConfig(load_in_4bit=True, ...); 8-bit experts are not "
                         "supported")
    storage = getattr(quantization_config, "bnb_4bit_quant_storage", torch.uint8)
    if isinstance(storage, str):
        storage = getattr(torch, storage)
    if storage != torch.uint8:
        raise ValueError(f"bnb_4bit_quant_storage={storage} is not supported for the experts: the fused kernels read "
                         "bitsandbytes' uint8 storage (leave it at its default, torch.uint8)")
    compute = quantization_config.bnb_4bit_compute_dtype
    skip = list(quantization_config.llm_int8_skip_modules or ["lm_head"])
    return quantization_config.bnb_4bit_quant_type, bool(quantization_config.bnb_4bit_use_double_quant), compute, skip


def bitsandbytes_module():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"4-bit experts need bitsandbytes ({err}): pip install 'qwen3-moe-fused-patch[qlora]' "
                          "(bitsandbytes 0.50)") from err
    return bitsandbytes


def _experts_modules(model):
    from .patch import base_experts, find_moe_blocks

    return [(name, base_experts(block)) for name, block in find_moe_blocks(model)]


def _check_not_adapted(model):
    from torch.nn.utils import parametrize

    for name, experts in _experts_modules(model):
        if experts is not None and any(parametrize.is_parametrized(experts, w) for w in EXPERT_WEIGHTS):
            raise ValueError(f"{name}.experts is parametrized (a LoRA forward in progress?): quantize the model "
                             "before adding adapters")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("the model already has LoRA adapters: quantize the base model first, then add them "
                         "(as QLoRA does), so that the adapters stay in the compute dtype")


def _quant_type(bnb, weight):
    """"nf4" or "fp4": the code book of a ``Weight4bit``."""
    import torch

    quant_type = next((q for q in ("nf4", "fp4") if torch.equal(
        bnb.functional.get_4bit_type(q, device=weight.code.device).float(), weight.code)), None)
    if quant_type is None:
        raise ValueError("a 4-bit experts weight whose code book is neither NF4 nor FP4 cannot be saved in "
                         "bitsandbytes' layout")
    return quant_type


def _quant_state(bnb, weight, quant_type):
    """bitsandbytes' ``QuantState`` of a ``Weight4bit`` with that code book (its own tensors, not copies)."""
    import torch

    state2 = bnb.functional.QuantState(absmax=weight.absmax2, code=weight.code2, blocksize=weight.blocksize2,
                                       dtype=torch.float32) if weight.nested else None
    return bnb.functional.QuantState(absmax=weight.absmax, shape=torch.Size(weight.shape), code=weight.code,
                                     blocksize=weight.blocksize, quant_type=quant_type, dtype=weight.dtype,
                                     offset=weight.offset, state2=state2)


def check_whole_blocks(what, shape, otherwise):
    """Refuse an experts weight whose rows do not hold whole 64-element blocks (the kernels read a row's blocks)."""
    if shape[-1] % BLOCKSIZE:
        raise ValueError(f"{what} {tuple(shape)}: 4-bit experts need its last dimension a multiple of {BLOCKSIZE} "
                         f"(every row holds whole blocks); {otherwise}")


def to_tensor4bit(dense, quant_type, nested):
    """The frozen ``Tensor4bit`` parameter of a dense experts weight: bitsandbytes' ``quantize_4bit`` of it on its
    device (block size 64, uint8 storage)."""
    import torch

    from .experts_interface import current_kernel

    kernel, bnb = current_kernel(), bitsandbytes_module()
    packed, state = bnb.functional.quantize_4bit(dense, blocksize=BLOCKSIZE, compress_statistics=nested,
                                                 quant_type=quant_type, quant_storage=torch.uint8)
    return torch.nn.Parameter(kernel.Tensor4bit(kernel.weights4bit.from_bnb(packed, state)), requires_grad=False)


PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}  # rows of each, in order


def _pieces(kernel, name, weight):
    """[(key under the experts module, the ``Weight4bit`` of that expert's projection)] of a stacked 4-bit weight:
    views of its bytes and scales (see the module docstring)."""
    E, N, K = weight.shape
    projections = PROJECTIONS[name]
    rows = N // len(projections)
    numel, blocks = rows * K, rows * K // weight.blocksize
    keep_nested = weight.nested and blocks % weight.blocksize2 == 0
    fp32_scales = kernel.weights4bit.scales(weight) if weight.nested and not keep_nested else None
    pieces = []
    for e in range(E):
        for j, projection in enumerate(projections):
            start = (e * len(projections) + j) * numel
            b0 = start // weight.blocksize
            packed = weight.packed[start // 2:(start + numel) // 2]
            if keep_nested:
                g0, groups = b0 // weight.blocksize2, blocks // weight.blocksize2
                piece = weight._replace(packed=packed, absmax=weight.absmax[b0:b0 + blocks], shape=(rows, K),
                                        absmax2=weight.absmax2[g0:g0 + groups])
            else:
                absmax = (weight.absmax if fp32_scales is None else fp32_scales)[b0:b0 + blocks]
                piece = weight._replace(packed=packed, absmax=absmax, shape=(rows, K), absmax2=None, code2=None,
                                        offset=None)
            pieces.append((f"{e}.{projection}.weight", piece))
    return pieces


def _stack(kernel, pieces, shape):
    """One stacked ``Weight4bit`` of ``shape`` from its per-expert pieces (``_pieces``' order): nested where every
    piece is, with one offset, code book and group size, and whole groups; else with float32 scales."""
    import torch

    first = pieces[0]
    if any(p.blocksize != first.blocksize or p.dtype != first.dtype or not torch.equal(p.code, first.code)
           for p in pieces):
        raise ValueError("the per-expert 4-bit entries of one stacked experts weight differ in block size, dtype or "
                         "code book; they cannot be stacked")
    packed = torch.cat([p.packed.reshape(-1) for p in pieces])
    nested = all(p.nested and p.blocksize2 == first.blocksize2 and torch.equal(p.offset, first.offset)
                 and torch.equal(p.code2, first.code2) and p.absmax.numel() % p.blocksize2 == 0 for p in pieces)
    if nested:
        return first._replace(packed=packed, absmax=torch.cat([p.absmax for p in pieces]), shape=tuple(shape),
                              absmax2=torch.cat([p.absmax2 for p in pieces]))
    if any(p.nested for p in pieces):
        logger.warning("qwen3-moe-fused: per-expert 4-bit entries with nested scales that cannot be stacked as "
                       "nested (different offsets or partial groups) are stacked with their float32 scales: the "
                       "same values, 4 bytes per block instead of 1")
    return first._replace(packed=packed, shape=tuple(shape), absmax2=None, code2=None, offset=None,
                          absmax=torch.cat([kernel.weights4bit.scales(p) for p in pieces]))


def _save_4bit(module, state_dict, prefix, local_metadata):
    """state-dict post-hook of an experts module: its 4-bit weights as per-expert bitsandbytes entries."""
    from .experts_interface import current_kernel

    kernel, bnb = current_kernel(), bitsandbytes_module()
    for name in EXPERT_WEIGHTS:
        value = state_dict.get(prefix + name)
        if isinstance(value, kernel.Tensor4bit):
            del state_dict[prefix + name]
            quant_type = _quant_type(bnb, value.weight4bit)  # once: it compares the book on the weight's device
            for key, piece in _pieces(kernel, name, value.weight4bit):
                state_dict[prefix + key] = piece.packed.detach().reshape(-1, 1)
                stats = _quant_state(bnb, piece, quant_type).as_dict(packed=True)
                for stat, item in stats.items():  # own copies: the pieces' code books would alias one tensor
                    state_dict[f"{prefix}{key}.{stat}"] = item.detach().clone()


def _load_4bit(module, state_dict, prefix, *args):
    """load-state-dict pre-hook of an experts module: its per-expert bitsandbytes entries stacked back into a
    ``Tensor4bit``, which ``copy_`` writes into the module's weight (entries of some experts only: an error)."""
    from .experts_interface import current_kernel

    kernel, bnb = current_kernel(), bitsandbytes_module()
    for name, projections in PROJECTIONS.items():
        shape = getattr(module, name).shape
        keys = [f"{prefix}{e}.{projection}.weight" for e in range(shape[0]) for projection in projections]
        found = [key for key in keys if key in state_dict]
        if not found:
            continue
        if len(found) != len(keys):
            missing = sorted(set(keys) - set(found))
            raise ValueError(f"{prefix}{name}: the checkpoint has 4-bit entries for some experts only (missing "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''}); a stacked weight needs all of them")
        pieces = []
        for key in keys:
            stats = {k[len(key) + 1:]: k for k in state_dict if k.startswith(key + ".")}
            state = bnb.functional.QuantState.from_dict({k: state_dict.pop(full) for k, full in stats.items()},
                                                        device=state_dict[key].device)
            pieces.append(kernel.weights4bit.from_bnb(state_dict.pop(key), state))
        state_dict[prefix + name] = kernel.Tensor4bit(_stack(kernel, pieces, shape))


def _hook(experts):
    """Give an experts module the 4-bit state-dict hooks (once)."""
    global _hooked
    import weakref

    if _hooked is None:
        _hooked = weakref.WeakKeyDictionary()
    if experts not in _hooked:
        _hooked[experts] = (experts.register_state_dict_post_hook(_save_4bit),
                            experts.register_load_state_dict_pre_hook(_load_4bit))


def quantize_4bit(model: nn.Module, quantization_config=None, *, device=None) -> nn.Module:
    """Quantize ``model`` in place (see the module docstring) on ``device`` (default: CUDA if available, else the
    weights' own device) and return it. Weights already in 4-bit are left as they are; the dense ones are freed
    as soon as their 4-bit form exists."""
    import torch
    from torch import nn

    from .experts_interface import current_kernel

    bnb = bitsandbytes_module()
    quant_type, nested, compute_dtype, skip = _settings(quantization_config)
    _check_not_adapted(model)
    kernel = current_kernel()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    todo = [(experts, weight_name) for _, experts in _experts_modules(model) for weight_name in EXPERT_WEIGHTS
            if not isinstance(getattr(experts, weight_name), kernel.Tensor4bit)]
    for experts, weight_name in todo:  # checked before anything changes
        check_whole_blocks(f"experts weight {weight_name}", getattr(experts, weight_name).shape,
                           "this model cannot be quantized")
    experts_count = linear_count = 0
    for experts, weight_name in todo:
        weight = getattr(experts, weight_name)
        dense = weight.detach().to(device or weight.device)
        del weight
        setattr(experts, weight_name, to_tensor4bit(dense, quant_type, nested))
        del dense
        _hook(experts)
        experts_count += 1
    for name, module in list(model.named_modules()):
        if not name or type(module) is not nn.Linear or any(name == s or name.endswith(f".{s}") for s in skip):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                compute_dtype=compute_dtype or module.weight.dtype, compress_statistics=nested,
                                quant_type=quant_type, quant_storage=torch.uint8, device="meta")
        target = device or module.weight.device
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=nested,
                                       quant_type=quant_type, blocksize=BLOCKSIZE, quant_storage=torch.uint8,
                                       module=new).to(target)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.data.to(target), requires_grad=module.bias.requires_grad)
        new.train(module.training)
        setattr(parent, name.rpartition(".")[2], new)
        linear_count += 1
    if experts_count == 0 and linear_count == 0:
        logger.warning("qwen3-moe-fused: quantize_4bit found nothing to quantize in %s", type(model).__name__)
    return model


def dequantize_4bit(model: nn.Module) -> nn.Module:
    """Make every 4-bit experts weight of ``model`` dense again, in place (its dtype, its device; bit for bit
    bitsandbytes' ``dequantize_4bit``). ``Linear4bit`` layers are bitsandbytes' own and stay as they are."""
    from torch import nn

    from .experts_interface import current_kernel

    kernel = current_kernel()
    _check_not_adapted(model)
    for _, experts in _experts_modules(model):
        for weight_name in EXPERT_WEIGHTS:
            weight = getattr(experts, weight_name)
            if isinstance(weight, kernel.Tensor4bit):
                setattr(experts, weight_name, nn.Parameter(kernel.dequantize_4bit(weight.weight4bit),
                                                           requires_grad=False))
        if _hooked is not None and experts in _hooked:
            for handle in _hooked.pop(experts):
                handle.remove()
    return model
