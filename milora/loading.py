"""Loading models and their tokenizer/processor by hub id, local path, `.gguf` file or `tiny:<kind>`, the same way
everywhere (recipes, `milora init`, `milora merge`, analysis, evaluation), and the helpers that go with it:
dtype names, the default device and dtype, and whether a model is a vision-language one. What a model argument
names is decided by `milora.model_source`; the loaders take that value (or a name, which they turn into one)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from milora import gguf, tiny
from milora.attention import VARLEN_ATTENTION, register_varlen_attention
from milora.dtypes import DTYPES, default_device, default_dtype, resolve_dtype  # noqa: F401 (loaded from here too)
from milora.model_source import GGUF, LOCAL, TINY, VISION_LANGUAGE_MODEL_TYPES, ModelSource, model_source


def model_type_of(name_or_path: str | ModelSource) -> str:
    """The `model_type` of a checkpoint (reads config.json locally; AutoConfig for hub ids)."""
    return model_source(name_or_path).model_type


def is_vision_language(model_or_name) -> bool:
    """Whether a model (plain or PEFT-wrapped), a config, a `ModelSource` or a model name/path (`tiny:llava`, a
    hub id, a local directory) is a vision-language model of the LLaVA family."""
    if isinstance(model_or_name, (str, os.PathLike, ModelSource)):
        return model_source(model_or_name).vision_language
    config = getattr(model_or_name, "config", model_or_name)
    return getattr(config, "model_type", None) in VISION_LANGUAGE_MODEL_TYPES


def model_class(model_or_name):
    """The transformers class a model is built with: `LlavaForConditionalGeneration` for a vision-language model
    (`is_vision_language`: a model, a config, a `ModelSource` or a name/path), else `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration if is_vision_language(model_or_name) else AutoModelForCausalLM


def load_model(source: str | ModelSource, dtype="auto", attn_implementation: str | None = None, **kwargs):
    """A causal LM (or a LLaVA model) from a hub id, a local directory, a `.gguf` file or `tiny:<kind>` (a name, or
    its `ModelSource`)."""
    source = model_source(source)
    dtype = resolve_dtype(dtype)
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    if source.kind == TINY:
        model = tiny.tiny_model(tiny.tiny_kind(source.name), dtype=torch.float32 if dtype in (None, "auto") else dtype)
        if attn_implementation == VARLEN_ATTENTION:
            model.set_attn_implementation(VARLEN_ATTENTION)
        return model
    if source.kind == GGUF:
        return gguf.load_gguf_model(source.name, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    if source.kind == LOCAL and not Path(source.name).exists():
        raise FileNotFoundError(
            f"model {source.name!r} is neither a local directory nor a hub id (org/name) nor tiny:<kind>"
        )
    if source.kind == LOCAL and not (Path(source.name) / "config.json").is_file():
        raise FileNotFoundError(
            f"{source.name} has no config.json: give a model directory saved with save_pretrained, "
            "a hub id, or tiny:<kind>"
        )
    cls = model_class(source)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return cls.from_pretrained(source.name, dtype=dtype, **kwargs)


def load_processing_class(source: str | ModelSource):
    """The tokenizer (or, for vision-language models, the processor) that goes with a model."""
    source = model_source(source)
    if source.kind == TINY:
        return tiny.tiny_processor() if tiny.tiny_kind(source.name) == "llava" else tiny.tiny_tokenizer()
    if source.kind == GGUF:
        return gguf.load_gguf_tokenizer(source.name)
    if source.vision_language:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source.name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.name)
