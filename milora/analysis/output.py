"""Atomic file output for `milora analyze`: every file appears whole (temp file + os.replace) or not at all."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from milora.io import atomic_write_bytes

__all__ = ["atomic_write_bytes", "json_ready", "save_figure", "write_json"]


def json_ready(value):
    """`value` with non-finite floats as None (strict JSON has no NaN/Infinity) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | os.PathLike, value) -> Path:
    text = json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def save_figure(figure, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Render a matplotlib `Figure` to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
