"""4-bit bases (QLoRA, QPiSSA, QMiLoRA): the decomposition reads full-precision weights, then the residual is
quantized and the factors stay in the training dtype.

For an adapted weight `W` with factors `B A` (scaling `s`) the 4-bit model computes
`dequant(Q(W - s B A)) + s B A`; its quantization error is `||W - (dequant(Q(W_res)) + s B A)||_F / ||W||_F`
(`quantization_error`). Plain QLoRA has `B A = 0`, so the error is that of quantizing `W` itself.

- `refit_factors`: QPiSSA's iterations (Meng et al., 2024, Sec. 3.3): quantize the residual, take the `r`
  principal triplets of what the quantization lost (`W - dequant(Q(W_res))`) as the new factors, repeat. Each
  step moves the factors toward the principal directions of the quantization error, so for MiLoRA they leave
  the minor subspace they were chosen from (docs/quantization.md measures how far); recipes allow them for
  PiSSA only.
- `quantize_linear_layers`: replace `nn.Linear` layers by bitsandbytes `Linear4bit` in place (after the
  decomposition), the layers `from_pretrained(quantization_config=...)` would quantize.
- `merge_dequantized`: the trained 4-bit model as a plain checkpoint, dequantized residual + update in the
  training dtype.

bitsandbytes is imported lazily: only 4-bit runs need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from milora.decomposition import lora_factors, singular_components
from milora.errors import MiLoRAError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # bitsandbytes' and transformers' default for 4-bit weights


@dataclass(frozen=True)
class FourBitSettings:
    """How the frozen base is stored: TRL's `ModelConfig` keys `bnb_4bit_quant_type`, `bnb_4bit_compute_dtype` and
    `use_bnb_nested_quant` (quantized absmax statistics). `compute_dtype` None: the weights' dtype."""

    quant_type: str = "nf4"
    compute_dtype: torch.dtype | None = None
    nested: bool = False

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise MiLoRAError(f"unknown 4-bit quant type {self.quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")

    def bnb_config(self, skip_modules: list[str] | None = None, dtype: torch.dtype | None = None):
        """The transformers `BitsAndBytesConfig` that loads a checkpoint (a `milora init` residual) the same way."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.nested,
            bnb_4bit_compute_dtype=self.compute_dtype or dtype or torch.float32, llm_int8_skip_modules=skip_modules,
        )

    def describe(self) -> dict:
        dtype = None if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")
        return {"quant_type": self.quant_type, "compute_dtype": dtype, "nested": self.nested}


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise MiLoRAError(
            "load_in_4bit needs bitsandbytes: `pip install bitsandbytes>=0.50` (or `pip install -e .[quantization]`)"
        ) from error
    return bitsandbytes


def quantize_dequantize(weight: torch.Tensor, settings: FourBitSettings) -> torch.Tensor:
    """`dequant(Q(weight))` as bitsandbytes stores and computes it, in `weight`'s dtype and on its device.

    bitsandbytes launches its CUDA quantization kernel on the default stream whatever the current one is, so on
    another stream (the decomposition workers' in `milora.streaming`) the call is ordered after that stream's work
    and that stream after the call; otherwise the kernel could read the weight before it is written."""
    if weight.is_cuda:
        current, default = torch.cuda.current_stream(weight.device), torch.cuda.default_stream(weight.device)
        if current != default:
            default.wait_stream(current)
            with torch.cuda.stream(default):
                result = _quantize_dequantize(weight, settings)
            current.wait_stream(default)
            result.record_stream(current)  # allocated on the default stream, used and freed on this one
            return result
    return _quantize_dequantize(weight, settings)


def _quantize_dequantize(weight: torch.Tensor, settings: FourBitSettings) -> torch.Tensor:
    functional = require_bitsandbytes().functional
    packed, state = functional.quantize_4bit(
        weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=settings.nested, quant_type=settings.quant_type
    )
    return functional.dequantize_4bit(packed, state).to(weight.dtype)


def quantization_error(weight: torch.Tensor, residual_dequantized: torch.Tensor, B: torch.Tensor | None,
                       A: torch.Tensor | None, scaling: float = 1.0) -> tuple[float, float]:
    """(`||W - (dequant(Q(W_res)) + s B A)||_F^2`, `||W||_F^2`) in float64; sums of these over layers give the
    error of a whole model, their ratio's square root the relative error of one matrix."""
    w = weight.to(torch.float64)
    approx = residual_dequantized.to(torch.float64)
    if B is not None:
        approx = approx + scaling * (B.to(torch.float64) @ A.to(torch.float64))
    return float((w - approx).pow(2).sum()), float(w.pow(2).sum())


def refit_factors(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, iterations: int,
                  settings: FourBitSettings, storage_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """QPiSSA's iterations: `iterations` times, quantize the residual `W - s B A` (stored in `storage_dtype`) and
    take the `r` principal triplets of `W - dequant(Q(W_res))` as the new factors (float64)."""
    w = weight.to(torch.float64)
    r = B.shape[1]
    for _ in range(iterations):
        residual = (w - scaling * (B.to(torch.float64) @ A.to(torch.float64))).to(storage_dtype)
        lost = w - quantize_dequantize(residual, settings).to(torch.float64)
        B, A = lora_factors(singular_components(lost, r, "principal", solver="gram"), scaling)
    return B, A


@dataclass(frozen=True)
class FactorRefit:
    """The `refit` hook of `milora.distributed.initialize_layers`: QPiSSA iterations for one layer."""

    settings: FourBitSettings
    iterations: int
    storage_dtype: torch.dtype

    def __call__(self, weight, B, A, scaling):
        return refit_factors(weight, B, A, scaling, self.iterations, self.settings, self.storage_dtype)

    def key(self) -> str:
        """What the factors depend on besides the weights, for the factor cache."""
        return f"qpissa{self.iterations}:{self.settings.quant_type}:{self.settings.nested}:{self.storage_dtype}"


def is_quantized_module(module: torch.nn.Module) -> bool:
    """A bitsandbytes layer (4-bit or 8-bit): its weight is packed storage plus quantization statistics. (Other
    non-float weights are refused by `milora.model.check_weight`.)"""
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    return hasattr(weight, "quant_state") or type(weight).__name__ in ("Params4bit", "Int8Params") or (
        type(module).__module__.startswith("bitsandbytes")
    )


def refuse_quantized(name: str, module: torch.nn.Module) -> None:
    if is_quantized_module(module):
        raise MiLoRAError(
            f"{name} is already quantized ({type(module).__name__}, weight {module.weight.dtype}); the decomposition "
            "must read full-precision weights. Start from the full-precision checkpoint and let milora quantize the "
            "residual (recipes: load_in_4bit: true; apply_milora(..., quantization=FourBitSettings()))."
        )


def quantize_linear(linear: torch.nn.Linear, settings: FourBitSettings, device=None) -> torch.nn.Module:
    """A bitsandbytes `Linear4bit` holding `linear`'s weight quantized on `device` (default: the weight's)."""
    bnb = require_bitsandbytes()
    weight = linear.weight.data
    device = torch.device(device) if device is not None else weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=settings.compute_dtype or weight.dtype, compress_statistics=settings.nested,
        quant_type=settings.quant_type, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(device).contiguous(), requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=settings.nested,
        quant_type=settings.quant_type,
    ).to(device)  # moving a Params4bit onto a device quantizes it there
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(device), requires_grad=linear.bias.requires_grad)
    keep_packed_format(layer)
    return layer


