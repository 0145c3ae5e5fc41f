"""Checks of a parsed recipe that need more than one dataclass or the file system; each refuses, none changes
a value. They run before anything loads, so a bad recipe fails in seconds, not after a 7B model has loaded."""

from __future__ import annotations

import os

from milora.data import is_local_data_path
from milora.gguf import GGUFError, checked_gguf_file, is_gguf_path, require_gguf_package
from milora.sft.config import RecipeError
from milora.tiny import TINY_KINDS, TINY_PREFIX, is_tiny


def check_recipe(recipe) -> None:
    """Every check, in the order a reader meets the keys: model, data, chat template."""
    where = f" in {recipe.path}" if recipe.path else ""
    if recipe.model.milora_init_dir is None:
        check_model_source(recipe.model.model_name_or_path, where)
    check_dataset(recipe.data.dataset_name, recipe.path, where)
    check_chat_template(recipe.training.chat_template_path)
    check_zero3_merge(recipe.training)


def check_model_source(name: str | None, where: str = "") -> None:
    """A tiny causal LM, a saved model directory, a `.gguf` file, or (anything else) a hub id."""
    if name is None:
        raise RecipeError(f"no model{where}: set model_name_or_path (hub id, local directory or tiny:KIND)")
    if is_tiny(name):
        kind = name[len(TINY_PREFIX):]
        if kind not in TINY_KINDS or kind == "bert":
            causal = [TINY_PREFIX + k for k in TINY_KINDS if k != "bert"]
            raise RecipeError(f"model_name_or_path {name!r} is not a tiny causal LM; use one of {', '.join(causal)}")
    elif is_gguf_path(name):
        try:
            checked_gguf_file(name)
            require_gguf_package()
        except GGUFError as error:
            raise RecipeError(f"model_name_or_path: {error}") from None
    elif (name.startswith((".", "/", "~")) or os.path.exists(name)) and not os.path.isdir(name):
        raise RecipeError(f"model_name_or_path {name}: no such directory")
    elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise RecipeError(f"model_name_or_path {name} has no config.json (not a saved model directory)")


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


def check_zero3_merge(training) -> None:
    """`merge: true` under ZeRO-3 gathers the full 16-bit state dict after training, which DeepSpeed only allows
    with `stage3_gather_16bit_weights_on_model_save`; refuse now rather than after the training run."""
    plugin = getattr(training, "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None)
    if not training.merge or not isinstance(config, dict):
        return
    zero = config.get("zero_optimization") or {}
    if str(zero.get("stage")) == "3" and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise RecipeError(
            "merge: true under DeepSpeed ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true in the "
            "DeepSpeed config (deepspeed_configs/ds_zero3.json sets it); set it, or set merge: false and run "
            "`milora merge` after training"
        )
