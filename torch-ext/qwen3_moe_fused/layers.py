"""Layers for ``kernels.kernelize``, and the experts function transformers' experts dispatch runs.

kernelize replaces ``forward`` of each host module with the layer's ``forward`` (``self`` is the host module),
so a layer has no ``__init__``, no members beyond ``forward``/``has_backward``/``can_torch_compile``, and a
``forward`` with the host's arity. Helpers live at module level.

Two layers, one per host module:

- ``Qwen3MoeSparseMoeBlock``: the MoE block. It calls its router and its experts *as modules* (``self.gate(...)``,
  ``self.experts(...)``), so every hook an engine put on them fires: FSDP2 unit hooks, DeepSpeed ZeRO-3's
  parameter fetch, transformers' TP/EP experts forwards (which hand the experts their local weights and local
  expert ids), accelerate hooks, transformers' router-logit recorder.
- ``Qwen3MoeExperts``: the experts module (``@use_experts_implementation`` classes with stacked SwiGLU experts).
  Its forward is the fused computation on the module's own weights (with PEFT's LoRA factors when PEFT
  parametrizes them). It is what transformers' experts implementation "qwen3_moe_fused" runs (the plugin
  registers it), so under TP/EP it runs inside the engine's experts forward, on local shards and local ids.

PEFT's LoRA on the experts weights (``target_parameters``) registers a parametrization on each weight at every
forward, and torch's ``register_parametrization`` evaluates it once on the spot (W + s·B·A: a weight-sized
``baddbmm`` and copy, 1.5 ms a layer at Qwen3-30B-A3B's shapes) only to check its shape and dtype. The fused
experts never read that sum, so the block calls PEFT-wrapped experts under ``_LoraCheckStandIn``, which answers
that one evaluation per weight with a stand-in of the weight's shape and dtype and ends before the experts
forward starts.
"""

import logging
import os
import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from .functional import ExpertsLora, moe_experts

__all__ = ["Qwen3MoeExperts", "Qwen3MoeSparseMoeBlock", "call_experts", "check_experts_layout"]

_logger = logging.getLogger(__name__)
_said = set()

