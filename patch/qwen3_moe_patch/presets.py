"""Qwen3-MoE model configurations built locally (no download): a tiny one for checks and tests, Qwen3-30B-A3B's
widths with 4 layers for GPU training benchmarks (both with a byte-level vocabulary of 256), and the full
Qwen3-30B-A3B architecture (48 layers, its 151,936-token vocabulary: 30.5 B parameters) for multi-GPU runs."""

import copy

__all__ = ["PRESETS", "make_config", "make_model", "make_model_piecewise"]

PRESETS = {
    # 4 layers, 8 experts, top-2: ~280k parameters, fast on a CPU.
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256,
        output_router_logits=True, router_aux_loss_coef=0.01, tie_word_embeddings=False,
    ),
    # Qwen3-30B-A3B's attention and MoE widths (H 2048, I 768, 128 experts, top-8), 4 layers: 2.5B parameters.
    "30b-a3b-4layers": dict(
        vocab_size=256, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768,
        output_router_logits=True, router_aux_loss_coef=0.001, tie_word_embeddings=False,
    ),
}
# The whole Qwen3-30B-A3B architecture (its config.json's sizes); trained on bytes, whose ids are < 256.
PRESETS["30b-a3b"] = dict(PRESETS["30b-a3b-4layers"], vocab_size=151936, num_hidden_layers=48)


def make_config(preset: str = "tiny", **overrides):
    """A ``Qwen3MoeConfig`` for ``preset`` with ``overrides`` applied (e.g. ``experts_implementation``)."""
    from transformers import Qwen3MoeConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return Qwen3MoeConfig(**{**PRESETS[preset], **overrides})


def make_model(preset: str = "tiny", seed: int = 0, **overrides):
    """A freshly initialised ``Qwen3MoeForCausalLM`` (same weights for the same seed), with its own config."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(copy.deepcopy(make_config(preset, **overrides)))


def make_model_piecewise(preset: str = "tiny", seed: int = 0, *, device="cuda", dtype="bfloat16",
                         quantization_config=None, **overrides):
    """A freshly initialised ``Qwen3MoeForCausalLM`` built one piece at a time on ``device`` in ``dtype``: the
    embedding, each decoder layer, the final norm and the head are materialised from the meta device,
    initialised (transformers' own ``_init_weights``; seed + piece) and, with a ``BitsAndBytesConfig``, each
    decoder layer is quantized (``quantize.quantize_4bit``; embedding, norm and head stay dense, as transformers
    leaves them) before the next piece exists. So the full 30B architecture in 4-bit never needs
    its 61 GB dense form anywhere. Same weights for the same seed, quantized or not (then quantized)."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    from .quantize import quantize_4bit

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = copy.deepcopy(make_config(preset, **overrides))
    config.dtype = dtype
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)  # its buffers are computed, not initialised
    pieces = [model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head]
    for index, piece in enumerate(pieces):
        piece.to_empty(device=device)
        piece.to(dtype)
        torch.manual_seed(seed * 1000 + index)
        with torch.no_grad():
            for module in piece.modules():
                model._init_weights(module)
        if quantization_config is not None and 0 < index <= len(model.model.layers):  # the decoder layers
            quantize_4bit(piece, quantization_config, device=device)
    return model
