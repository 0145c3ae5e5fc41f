"""What a recipe run writes besides TRL's checkpoints: the initial adapter (before training), and after training
the adapter, the standard-LoRA conversion, the merged checkpoint and a run summary (`milora.layout` names them).

Directories are written atomically; after training only the main process writes, the others wait.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from milora.io import atomic_directory, read_json, write_json
from milora.layout import (
    ADAPTER_CONFIG_FILE,
    INIT_ADAPTER_DIR,
    INIT_SUBDIR,
    MERGED_DIR,
    RUN_INFO_FILE,
    STANDARD_LORA_DIR,
)
from milora.sft.config import MiloraSFTConfig, ModelArguments, RecipeError


def needs_initial_adapter(model_args: ModelArguments) -> bool:
    """SVD-initialised adapters start from B0 A0 != 0, which the standard-LoRA conversion must subtract."""
    return model_args.method != "lora"


def save_initial_adapter(peft_model, model_args: ModelArguments, out_dir: str | Path) -> Path:
    """Write the adapter as initialised (before any training step) to `out_dir`, atomically."""
    with atomic_directory(out_dir) as tmp:
        if model_args.milora_init_dir is not None:
            for item in (Path(model_args.milora_init_dir) / INIT_SUBDIR).iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        else:
            peft_model.save_pretrained(tmp)
    return Path(out_dir)


def initial_adapter_mismatch(peft_model, saved_dir: str | Path, rtol: float = 1e-3) -> str | None:
    """Compare the model's current adapter with a saved initial one, as products `B A` (sign-invariant).

    Returns a description of the first mismatch, or None when every module agrees within `rtol`.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(saved_dir) / "adapter_model.safetensors"
    saved = load_file(str(path))
    current = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    a_keys = sorted(k for k in current if ".lora_A." in k)
    if sorted(k for k in saved if ".lora_A." in k) != a_keys:
        return f"{path} adapts other modules than this run"
    for key_a in a_keys:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        A, B = current[key_a].double(), current[key_b].double()
        A0, B0 = saved[key_a].double(), saved[key_b].double()
        if A.shape != A0.shape or B.shape != B0.shape:
            return f"{key_a}: shape {tuple(A.shape)} vs saved {tuple(A0.shape)}"
        # ||BA - B0A0||^2 from r x r products, without forming the full matrices
        norm = torch.trace((B.T @ B) @ (A @ A.T))
        norm0 = torch.trace((B0.T @ B0) @ (A0 @ A0.T))
        cross = torch.trace((B.T @ B0) @ (A0 @ A.T))
        diff = math.sqrt(max(float(norm + norm0 - 2 * cross), 0.0))
        scale = math.sqrt(max(float(norm0), 1e-30))
        if diff > rtol * scale:
            return f"{key_a.rsplit('.lora_A.', 1)[0]}: relative difference {diff / scale:.2e}"
    return None


def prepare_initial_adapter(peft_model, model_args: ModelArguments, training: MiloraSFTConfig) -> Path | None:
    """Save the initial adapter for the conversion, or, when resuming, check that this run rebuilt the same
    init as the original run (same base, method, rank): the residual base weights then match too."""
    if not needs_initial_adapter(model_args):
        return None
    out_dir = Path(training.output_dir) / INIT_ADAPTER_DIR
    if training.resume_from_checkpoint and (out_dir / "adapter_model.safetensors").is_file():
        mismatch = initial_adapter_mismatch(peft_model, out_dir)
        if mismatch is not None:
            raise RecipeError(
                f"cannot resume: the initial adapter rebuilt now differs from {out_dir} written by the original "
                f"run ({mismatch}). Resume with the same model_name_or_path, method, lora_r, lora_alpha and "
                "lora_target_modules (or the same milora_init_dir)."
            )
        return out_dir
    if training.process_index == 0:
        save_initial_adapter(peft_model, model_args, out_dir)
    return out_dir


def original_base_model(model_args: ModelArguments) -> str | None:
    """The model the standard-LoRA conversion applies to: the original model, never the residual one."""
    if model_args.milora_init_dir is not None:
        from milora.init_dir import read_metadata

        return read_metadata(model_args.milora_init_dir).get("source_model") or model_args.model_name_or_path
    return model_args.model_name_or_path


def save_outputs(trainer, recipe) -> dict:
    """After training: the adapter and trainer state, then (main process) the standard-LoRA conversion, the merged
    checkpoint and the run summary. Returns the summary."""
    from milora import convert_to_lora, merge_adapter
    from milora.processes import save_merged_from_state_dict, zero3_consolidated_state_dict

    model_args, training = recipe.model, recipe.training
    trainer.save_model(training.output_dir)
    trainer.save_state()
    # ZeRO-3 leaves every process with shards: all of them gather the weights onto the main process to merge
    full_state = zero3_consolidated_state_dict(trainer) if training.merge else None
    out = Path(training.output_dir)
    info = {
        "method": model_args.method,
        "base_model": original_base_model(model_args),
        "milora_init_dir": model_args.milora_init_dir,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": model_args.lora_target_modules,
        "dataset": recipe.data.dataset_name,
        "adapter": str(out),
        "adapter_base": "residual" if needs_initial_adapter(model_args) else "original",
        "global_step": trainer.state.global_step,
    }
    if trainer.accelerator.is_main_process:
        if needs_initial_adapter(model_args):
            info["initial_adapter"] = str(out / INIT_ADAPTER_DIR)
            if training.save_standard_lora:
                # the standard LoRA applies to the original model, not to the residual one it was trained on
                convert_to_lora(out, out / INIT_ADAPTER_DIR, out / STANDARD_LORA_DIR,
                                base_model_name_or_path=info["base_model"])
                if info["base_model"] is None:
                    clear_adapter_base(out / STANDARD_LORA_DIR)
                info["standard_lora_adapter"] = str(out / STANDARD_LORA_DIR)
        else:
            info["standard_lora_adapter"] = str(out)
        if model_args.load_in_4bit and "standard_lora_adapter" in info:
            from milora.sft.quantized import note_standard_lora_difference

            info["quantization"] = model_args.four_bit_settings().describe()
            info["standard_lora_difference"] = note_standard_lora_difference(
                trainer, recipe, info["standard_lora_adapter"], info["base_model"])
        if training.merge:
            model = trainer.accelerator.unwrap_model(trainer.model)
            if full_state is not None:
                save_merged_from_state_dict(model, full_state, out / MERGED_DIR, trainer.processing_class)
            else:
                merge_adapter(model, out / MERGED_DIR, trainer.processing_class)
            info["merged"] = str(out / MERGED_DIR)
        write_json(out / RUN_INFO_FILE, info)
    trainer.accelerator.wait_for_everyone()
    return info


def clear_adapter_base(adapter_dir: Path) -> None:
    """Drop a converted adapter's base model when the original model is not known: `convert_to_lora` keeps the
    trained adapter's entry, which names the residual model (a `milora init` directory) it does not apply to."""
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    config = read_json(config_path)
    config["base_model_name_or_path"] = None
    write_json(config_path, config, sort_keys=True)
