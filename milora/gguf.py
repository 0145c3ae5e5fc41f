"""GGUF checkpoints (llama.cpp's single-file format) wherever a model path is accepted.

A path ending in `.gguf` names one file holding the weights (often quantized), the config, the tokenizer and
its chat template. transformers reads it with `from_pretrained(folder, gguf_file=name)` and the `gguf` package,
dequantizing every tensor to a float dtype; this module wraps that with clear errors and returns an ordinary
float model: the loader's GGUF quantizer is dropped, so the model saves as a plain safetensors checkpoint
(`milora init`, `merge`, training outputs) and PEFT/apply_milora treat it like any other float model.

    python -m milora.gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m   # one-off conversion

Converting once is worth it when many processes load the same file: reading and dequantizing a GGUF takes
tens of seconds of CPU, loading the converted safetensors a second or two.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from milora.errors import MiLoRAError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


class GGUFError(MiLoRAError):
    """A GGUF file that cannot be loaded as given; the message says why and what to do."""


def is_gguf_path(name_or_path) -> bool:
    """True for a path (existing or not) whose file name ends in `.gguf`."""
    return isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path).lower().endswith(GGUF_SUFFIX)


def require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("reading .gguf checkpoints needs the `gguf` package: pip install gguf")


def checked_gguf_file(path) -> Path:
    """The GGUF file as an absolute path, after checking that it exists, is a file and starts with the magic."""
    file = Path(os.path.expanduser(str(path))).absolute()
    if not file.exists():
        raise GGUFError(f"GGUF file not found: {path}")
    if not file.is_file():
        raise GGUFError(f"{path} is not a file (a .gguf path must name a single GGUF file)")
    with file.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}); is the download complete?")
    return file


def _from_gguf(path, auto_class, what: str, **kwargs):
    """`auto_class.from_pretrained` on the file's folder with `gguf_file=`, its errors named after the file."""
    require_gguf_package()
    file = checked_gguf_file(path)
    try:
        return auto_class.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise GGUFError(f"transformers cannot read the {what} of {path}: {error}") from error


def load_gguf_config(path):
    """The model config stored in a GGUF file (architecture, sizes)."""
    from transformers import AutoConfig

    return _from_gguf(path, AutoConfig, "config")


def load_gguf_tokenizer(path):
    """The tokenizer stored in a GGUF file, with its chat template and special tokens."""
    from transformers import AutoTokenizer

    return _from_gguf(path, AutoTokenizer, "tokenizer")


def forget_gguf_quantizer(model) -> None:
    """Make a model loaded from GGUF an ordinary float model: its weights are already dequantized, but the
    loader leaves its quantizer attached, which makes `save_pretrained` refuse and writes a
    `quantization_config` that would send the next load back to the GGUF reader."""
    for attribute in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attribute in vars(model):
            delattr(model, attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def load_gguf_model(path, dtype="auto", attn_implementation: str | None = None, **kwargs):
    """A float causal LM from a GGUF file (tensors dequantized to `dtype`; `auto`: float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from milora.dtypes import resolve_dtype

    dtype = resolve_dtype(dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.pop("revision", None)  # a local file has no hub revision
    model = _from_gguf(path, AutoModelForCausalLM, "weights",
                       dtype=torch.float32 if dtype in (None, "auto") else dtype, **kwargs)
    forget_gguf_quantizer(model)
    model.config._name_or_path = str(checked_gguf_file(path))
    return model


def convert_gguf(path, out_dir, dtype="float32") -> Path:
    """Write the GGUF model and its tokenizer as an ordinary checkpoint directory (safetensors), atomically."""
    from milora.io import atomic_directory

    model = load_gguf_model(path, dtype=dtype)
    tokenizer = load_gguf_tokenizer(path)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _convert_command(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m milora.gguf", description="Convert a GGUF file into a checkpoint directory (safetensors).",
        epilog="--debug shows the Python traceback of an error.",
    )
    parser.add_argument("gguf_file", help="the .gguf file")
    parser.add_argument("out_dir", help="output directory (model + tokenizer)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    args = parser.parse_args(argv)
    convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"milora.gguf: {args.out_dir} written")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m milora.gguf`: bad input is reported as one line with exit status 2, as by the `milora`
    subcommands (`--debug` shows the traceback)."""
    from milora.reporting import run_command

    return run_command("milora.gguf", _convert_command, argv)


if __name__ == "__main__":
    sys.exit(main())
