"""What a recipe run writes besides TRL's checkpoints: the initial adapter (before training), and after training
the adapters (each with the record of the base it applies to), the merged checkpoint, the model card and the run
summary (`milora.layout` names them and describes the layout).

Directories and files are written atomically; after training only the main process writes, the others wait.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch

from milora.conversion import standard_lora, write_adapter_files
from milora.distributed import ADAPTER_NAME, adapted_module_names
from milora.fingerprint import write_record
from milora.io import DamagedFileError, atomic_directory, read_json, read_safetensors, replace_directory, write_json
from milora.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    INIT_ADAPTER_DIR,
    INIT_SUBDIR,
    MERGED_DIR,
    RESIDUAL_ADAPTER_DIR,
    RESIDUAL_BASE_DIR,
    RUN_INFO_FILE,
)
from milora.model_card import write_model_card
from milora.sft.config import MiloraSFTConfig, ModelArguments, RecipeError

logger = logging.getLogger(__name__)


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

    path = Path(saved_dir) / ADAPTER_WEIGHTS_FILE
    saved = read_safetensors(path)
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
    if training.resume_from_checkpoint and (out_dir / ADAPTER_WEIGHTS_FILE).is_file():
        try:
            mismatch = initial_adapter_mismatch(peft_model, out_dir)
        except DamagedFileError as error:  # the original run died while writing it: write it again
            logger.warning("%s; writing the initial adapter again", error)
            if training.process_index == 0:
                save_initial_adapter(peft_model, model_args, out_dir)
            return out_dir
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
    if model_args.init_record is not None:
        return model_args.init_record.source_model or model_args.model_name_or_path
    return model_args.model_name_or_path


def residual_base_path(model_args: ModelArguments, training: MiloraSFTConfig) -> str | None:
    """Where the residual base `W - B0 A0` of an SVD run lives: the init directory, the run's `residual_base/`,
    or nowhere (None: the run did not save it)."""
    if model_args.milora_init_dir is not None:
        return str(Path(model_args.milora_init_dir).resolve())
    if training.save_residual_base:
        return str((Path(training.output_dir) / RESIDUAL_BASE_DIR).resolve())
    return None


def save_outputs(trainer, recipe, original_fingerprint: dict | None = None, step0: dict | None = None) -> dict:
    """After training: the adapters with their base records, the merged checkpoint, the model card and, last, the
    run summary (an output directory without `milora_run.json` was not finished). Returns the summary.

    For the SVD methods the adapter as trained goes to `residual_adapter/` and the root gets the rank-2r standard
    LoRA for the original model; for plain LoRA the trained adapter is already that and stays at the root.
    `original_fingerprint` is the original model's (`milora.sft.model.build_peft_model`)."""
    from milora import merge_adapter
    from milora.fingerprint import model_fingerprint
    from milora.processes import save_merged_from_state_dict, zero3_consolidated_state_dict

    model_args, training = recipe.model, recipe.training
    out = Path(training.output_dir)
    svd = needs_initial_adapter(model_args)
    main = trainer.accelerator.is_main_process
    if main:
        (out / RUN_INFO_FILE).unlink(missing_ok=True)  # "done" is written again at the very end
    staging = out / f".{RESIDUAL_ADAPTER_DIR}.staging"
    trainer.save_model(str(staging) if svd else training.output_dir)
    trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapted = adapted_module_names(model)
    # every process: gathers each weight under ZeRO-3. A 4-bit base holds packed bytes: its residual folders
    # record no fingerprint (not checked), and the root applies to the original model, fingerprinted before
    # it was quantized or adapted (`build_peft_model`). Plain LoRA trains on that original model unchanged, so
    # only a run without a record of it fingerprints it here.
    four_bit = bool(getattr(model_args, "load_in_4bit", False))
    residual_fingerprint = model_fingerprint(model, adapted) if svd and not four_bit else None
    root_fingerprint = original_fingerprint
    if root_fingerprint is None and not svd and not four_bit:
        root_fingerprint = model_fingerprint(model, adapted)
    residual_dir = residual_base_path(model_args, training) if svd else None
    # ZeRO-3 leaves every process with shards: all of them gather the weights onto the main process to write them
    needs_full = training.merge or (svd and training.save_residual_base and model_args.milora_init_dir is None)
    full_state = zero3_consolidated_state_dict(trainer) if needs_full else None
    info = {
        "method": model_args.method,
        "base_model": original_base_model(model_args),
        "milora_init_dir": model_args.milora_init_dir,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": model_args.lora_target_modules,
        "dataset": recipe.data.dataset_name,
        "adapter": str(out),
        "adapter_base": "original",
        "global_step": trainer.state.global_step,
        "final_loss": final_training_loss(trainer.state.log_history),
        "step0_check": step0,
        "fp8_base": model_args.fp8_base,
    }
    if main:
        common = {"method": model_args.method, "original_model": info["base_model"]}
        if svd:
            replace_directory(staging, out / RESIDUAL_ADAPTER_DIR)
            for folder in (out / RESIDUAL_ADAPTER_DIR, out / INIT_ADAPTER_DIR):
                _set_adapter_base(folder, residual_dir)
                write_record(folder, applies_to="residual", base_model=residual_dir, fingerprint=residual_fingerprint,
                             r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             original_fingerprint=original_fingerprint, **common)
            if residual_dir is not None and model_args.milora_init_dir is None:
                save_residual_base(model, full_state, Path(residual_dir), trainer.processing_class)
                info["residual_base"] = residual_dir
            config, tensors = standard_lora(out / RESIDUAL_ADAPTER_DIR, out / INIT_ADAPTER_DIR)
            config["base_model_name_or_path"] = info["base_model"]
            write_adapter_files(out, config, tensors)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(out)
            info.update(residual_adapter=str(out / RESIDUAL_ADAPTER_DIR), initial_adapter=str(out / INIT_ADAPTER_DIR))
            root_alpha = config["lora_alpha"]
        else:
            _set_adapter_base(out, info["base_model"])
            root_alpha = model.peft_config[ADAPTER_NAME].lora_alpha
        write_record(out, applies_to="original", base_model=info["base_model"], fingerprint=root_fingerprint,
                     r=(2 if svd else 1) * model_args.lora_r, lora_alpha=root_alpha, **common)
        info["standard_lora_adapter"] = str(out)
        if model_args.load_in_4bit:
            from milora.sft.quantized import note_standard_lora_difference

            info["quantization"] = model_args.four_bit_settings().describe()
            info["standard_lora_difference"] = note_standard_lora_difference(
                trainer, recipe, info["standard_lora_adapter"], info["base_model"])
        if training.merge:
            if full_state is not None:
                save_merged_from_state_dict(model, full_state, out / MERGED_DIR, trainer.processing_class)
            else:
                merge_adapter(model, out / MERGED_DIR, trainer.processing_class)
            info["merged"] = str(out / MERGED_DIR)
        write_model_card(out, info)
        write_json(out / RUN_INFO_FILE, info)
    trainer.accelerator.wait_for_everyone()
    return info


def final_training_loss(log_history: list[dict]) -> float | None:
    """The last logged training loss."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


def _set_adapter_base(adapter_dir: Path, base: str | None) -> None:
    """Name the adapter's base in its config (for a residual base, None where the run did not save it)."""
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    config = read_json(config_path)
    config["base_model_name_or_path"] = base
    write_json(config_path, config, sort_keys=True)


def save_residual_base(model, full_state: dict | None, out_dir: Path, processing_class=None) -> Path:
    """The residual base model `W - B0 A0` the adapters of `residual_adapter/` apply to, as a full checkpoint."""
    from milora.init_dir import plain_state_dict, residual_state_dict

    # ZeRO-3: from the gathered state dict of the PEFT model
    state = residual_state_dict(model) if full_state is None else plain_state_dict(full_state)
    with atomic_directory(out_dir) as tmp:
        model.get_base_model().save_pretrained(tmp, state_dict=state)
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
    return out_dir
