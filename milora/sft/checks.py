"""Checks of a parsed recipe that need more than one dataclass or the file system; each refuses, none changes
a value. They run before anything loads, so a bad recipe fails in seconds, not after a 7B model has loaded."""

from __future__ import annotations

import os
import re

from milora.data import is_local_data_path
from milora.gguf import GGUFError, checked_gguf_file, require_gguf_package
from milora.model_source import GGUF, TINY, ModelSource
from milora.sft.config import RecipeError
from milora.tiny import TINY_KINDS, TINY_PREFIX


def check_recipe(recipe) -> None:
    """Every check, in the order a reader meets the keys: model, data, chat template."""
    where = f" in {recipe.path}" if recipe.path else ""
    if recipe.model.milora_init_dir is None:
        check_model_source(recipe.model.model_source, where)
    else:
        check_init_dir_targets(recipe.model, recipe.training.trust_remote_code)
    check_dataset(recipe.data.dataset_name, recipe.path, where)
    check_chat_template(recipe.training.chat_template_path)
    zero = zero_settings(recipe.training)
    check_zero3_merge(recipe.training.merge, zero)
    check_4bit_launch(recipe.model, zero)
    check_fp8_launch(recipe.model, zero)


def check_model_source(source: ModelSource | None, where: str = "") -> None:
    """A tiny causal LM, a saved model directory, a `.gguf` file, or (anything else) a hub id."""
    if source is None:
        raise RecipeError(f"no model{where}: set model_name_or_path (hub id, local directory or tiny:KIND)")
    name = source.name
    if source.kind == TINY:
        kind = name[len(TINY_PREFIX):]
        if kind not in TINY_KINDS or kind == "bert":
            causal = [TINY_PREFIX + k for k in TINY_KINDS if k != "bert"]
            raise RecipeError(f"model_name_or_path {name!r} is not a tiny causal LM; use one of {', '.join(causal)}")
    elif source.kind == GGUF:
        try:
            checked_gguf_file(name)
            require_gguf_package()
        except GGUFError as error:
            raise RecipeError(f"model_name_or_path: {error}") from None
    elif (name.startswith((".", "/", "~")) or os.path.exists(name)) and not os.path.isdir(name):
        raise RecipeError(f"model_name_or_path {name}: no such directory")
    elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise RecipeError(f"model_name_or_path {name} has no config.json (not a saved model directory)")


def check_init_dir_targets(model, trust_remote_code: bool = False) -> None:
    """`lora_target_modules` set beside a `milora_init_dir` must select the modules the init directory's adapter was
    built on: that adapter trains as saved, so other targets would be silently replaced by its own. Compared on
    the modules each selects in the model (a list, a comma string, a regex or all-linear), built from the init
    directory's config on the meta device. Method, rank and alpha are compared as `ModelArguments` is built."""
    requested, init_dir = model.recipe_target_modules, model.milora_init_dir
    if init_dir is None or requested is None:
        return
    built = model.lora_target_modules  # the init directory's adapter's `target_modules`
    if _plain_names(requested) is not None and _plain_names(requested) == _plain_names(built):
        return
    from milora.model import MiLoRAError, resolve_target_modules

    skeleton = _model_skeleton(init_dir, trust_remote_code)
    init_modules = resolve_target_modules(skeleton, built)
    try:
        recipe_modules = resolve_target_modules(skeleton, requested)
    except MiLoRAError:  # selects nothing, or a layer that is not linear: not the init directory's modules either
        recipe_modules = []
    if sorted(recipe_modules) == sorted(init_modules):
        return
    recorded = model.init_record.targets if model.init_record is not None else None
    built_as = _describe_targets(recorded or built)
    wanted = requested if isinstance(requested, str) else ",".join(requested)
    selects = f"selects {len(recipe_modules)} modules" if recipe_modules else "selects no module"
    raise RecipeError(
        f"lora_target_modules: {_describe_targets(requested)} ({selects}) contradicts milora_init_dir {init_dir}, "
        f"whose adapter was built with targets {built_as} ({len(init_modules)} modules); drop lora_target_modules "
        f"from the recipe to train the init directory's targets, or re-run `milora init --targets {wanted} ...` "
        "to build an init directory with the targets you want"
    )


