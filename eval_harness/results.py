"""Result files of an evaluation run: ``results.json``, ``results.md``, ``samples/<task>.jsonl``, and the table.

Files are written atomically through `milora.io` (a reader never sees half a file, an interrupted run never
leaves one behind); values are turned into plain JSON first (`to_jsonable`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milora.io import atomic_write_text, write_json, write_jsonl


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
    json_path = write_json(output_dir / f"{stem}.json", to_jsonable(report))
    md_path = atomic_write_text(output_dir / f"{stem}.md", results_markdown(report))
    return json_path, md_path


def write_samples(output_dir: str | os.PathLike, records: Mapping[str, list]) -> list[Path]:
    """``samples/<task>.jsonl`` per task: the per-item records (prompt, response, score ...)."""
    samples_dir = Path(output_dir) / "samples"
    return [
        write_jsonl(samples_dir / f"{task.replace('/', '_')}.jsonl", to_jsonable(rows))
        for task, rows in records.items()
    ]
