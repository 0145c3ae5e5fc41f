"""After training: a MiLoRA/PiSSA adapter as a standard LoRA for the ORIGINAL base, and merged checkpoints.

A MiLoRA adapter `B A` sits on the residual base `W_res = W - s B0 A0`. On the original `W` the same model
is `W + s (B A - B0 A0)`, and `B A - B0 A0 = [B, B0] [A; -A0]`: a rank-2r LoRA. Keeping the scaling `s`
fixed at rank 2r means doubling `lora_alpha` (or multiplying it by sqrt(2) with rsLoRA). This is the
conversion PEFT performs for PiSSA, done here on saved files so it works for any of our modes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from milora.fingerprint import check_same_residual, read_record, write_record
from milora.io import DamagedFileError, atomic_directory, read_json, read_safetensors, write_json, write_safetensors
from milora.layout import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

ADAPTER_WEIGHTS = ADAPTER_WEIGHTS_FILE


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter config, tensors) of a saved PEFT adapter; a missing or damaged file is one clear error."""
    adapter_dir = Path(adapter_dir)
    for needed in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS):
        if not (adapter_dir / needed).is_file():
            raise FileNotFoundError(
                f"{adapter_dir} has no {needed}: give a directory written by PeftModel.save_pretrained "
                "(safetensors format)"
            )
    try:
        config = read_json(adapter_dir / ADAPTER_CONFIG_FILE)
    except ValueError as error:
        raise DamagedFileError(f"{adapter_dir / ADAPTER_CONFIG_FILE} is damaged ({error}); write it again") from None
    return config, read_safetensors(adapter_dir / ADAPTER_WEIGHTS)


def write_adapter_files(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter's weights, then its config, each atomically, into an existing directory."""
    directory = Path(directory)
    write_safetensors(directory / ADAPTER_WEIGHTS, tensors)
    write_json(directory / ADAPTER_CONFIG_FILE, config, sort_keys=True)
    return directory


def _doubled_alpha(alpha: float, use_rslora: bool) -> float:
    return alpha * math.sqrt(2) if use_rslora else 2 * alpha


def lora_delta_factors(
    B: torch.Tensor, A: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors of `B A - B0 A0`: `([B, B0], [A; -A0])`."""
    return torch.cat([B, B0], dim=1), torch.cat([A, -A0], dim=0)


def standard_lora(adapter_dir: str | Path, initial_adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The (config, tensors) of the rank-2r standard LoRA for the original base: `[B, B0] [A; -A0]`."""
    check_same_residual(adapter_dir, initial_adapter_dir)
    config, trained = read_adapter(adapter_dir)
    init_config, initial = read_adapter(initial_adapter_dir)
    def comparable(value):
        # PEFT writes target_modules from a set: the order depends on the process's hash seed
        return sorted(value) if isinstance(value, list) else value

    for key in ("r", "lora_alpha", "use_rslora", "target_modules"):
        if comparable(config.get(key)) != comparable(init_config.get(key)):
            raise ValueError(
                f"{adapter_dir} and {initial_adapter_dir} disagree on {key} ({config.get(key)!r} vs "
                f"{init_config.get(key)!r}): the initial adapter must be the one this adapter was trained from"
            )
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in trained.items():
        if ".lora_A." in key or ".lora_B." in key:
            if key not in initial:
                raise ValueError(f"{initial_adapter_dir} lacks {key}; it is not this adapter's initial state")
            if ".lora_B." in key:
                continue
            key_B = key.replace(".lora_A.", ".lora_B.")
            B0, A0 = initial[key_B].to(trained[key_B].dtype), initial[key].to(tensor.dtype)
            B, A = lora_delta_factors(trained[key_B], tensor, B0, A0)
            converted[key], converted[key_B] = A.contiguous(), B.contiguous()
        else:
            converted[key] = tensor  # modules_to_save, biases: already absolute values
    use_rslora = bool(config.get("use_rslora", False))
    config = dict(config)
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = _doubled_alpha(config["lora_alpha"], use_rslora)
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: _doubled_alpha(v, use_rslora) for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    return config, converted


def convert_to_lora(
    adapter_dir: str | Path,
    initial_adapter_dir: str | Path,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a standard LoRA adapter to `out_dir` that applies to the original (pre-MiLoRA) base model.

    `adapter_dir` is the trained adapter, `initial_adapter_dir` the adapter as `apply_milora` initialised it
    (recipes save them as `residual_adapter/` and `milora_init_adapter/`; `milora init` as `DIR/milora_init/`).
    `base_model_name_or_path` is recorded in the new adapter's config (the original model's id or path); by
    default the original model named in the trained adapter's base record, else the trained adapter's entry.
    The base record written beside it carries the original model's fingerprint when the trained adapter's has it.
    """
    config, converted = standard_lora(adapter_dir, initial_adapter_dir)
    record = read_record(adapter_dir) or {}
    base = base_model_name_or_path or record.get("original_model")
    if base is not None:
        config["base_model_name_or_path"] = base
    with atomic_directory(out_dir) as tmp:
        write_adapter_files(tmp, config, converted)
        write_record(tmp, applies_to="original", base_model=config.get("base_model_name_or_path"),
                     fingerprint=record.get("original_fingerprint"), method=record.get("method", "unknown"),
                     r=config["r"], lora_alpha=config["lora_alpha"], original_model=base)
    return Path(out_dir)


def merge_adapter(peft_model, out_dir: str | Path, processing_class=None, safe_serialization: bool = True):
    """Merge the adapter into the base weights and save a full checkpoint that `from_pretrained` loads.

    The PEFT model is consumed (merged in place); the merged plain model is returned. On a 4-bit base the
    checkpoint is the dequantized residual plus the update, in the dtype the 4-bit layers compute in
    (`milora.quantization.merge_dequantized`), not a re-quantized model. Layers trained on an FP8 base
    (`milora.fp8`) are plain linear layers again first, so the merged model computes in its weights' dtype.
    """
    from milora.fp8 import restore_linears
    from milora.quantization import compute_dtype_of, has_4bit_layers, merge_dequantized

    restore_linears(peft_model)
    if has_4bit_layers(peft_model):
        merged = merge_dequantized(peft_model, compute_dtype_of(peft_model))
    else:
        merged = peft_model.merge_and_unload()
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=safe_serialization)
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
    return merged


def merge_checkpoint(base: str, adapter_dir: str | Path, out_dir: str | Path, dtype="auto"):
    """Load `base` (hub id, directory or tiny:KIND) + the adapter at `adapter_dir`, merge, save to `out_dir`.

    The base must be the one the adapter applies to: the residual model of a `milora init` directory for
    an adapter trained from it, the original model for a standard LoRA (`milora convert` output).
    """
    from peft import PeftModel

    from milora.fingerprint import check_base
    from milora.loading import load_model, load_processing_class

    model = load_model(base, dtype=dtype)
    print(f"milora: {check_base(model, adapter_dir, base)}")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    try:
        processing_class = load_processing_class(base)
    except (OSError, ValueError):
        processing_class = None  # a bare weights directory: the merge is still useful
    return merge_adapter(peft_model, out_dir, processing_class)
