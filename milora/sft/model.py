"""The tokenizer and the model a recipe trains: one function each. Every model path is loaded through
`milora.loading.load_model` (directly, or by `milora.load_init_dir` for a `milora init` directory)."""

from __future__ import annotations

import os

import torch

from milora.distributed import ADAPTER_NAME, lora_layers
from milora.sft.config import MiloraSFTConfig, ModelArguments, RecipeError
from milora.tiny import is_tiny


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer (processor for vision-language models): the init directory's when it saved one."""
    from milora.loading import load_processing_class

    source = model_args.model_name_or_path
    init_dir = model_args.milora_init_dir
    if init_dir is not None and (source is None or os.path.isfile(os.path.join(init_dir, "tokenizer_config.json"))):
        source = init_dir
    try:
        return load_processing_class(source)
    except (OSError, ValueError) as error:
        raise RecipeError(f"no tokenizer found for {source}: {error}") from error


def load_base_model(model_args: ModelArguments, training: MiloraSFTConfig):
    """The pretrained model the method is applied to."""
    from milora.loading import load_model

    hub_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training.trust_remote_code}
    return load_model(
        model_args.model_name_or_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **({} if is_tiny(model_args.model_name_or_path) else hub_kwargs),
    )


def build_peft_model(model_args: ModelArguments, training: MiloraSFTConfig):
    """The PEFT model to train: the method applied to the base model, or a `milora init` directory as saved
    (its adapter given the recipe's dropout)."""
    from milora import apply_milora, load_init_dir

    four_bit = model_args.four_bit_settings()
    if model_args.milora_init_dir is not None:
        quantized = {} if four_bit is None else {"quantization_config": init_dir_4bit_config(model_args, four_bit)}
        peft_model = load_init_dir(
            model_args.milora_init_dir, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
            trust_remote_code=training.trust_remote_code, **quantized,
        )
        set_lora_dropout(peft_model, model_args.lora_dropout)
        return peft_model
    return apply_milora(
        load_base_model(model_args, training),
        model_args.lora_target_modules,
        model_args.lora_r,
        mode=model_args.method,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        seed=training.seed,
        modules_to_save=model_args.lora_modules_to_save,
        cache_dir=model_args.milora_cache_dir,
        quantization=four_bit,
        quantization_iterations=model_args.qpissa_iterations,
        # decompose on this process's GPU: minutes for a 7B model instead of most of an hour on CPU
        device=training.device if training.device.type == "cuda" else None,
        show_progress=training.local_process_index == 0 and not training.disable_tqdm,
    )


def init_dir_4bit_config(model_args: ModelArguments, four_bit):
    """The `BitsAndBytesConfig` that quantizes a `milora init` residual on loading, as `apply_milora` would."""
    from milora.loading import is_vision_language, resolve_dtype
    from milora.quantization import skipped_module_names

    skip = skipped_module_names(is_vision_language(model_args.milora_init_dir), model_args.lora_modules_to_save)
    return four_bit.bnb_config(skip, resolve_dtype(model_args.dtype, "cpu"))


def set_lora_dropout(peft_model, p: float, adapter_name: str = ADAPTER_NAME) -> None:
    """Use the recipe's dropout on an adapter loaded from disk (`milora init` saves its adapter without one)."""
    for _, module in lora_layers(peft_model, adapter_name):
        if adapter_name in module.lora_dropout:
            module.lora_dropout[adapter_name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    peft_model.peft_config[adapter_name].lora_dropout = p
