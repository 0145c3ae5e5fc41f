"""Loading models and their tokenizer/processor by hub id, local path, `.gguf` file or `tiny:<kind>`, the same way
everywhere (recipes, `milora init`, `milora merge`, analysis, evaluation), and the helpers that go with it:
dtype names, the default device and dtype, and whether a model is a vision-language one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from milora import gguf, tiny
from milora.attention import VARLEN_ATTENTION, register_varlen_attention

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype, device: str | torch.device | None = None):
    """A torch dtype for a name (`bfloat16`, `bf16`, `float32`, ...). `auto` stays `auto` (the checkpoint's own
    dtype, for `from_pretrained`), or, for a given `device`, becomes `default_dtype(device)`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "auto" and device is not None:
        return default_dtype(device)
    return DTYPES[dtype]


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float32 elsewhere (the `auto` choice of recipes and evaluation)."""
    on_gpu = device is None or str(device).startswith("cuda")
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_type_of(name_or_path: str) -> str:
    """The `model_type` of a checkpoint (reads config.json locally; AutoConfig for hub ids)."""
    if tiny.is_tiny(name_or_path):
        return tiny.tiny_config(tiny.tiny_kind(name_or_path)).model_type
    if gguf.is_gguf_path(name_or_path):
        return gguf.load_gguf_config(name_or_path).model_type
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type", "")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path).model_type


VISION_LANGUAGE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


def is_vision_language(model_or_name) -> bool:
    """Whether a model (plain or PEFT-wrapped), a config, or a model name/path (`tiny:llava`, a hub id, a local
    directory) is a vision-language model of the LLaVA family."""
    if isinstance(model_or_name, (str, os.PathLike)):
        model_type = model_type_of(str(model_or_name))
    else:
        config = getattr(model_or_name, "config", model_or_name)
        model_type = getattr(config, "model_type", None)
    return model_type in VISION_LANGUAGE_MODEL_TYPES


def model_class(model_or_name):
    """The transformers class a model is built with: `LlavaForConditionalGeneration` for a vision-language model
    (`is_vision_language`: a model, a config or a name/path), else `AutoModelForCausalLM`."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration if is_vision_language(model_or_name) else AutoModelForCausalLM


def load_model(name_or_path: str, dtype="auto", attn_implementation: str | None = None, **kwargs):
    """A causal LM (or a LLaVA model) from a hub id, a local directory, a `.gguf` file or `tiny:<kind>`."""
    dtype = resolve_dtype(dtype)
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    if tiny.is_tiny(name_or_path):
        model = tiny.tiny_model(tiny.tiny_kind(name_or_path), dtype=torch.float32 if dtype in (None, "auto") else dtype)
        if attn_implementation == VARLEN_ATTENTION:
            model.set_attn_implementation(VARLEN_ATTENTION)
        return model
    if gguf.is_gguf_path(name_or_path):
        return gguf.load_gguf_model(name_or_path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    if "/" not in name_or_path.strip("./") and not Path(name_or_path).exists():
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor a hub id (org/name) nor tiny:<kind>"
        )
    if Path(name_or_path).exists() and not (Path(name_or_path) / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path} has no config.json: give a model directory saved with save_pretrained, "
            "a hub id, or tiny:<kind>"
        )
    cls = model_class(name_or_path)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return cls.from_pretrained(name_or_path, dtype=dtype, **kwargs)


def load_processing_class(name_or_path: str):
    """The tokenizer (or, for vision-language models, the processor) that goes with a model."""
    if tiny.is_tiny(name_or_path):
        kind = tiny.tiny_kind(name_or_path)
        return tiny.tiny_processor() if kind == "llava" else tiny.tiny_tokenizer()
    if gguf.is_gguf_path(name_or_path):
        return gguf.load_gguf_tokenizer(name_or_path)
    if is_vision_language(name_or_path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