def _plain_names(targets) -> list[str] | None:
    """Sorted module-name suffixes of a list or comma string of plain names; None for a regex or all-linear."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = sorted({name.strip() for name in names if name.strip()})
    if not names or not all(re.fullmatch(r"[\w.]+", name) for name in names):
        return None
    return names


def _describe_targets(targets) -> str:
    """Targets for a message: as spelled, or for a long list of full module names, their suffixes and count."""
    if isinstance(targets, str):
        return targets
    if len(targets) <= 8:
        return ",".join(targets)
    return f"{','.join(sorted({name.rsplit('.', 1)[-1] for name in targets}))} (in {len(targets)} layers)"


def _model_skeleton(init_dir: str, trust_remote_code: bool):
    """The init directory's model architecture on the meta device: module names and types, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from milora.loading import model_class

    try:
        config = AutoConfig.from_pretrained(init_dir, trust_remote_code=trust_remote_code)
        cls = model_class(config)
        with torch.device("meta"):
            if cls is AutoModelForCausalLM:
                return cls.from_config(config, trust_remote_code=trust_remote_code)
            return cls(config)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"milora_init_dir {init_dir}: its model could not be built to compare lora_target_modules with its "
            f"adapter's ({error}); drop lora_target_modules from the recipe (the init directory's targets are used)"
        ) from None


def check_dataset(name: str | None, recipe_path: str | None, where: str = "") -> None:
    """A dataset is named, and a local one exists (the message says where it was looked for)."""
    if name is None:
        raise RecipeError(f"no dataset{where}: set dataset_name (hub id or local json/jsonl/parquet file)")
    if is_local_data_path(name) and not os.path.exists(os.path.expanduser(name)):
        tried = [name]
        if recipe_path and not os.path.isabs(name):
            tried.append(os.path.join(os.path.dirname(os.path.abspath(recipe_path)), name))
        raise RecipeError(f"dataset file not found: {name} (looked for {' and '.join(tried)})")


def check_chat_template(path: str | None) -> None:
    if path and path.endswith((".jinja", ".j2")) and not os.path.isfile(path):
        raise RecipeError(f"chat_template_path {path}: no such file")


def zero_settings(training) -> dict:
    """The `zero_optimization` section of the run's DeepSpeed config; empty without DeepSpeed."""
    config = getattr(getattr(training, "deepspeed_plugin", None), "deepspeed_config", None)
    return (config.get("zero_optimization") or {}) if isinstance(config, dict) else {}


def check_zero3_merge(merge: bool, zero: dict) -> None:
    """`merge: true` under ZeRO-3 gathers the full 16-bit state dict after training, which DeepSpeed only allows
    with `stage3_gather_16bit_weights_on_model_save`; refuse now rather than after the training run."""
    if merge and str(zero.get("stage")) == "3" and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise RecipeError(
            "merge: true under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in the "
            "DeepSpeed config (deepspeed_configs/ds_zero3.json sets it); set it, or set merge: false and run "
            "`milora merge` after training"
        )


def check_4bit_launch(model_args, zero: dict) -> None:
    """A 4-bit base needs bitsandbytes and cannot be partitioned by ZeRO-3 (its packed weights are not float
    parameters); refuse before anything loads."""
    if not model_args.load_in_4bit:
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError("load_in_4bit: true needs bitsandbytes: `pip install bitsandbytes>=0.50` "
                          "(or `pip install -e .[quantization]`)")
    if str(zero.get("stage")) == "3":
        raise RecipeError("load_in_4bit: true does not run under DeepSpeed ZeRO-3 (4-bit weights are not partitioned); "
                          "use plain data parallel or ZeRO-2")


def check_fp8_launch(model_args, zero: dict) -> None:
    """An FP8 base is made from whole frozen weights, which ZeRO-3 partitions; refuse before anything loads."""
    if model_args.fp8_base and str(zero.get("stage")) == "3":
        raise RecipeError("fp8_base: true does not run under DeepSpeed ZeRO-3 (its FP8 copies are made from whole "
                          "frozen weights, which ZeRO-3 partitions); use plain data parallel or ZeRO-2")
