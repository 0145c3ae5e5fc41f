"""Result files of an evaluation run: atomic JSON/Markdown/JSONL writers and the results table.

Every file is written to a temporary file in the target directory and moved into place with `os.replace`,
so a reader never sees half a file and an interrupted run never leaves one behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from milora.io import atomic_write_text


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path through a temporary file in the same directory and `os.replace`."""
    return atomic_write_text(path, text)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars, tuples, paths and the like; NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return None if (math.isnan(value) or math.isinf(value)) else float(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return to_jsonable(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(to_jsonable(data), indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    lines = [json.dumps(to_jsonable(row), ensure_ascii=False) for row in rows]
    return write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def metric_rows(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, Any]]:
    """(task, metric, value) rows in task order, metric names sorted."""
    return [(task, name, value) for task, values in metrics.items() for name, value in sorted(values.items())]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return "n/a" if value is None else str(value)


def markdown_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A GitHub Markdown table with one row per (task, metric)."""
    lines = ["| task | metric | value |", "| --- | --- | ---: |"]
    for task, name, value in metric_rows(metrics):
        lines.append(f"| {task} | {name} | {_format_value(value)} |")
    return "\n".join(lines) + "\n"


def results_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report of a run: a header naming suite and model, the table, and any skipped task."""
    text = f"# {report['suite']} evaluation of `{report['model']}`\n\n" + markdown_table(report["metrics"])
    if report.get("skipped"):
        text += "\nSkipped:\n\n" + "".join(f"- {task}: {reason}\n" for task, reason in report["skipped"].items())
    return text


def write_report(output_dir: str | os.PathLike, report: Mapping[str, Any], stem: str = "results") -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` in output_dir, both written atomically."""
    output_dir = Path(output_dir)
    json_path = write_json_atomic(output_dir / f"{stem}.json", report)
    md_path = write_text_atomic(output_dir / f"{stem}.md", results_markdown(report))
    return json_path, md_path
