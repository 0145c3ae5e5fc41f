"""Dtype names and the default device and dtype, for every loader (`milora.loading`, `milora.gguf`)."""

from __future__ import annotations

import torch

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