def keep_packed_format(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel on the first forward pass under
    `no_grad` in eval mode: the repacked layer computes with bfloat16 scales (no longer the model that was trained
    or measured), its weight no longer dequantizes with `dequantize_4bit`, and layers whose input size is not a
    multiple of the block size fail there (bitsandbytes 0.50)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_linear_layers(model: torch.nn.Module, settings: FourBitSettings, keep: Callable[[str], bool],
                           device=None) -> list[str]:
    """Replace every `nn.Linear` for which `keep(name)` is False by a 4-bit `Linear4bit`, in place; the names.

    Marks the model `is_loaded_in_4bit`, as transformers does, so that PEFT wraps the layers with its 4-bit
    LoRA layers."""
    names = [name for name, module in model.named_modules()
             if type(module) is torch.nn.Linear and name and not keep(name)]
    for name in names:
        _replace(model, name, quantize_linear(model.get_submodule(name), settings, device))
    model.is_loaded_in_4bit = True
    return names


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The float weight a (4-bit or plain) linear layer computes with."""
    weight = module.weight
    if hasattr(weight, "quant_state"):
        functional = require_bitsandbytes().functional
        return functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.data.to(dtype)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return linear


@torch.no_grad()
def merge_dequantized(peft_model, dtype: torch.dtype, adapter_name: str = "default") -> torch.nn.Module:
    """The plain model `dequant(Q(W_res)) + s B A` in `dtype`, computed in float32: every LoRA layer merged into
    its dequantized base, every other 4-bit layer dequantized. Consumes `peft_model`."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    model = peft_model.get_base_model()
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        weight = dequantized_weight(base, torch.float32)
        if adapter_name in layer.lora_A:  # in float32 even where the factors are bfloat16 (PEFT multiplies in theirs)
            B = layer.lora_B[adapter_name].weight.to(torch.float32)
            A = layer.lora_A[adapter_name].weight.to(torch.float32)
            weight = weight + layer.scaling[adapter_name] * (B @ A)
        _replace(model, name, _plain_linear(weight.to(dtype), base.bias))
    for name, module in list(model.named_modules()):
        if hasattr(getattr(module, "weight", None), "quant_state"):
            _replace(model, name, _plain_linear(dequantized_weight(module, dtype), module.bias))
    for name, module in list(model.named_modules()):  # modules_to_save: their trained copy, as PEFT's unload
        if isinstance(module, ModulesToSaveWrapper):
            _replace(model, name, module.modules_to_save[module.active_adapter])
    forget_quantization(model)
    return model


def forget_quantization(model: torch.nn.Module) -> None:
    """Drop what marks a model as quantized, so that `save_pretrained` writes a plain float checkpoint."""
    for attribute in ("is_loaded_in_4bit", "hf_quantizer"):
        if hasattr(model, attribute):
            setattr(model, attribute, False if attribute == "is_loaded_in_4bit" else None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for sub in (getattr(config, "text_config", None),):
        if sub is not None and hasattr(sub, "quantization_config"):
            del sub.quantization_config


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compute_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype a 4-bit model's quantized layers compute in (the training dtype)."""
    for module in model.modules():
        if hasattr(module, "compute_dtype") and hasattr(getattr(module, "weight", None), "quant_state"):
            return module.compute_dtype or torch.float32
    return next(p.dtype for p in model.parameters() if torch.is_floating_point(p))


def adapters_to_float32(model: torch.nn.Module) -> int:
    """Put trainable parameters back in float32 after TRL's `SFTTrainer` cast them to bfloat16 (it does so for every
    4-bit model, QLoRA's recommendation). The SVD factors were subtracted from the residual in full precision;
    rounded to bfloat16, PiSSA's principal factors would move the model at init by ~0.4% of the largest singular
    values. Float32 adapters under bf16 autocast are also what the bf16 recipes train. The number of tensors."""
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and torch.is_floating_point(param):
            param.data = param.data.to(torch.float32)
            count += 1
    return count


def has_4bit_layers(model: torch.nn.Module) -> bool:
    return any(hasattr(getattr(m, "weight", None), "quant_state") for m in model.modules())


def refit_for(settings: FourBitSettings | None, iterations: int, storage_dtype: torch.dtype) -> FactorRefit | None:
    """The refit hook for `iterations` QPiSSA steps; None when there are none."""
    if settings is None or not iterations:
        return None
    if iterations < 0:
        raise MiLoRAError(f"quantization_iterations must be >= 0, got {iterations}")
    return FactorRefit(settings, int(iterations), storage_dtype)


def kept_in_full_precision(model: torch.nn.Module, modules_to_save=None) -> Callable[[str], bool]:
    """Which linear layers stay unquantized: the output layer, everything outside a vision-language model's
    language tower (vision tower, projector) and the `modules_to_save`, as QLoRA recipes keep them."""
    from milora.model import language_model_prefix

    prefix = language_model_prefix(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_names = {name for name, module in model.named_modules() if output is not None and module is output}
    saved = set(modules_to_save or ())

    def keep(name: str) -> bool:
        if name in output_names or (prefix is not None and not name.startswith(prefix + ".")):
            return True
        return any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in saved)

    return keep


def skipped_module_names(vision_language: bool, modules_to_save=None) -> list[str]:
    """The same choice as `kept_in_full_precision`, as transformers' `llm_int8_skip_modules` names it."""
    names = ["lm_head", *(modules_to_save or ())]
    if vision_language:
        names += ["vision_tower", "multi_modal_projector"]
    return names


def quantize_base(model: torch.nn.Module, settings: FourBitSettings, device=None, modules_to_save=None) -> list[str]:
    """Quantize a plain (not yet PEFT-wrapped) model's linear layers to 4 bits in place, QLoRA's base."""
    return quantize_linear_layers(model, settings, kept_in_full_precision(model, modules_to_save), device)


def requantize_residual(peft_model, settings: FourBitSettings, device=None):
    """After the decomposition: the same adapter on a 4-bit residual. The full-precision LoRA wrappers are taken
    off, the residual (and every other linear layer of the language model) quantized, and the model wrapped again
    with PEFT's 4-bit LoRA layers holding the same factors."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = peft_model.peft_config["default"]
    factors = {key: value.detach().clone() for key, value in get_peft_model_state_dict(peft_model).items()}
    base = peft_model.unload()
    quantize_base(base, settings, device, config.modules_to_save)
    rewrapped = get_peft_model(base, config)
    result = set_peft_model_state_dict(rewrapped, factors)
    if result.unexpected_keys:
        raise MiLoRAError(f"re-wrapping the 4-bit model lost adapter weights: {result.unexpected_keys[:3]}")
    return rewrapped
