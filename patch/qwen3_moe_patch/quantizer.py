"""QLoRA's 4-bit model straight from a checkpoint: a transformers quantizer that quantizes the stacked experts too.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=experts_4bit(BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, ...)), device_map="cuda")

transformers' bitsandbytes quantizer turns every ``nn.Linear`` into a ``Linear4bit`` and quantizes its weight as
from_pretrained loads it; the stacked experts (not ``nn.Linear``) stay dense. This quantizer is bitsandbytes' own
(``Bnb4BitHfQuantizer``) plus the experts: each stacked experts weight, once transformers' loader has built it
from the checkpoint (per-expert checkpoints are stacked by transformers' own conversion), is quantized on its
device into a frozen ``Tensor4bit`` (what ``quantize_4bit`` makes: the same settings, the same bits). So a
Qwen3-30B-A3B checkpoint loads into ≈ 16 GB of GPU memory without its 61 GB dense form in host or GPU memory at
once. It is registered with transformers (``register_quantizer``, method "qwen3_moe_fused_4bit") on first use.
``save_pretrained`` of the result writes the experts as per-expert bitsandbytes entries (``quantize``'s
checkpoint layout); this quantizer does not read such a 4-bit checkpoint back (it quantizes dense checkpoints):
``load_state_dict`` it into a quantized model, or ``dequantize_4bit`` first to save a dense checkpoint.
"""

from __future__ import annotations

METHOD = "qwen3_moe_fused_4bit"

_classes = None


def _define():
    """(config class, quantizer class), defined and registered with transformers once."""
    global _classes
    if _classes is not None:
        return _classes
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name

    from .quantize import EXPERT_WEIGHTS, _experts_modules, _hook, _settings, check_whole_blocks, to_tensor4bit

    @register_quantization_config(METHOD)
    class Experts4bitConfig(BitsAndBytesConfig):
        """``BitsAndBytesConfig(load_in_4bit=True, ...)`` whose quantizer also quantizes the stacked experts."""

        def __init__(self, *args, **kwargs):
            kwargs.pop("quant_method", None)
            super().__init__(*args, **kwargs)
            self.quant_method = METHOD

    class QuantizeExperts(Bnb4bitQuantize):
        """transformers' bnb quantize op, and for a stacked experts weight its ``Tensor4bit``."""

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            experts = {name: value for name, value in input_dict.items() if _is_experts_weight(model, name)}
            result = super().convert({n: v for n, v in input_dict.items() if n not in experts},
                                     full_layer_name=full_layer_name, model=model, **kwargs)
            quant_type, nested, _, _ = _settings(self.hf_quantizer.quantization_config)
            for name, value in experts.items():
                value = value[0] if isinstance(value, list) else value
                result[name] = to_tensor4bit(value.to(model.get_parameter(name).dtype), quant_type, nested)
                del value
                get_module_from_name(model, name)[0]._is_hf_initialized = True
            return result

    def _is_experts_weight(model, name):
        module, tensor = get_module_from_name(model, name)
        return tensor in EXPERT_WEIGHTS and any(module is experts for _, experts in _experts_modules(model))

    @register_quantizer(METHOD)
    class Experts4bitQuantizer(Bnb4BitHfQuantizer):
        """bitsandbytes' 4-bit quantizer, plus the stacked experts as ``Tensor4bit`` (quantized on load)."""

        def validate_environment(self, *args, **kwargs):
            super().validate_environment(*args, **kwargs)
            if self.pre_quantized:
                raise ValueError(f"{METHOD} quantizes a dense checkpoint while it loads; this checkpoint is already "
                                 "4-bit: load the dense checkpoint with it, or build the model with quantize_4bit and "
                                 "load_state_dict the 4-bit checkpoint's tensors into it")

        def param_needs_quantization(self, model, param_name, **kwargs):
            return super().param_needs_quantization(model, param_name, **kwargs) or \
                _is_experts_weight(model, param_name)

        def _process_model_before_weight_loading(self, model, device_map, **kwargs):
            for name, experts in _experts_modules(model):
                for weight_name in EXPERT_WEIGHTS:
                    check_whole_blocks(f"{name}.experts.{weight_name}", getattr(experts, weight_name).shape,
                                       f"load this model without {METHOD}")
            super()._process_model_before_weight_loading(model, device_map, **kwargs)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for _, experts in _experts_modules(model):
                _hook(experts)
            return super()._process_model_after_weight_loading(model, **kwargs)

        def is_serializable(self, *args, **kwargs):
            return True

        def get_quantize_ops(self):
            return QuantizeExperts(self)

    _classes = Experts4bitConfig, Experts4bitQuantizer
    return _classes


def experts_4bit(quantization_config=None):
    """A ``quantization_config`` for ``from_pretrained`` that also quantizes the stacked experts: the settings of
    ``quantization_config`` (a ``BitsAndBytesConfig(load_in_4bit=True, ...)``; None: NF4, nested, bf16 compute)."""
    import torch

    from .quantize import _settings

    config_class, _ = _define()
    if quantization_config is None:
        return config_class(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    _settings(quantization_config)  # refuses what the experts cannot hold (8-bit, other storage)
    fields = {k: v for k, v in quantization_config.to_dict().items() if k not in ("quant_method", "_load_in_4bit",
                                                                                  "_load_in_8bit")}
    return config_class(**fields)
