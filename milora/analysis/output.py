"""File output for `milora analyze`: strict-JSON values and PNG figures, written atomically through `milora.io`."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from milora.io import atomic_write_bytes, write_json

__all__ = ["json_ready", "save_figure", "write_report_json"]


def json_ready(value):
    """`value` with non-finite floats as None (strict JSON has no NaN/Infinity) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_report_json(path: str | os.PathLike, value) -> Path:
    """`value` as strict JSON (non-finite floats as null), written atomically."""
    return write_json(path, json_ready(value))


def save_figure(figure, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Render a matplotlib `Figure` to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
