"""The tokenizer and the model a recipe trains: one function each. Every model path is loaded through
`milora.loading.load_model` (directly, or by `milora.load_init_dir` for a `milora init` directory)."""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from milora.distributed import ADAPTER_NAME, adapted_module_names, lora_layers
from milora.layout import INIT_SUBDIR
from milora.model_source import TINY
from milora.sft.config import MiloraSFTConfig, ModelArguments, RecipeError

logger = logging.getLogger(__name__)


def load_tokenizer(model_args: ModelArguments):
    """The tokenizer (processor for vision-language models): the init directory's when it saved one."""
    from milora.loading import load_processing_class

    source = model_args.model_source  # the init directory's, else the model's
    init_dir, name = model_args.milora_init_dir, model_args.model_name_or_path
    saved_one = init_dir is not None and os.path.isfile(os.path.join(init_dir, "tokenizer_config.json"))
    if init_dir is not None and name is not None and not saved_one:
        source = name  # an init directory saved without a tokenizer: the original model's
    try:
        return load_processing_class(source)
    except (OSError, ValueError) as error:
        raise RecipeError(f"no tokenizer found for {source}: {error}") from error


def load_base_model(model_args: ModelArguments, training: MiloraSFTConfig):
    """The pretrained model the method is applied to."""
    from milora.loading import load_model

    hub_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training.trust_remote_code}
    source = model_args.model_source
    return load_model(
        source, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        **({} if source.kind == TINY else hub_kwargs),
    )


def build_peft_model(model_args: ModelArguments, training: MiloraSFTConfig):
    """The PEFT model to train and the fingerprint of the original model (`milora.fingerprint`; None when no
    record of it exists): the method applied to the base model, or a `milora init` directory as saved (its
    adapter given the recipe's dropout, its residual checked against the record `milora init` wrote)."""
    from milora import apply_milora, load_init_dir
    from milora.fingerprint import model_fingerprint, read_record
    from milora.model import resolve_target_modules

    four_bit = model_args.four_bit_settings()
    if model_args.milora_init_dir is not None:
        check_init_dir_files(model_args.milora_init_dir)
        quantized = {} if four_bit is None else {"quantization_config": init_dir_4bit_config(model_args, four_bit)}
        peft_model = load_init_dir(
            model_args.milora_init_dir, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
            trust_remote_code=training.trust_remote_code, **quantized,
        )
        set_lora_dropout(peft_model, model_args.lora_dropout)
        record = read_record(os.path.join(model_args.milora_init_dir, INIT_SUBDIR)) or {}
        if four_bit is None:  # a residual loaded in 4 bits holds packed bytes, which have no fingerprint
            check_init_dir_residual(peft_model, model_args.milora_init_dir, record)
        return with_fp8_base(peft_model, model_args), record.get("original_fingerprint")
    base = load_base_model(model_args, training)
    original = model_fingerprint(base, resolve_target_modules(base, model_args.lora_target_modules))
    peft_model = apply_milora(
        base,
        model_args.lora_target_modules,
        model_args.lora_r,
        method=model_args.method,
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
    return with_fp8_base(peft_model, model_args), original


def with_fp8_base(peft_model, model_args: ModelArguments):
    """The PEFT model with its frozen decoder layers multiplying in FP8 when the recipe asks (`fp8_base`,
    `milora.fp8`); unchanged otherwise. The adapters are in place, so only the frozen layers are converted."""
    if not model_args.fp8_base:
        return peft_model
    from milora.fp8 import convert_frozen_linears_to_fp8

    # ZeRO-3 is refused before anything loads (milora.sft.checks.check_fp8_launch)
    convert_frozen_linears_to_fp8(peft_model)
    return peft_model


def check_init_dir_files(init_dir: str) -> None:
    """Refuse an init directory with a truncated or partly written weights file, before loading reads it."""
    from pathlib import Path

    from milora.io import DamagedFileError, safetensors_keys

    for path in [*sorted(Path(init_dir).glob("*.safetensors")), *Path(init_dir, INIT_SUBDIR).glob("*.safetensors")]:
        try:
            safetensors_keys(path)
        except DamagedFileError as error:
            raise RecipeError(
                f"milora_init_dir {init_dir}: {path} is damaged (truncated or partly written: "
                f"{str(error.__cause__ or error)[:120]}); make the init directory again with `milora init`"
            ) from None


def check_init_dir_residual(peft_model, init_dir: str, record: dict) -> None:
    """Refuse an init directory whose residual model is not the one its adapter was made for (replaced or
    rewritten since `milora init`); directories without a record are not checked."""
    from milora.fingerprint import fingerprint_dtype, model_fingerprint, same_base

    if not record.get("fingerprint"):
        return
    names = adapted_module_names(peft_model)
    found = model_fingerprint(peft_model, names)
    if not same_base(record["fingerprint"], found, fingerprint_dtype(peft_model, names)):
        raise RecipeError(
            f"milora_init_dir {init_dir}: its residual model is not the one its adapter {INIT_SUBDIR}/ was made for "
            "(the weights' fingerprint differs); make the init directory again with `milora init`"
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


def compile_decoder_layers(trainer, training: MiloraSFTConfig) -> int:
    """Compile the trainer's model's decoder layers in place when the recipe asks (`torch_compile: true`, see
    `MiloraSFTConfig`); the number of layers compiled (0 when not asked). They compile at the first steps. With
    `torch_compile_mode: reduce-overhead` (CUDA graphs) the trainer also marks where each optimizer step begins."""
    options = training.decoder_layer_compile
    if not options:
        return 0
    from milora.regional_compile import compile_repeated_blocks

    compiled = compile_repeated_blocks(trainer.model, **options)
    logger.info("torch_compile: %d decoder layers compiled in place (%s)", compiled, options["backend"])
    if options.get("mode") == "reduce-overhead":
        trainer.add_callback(CudaGraphStepMarker())
    return compiled


class CudaGraphStepMarker(TrainerCallback):
    """Tells the compiled layers' CUDA graphs where an optimizer step begins: the last step's graph outputs are then
    known to be dead, and their memory is reused without a check."""

    def on_step_begin(self, args, state, control, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