# What ``@use_experts_implementation`` sets on an experts module, and the values this kernel computes.
_REQUIRED_LAYOUT = (("has_gate", True), ("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                    ("has_post_expert_norm", False))


def check_experts_layout(experts) -> None:
    """Raise ``NotImplementedError`` unless ``experts`` holds stacked SwiGLU experts: ``gate_up_proj [E, 2I, H]``
    with gate rows first, ``down_proj [E, H, I]``, SiLU, no bias."""
    wrong = [f"{flag}={getattr(experts, flag)}" for flag, want in _REQUIRED_LAYOUT if getattr(experts, flag, want) != want]
    act = type(getattr(experts, "act_fn", None)).__name__
    if act not in ("SiLUActivation", "SiLU"):
        wrong.append(f"act_fn={act}")
    if wrong:
        raise NotImplementedError(
            f"qwen3-moe-fused computes stacked SwiGLU experts (gate_up_proj [E, 2I, H] with gate rows first, "
            f"down_proj [E, H, I], SiLU, no bias); {type(experts).__name__} has {', '.join(wrong)}: choose another "
            "experts_implementation for this model"
        )


def _say_once(key, message, *args):
    if key not in _said:
        _said.add(key)
        _logger.warning(message, *args)


class _LoraCheckStandIn(torch.overrides.TorchFunctionMode):
    """From the block's call of PEFT-wrapped experts until their forward starts (``end()``): the first
    ``torch.baddbmm`` on each of ``weights`` made inside torch's parametrization check (``ParametrizationList``'s
    ``__init__`` evaluates PEFT's factor proxy to check its result's shape and dtype, then discards it) gets a
    stand-in of that shape and dtype that holds no memory; every other call, a read of the parametrized weight
    included, runs as called."""

    def __init__(self, weights):
        super().__init__()
        self.pending = {id(w): w for w in weights}
        self.ended = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.baddbmm and args and self.pending.get(id(args[0])) is args[0] and _in_registration_check():
            weight = self.pending.pop(id(args[0]))
            return torch.empty((), dtype=weight.dtype, device=weight.device).expand(weight.shape)
        return func(*args, **(kwargs or {}))

    def end(self):
        """Stop intercepting (where this mode is the innermost one; else at the block's exit)."""
        if not self.ended and torch.overrides._get_current_function_mode() is self:
            super().__exit__(None, None, None)
            self.ended = True

    def __exit__(self, *exc):
        if not self.ended:
            self.ended = True
            super().__exit__(*exc)


def _in_registration_check(depth=12):
    """Whether the caller runs inside ``ParametrizationList.__init__`` (torch's check of a new parametrization),
    not a read of the parametrized weight."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "__init__" and frame.f_code.co_filename.endswith(_PARAMETRIZE_FILE):
            return True
        frame = frame.f_back
    return False


_PARAMETRIZE_FILE = os.path.join("nn", "utils", "parametrize.py")
_open_stand_ins = []  # the stand-in modes of the block calls in flight, innermost last


def call_experts(experts, hidden, top_k_index, top_k_weights):
    """``experts(hidden, top_k_index, top_k_weights)``, as a module call (every hook fires); where PEFT wraps the
    experts module (its ``base_layer``), under ``_LoraCheckStandIn`` for the base module's two weights, which it
    names by identity only (nothing is read from them or changed)."""
    base = experts
    while isinstance(getattr(base, "base_layer", None), nn.Module):
        base = base.base_layer
    weights = [w for w in (base._parameters.get("gate_up_proj"), base._parameters.get("down_proj")) if w is not None]
    if base is experts or not weights:
        return experts(hidden, top_k_index, top_k_weights)
    if torch.compiler.is_compiling():
        return _call_peft_experts_outside_the_graph(experts, hidden, top_k_index, top_k_weights)
    stand_in = _LoraCheckStandIn(weights)
    _open_stand_ins.append(stand_in)
    try:
        with stand_in:
            return experts(hidden, top_k_index, top_k_weights)
    finally:
        _open_stand_ins.pop()


@torch.compiler.disable
def _call_peft_experts_outside_the_graph(experts, hidden, top_k_index, top_k_weights):
    """``call_experts`` run eagerly where torch.compile meets PEFT-wrapped experts: PEFT registers its LoRA
    parametrization at every forward (a module class swap and tensor swaps dynamo cannot trace); a graph break
    around the experts, said once."""
    _say_once("peft-compile", "qwen3-moe-fused: torch.compile does not trace PEFT's LoRA on the experts (it registers "
              "a parametrization every forward); the experts run eagerly between the compiled graphs (a graph break "
              "per MoE layer)")
    return call_experts(experts, hidden, top_k_index, top_k_weights)


def _weight_and_factors(experts, name):
    """(weight, (A, B, scale) or None) of ``experts.<name>``: where PEFT's LoRA factor proxy parametrizes it
    (``_LoraFactorsProxy``: lhs = B [E, out, r], rhs = A [E, r, in], scaling), the raw weight and the factors, so
    W + ΔW is never formed. Other parametrizations (several adapters, fp8) give the weight as they form it, said
    once."""
    if parametrize.is_parametrized(experts, name):
        chain = experts.parametrizations[name]
        proxy = chain[0]
        if len(chain) == 1 and all(hasattr(proxy, a) for a in ("lhs", "rhs", "scaling")):
            weight = chain.original
            if weight.dtype.itemsize >= 2:
                return weight, (proxy.rhs, proxy.lhs, proxy.scaling)
        _say_once("materialised", "qwen3-moe-fused: %s.%s is parametrized by %s (several active adapters, or fp8 "
                  "weights): these experts use the materialised W + ΔW as it forms it", type(experts).__name__, name,
                  type(proxy).__name__)
    return getattr(experts, name), None


class Qwen3MoeExperts(nn.Module):
    """transformers 5.x stacked-SwiGLU experts ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights
    [T, K]) -> [T, H]`` computed by ``moe_experts`` on ``self.gate_up_proj`` / ``self.down_proj`` (PEFT LoRA
    factors read, never merged). Expert ids are local to those weights: ids outside [0, E) — transformers'
    expert-parallel sentinels — are dropped and get zero routing-weight gradient."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if _open_stand_ins:  # PEFT has registered its parametrizations by now
            _open_stand_ins[-1].end()
        check_experts_layout(self)
        gate_up_proj, gate_up = _weight_and_factors(self, "gate_up_proj")
        down_proj, down = _weight_and_factors(self, "down_proj")
        lora = None
        if gate_up or down:
            gate_up, down = gate_up or (None, None, 1.0), down or (None, None, 1.0)
            lora = ExpertsLora(gate_up[0], gate_up[1], down[0], down[1], gate_up[2], down[2])
        return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, lora=lora)


class Qwen3MoeSparseMoeBlock(nn.Module):
    """transformers 5.x ``Qwen3MoeSparseMoeBlock.forward``: router, then experts, both called as modules.

    The fused work happens inside the experts call, when the experts module runs ``Qwen3MoeExperts.forward``
    (transformers' experts implementation "qwen3_moe_fused", which ``patch_qwen3_moe`` selects, or a kernelized
    experts module). Returns a tensor shaped like ``hidden_states``, as the host does.
    """

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_dim)
        _, routing_weights, selected_experts = self.gate(hidden)
        out = call_experts(self.experts, hidden, selected_experts, routing_weights)
        return out.reshape(batch_size, sequence_length, hidden_dim)
