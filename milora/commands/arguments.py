"""Checks of path arguments shared by the `milora` subcommands, so that a typo in a path is reported as
such (with the fix) instead of as the hub-id error transformers raises for a path that does not exist."""

from __future__ import annotations

import os
from pathlib import Path

from milora.gguf import checked_gguf_file, is_gguf_path
from milora.layout import ADAPTER_CONFIG_FILE

TINY_PREFIX = "tiny:"


def looks_like_local_path(value: str) -> bool:
    """A local path rather than a hub id (`name` or `namespace/name`) or `tiny:KIND`."""
    if value.startswith(TINY_PREFIX):
        return False
    return (Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1
            or (os.sep != "/" and os.sep in value))


def check_model_argument(flag: str, value: str) -> None:
    """Refuse a local model path that is missing or is a file (other than a GGUF file); hub ids and `tiny:KIND`
    pass unchecked."""
    path = Path(value).expanduser()
    if is_gguf_path(value):
        checked_gguf_file(value)  # GGUFError: missing, not a file, not GGUF
        return
    if path.is_file():
        raise NotADirectoryError(f"{flag} {value} is a file; give the model's directory (with config.json)")
    if looks_like_local_path(value) and not path.exists():
        raise FileNotFoundError(
            f"{flag} {value}: no such directory; give a local model directory, a hub id (namespace/name) "
            f"or {TINY_PREFIX}KIND"
        )


def check_adapter_dir(flag: str, value: str) -> None:
    """Refuse a directory that holds no PEFT adapter."""
    if not (Path(value).expanduser() / ADAPTER_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{flag} {value} has no {ADAPTER_CONFIG_FILE}; give a directory written by PeftModel.save_pretrained "
            "(a training run's output directory or one of its checkpoint-N/ folders)"
        )
