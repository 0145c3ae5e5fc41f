"""Markdown tables of the miniature (scripts/miniature_tables.py `table`): one row per method, mean ± spread over
seeds (spread = half the range; every seed's value in brackets), the base model before finetuning for
reference, training time, peak GPU memory and the forgetting loss."""

from __future__ import annotations

from statistics import mean

METHOD_LABELS = {"lora": "LoRA (alpha 2r)", "pissa": "PiSSA (alpha r)", "milora": "MiLoRA (alpha r)",
                 "qlora": "QLoRA (nf4 base)", "qpissa": "QPiSSA (nf4, 5 refits)", "qmilora": "QMiLoRA (nf4 residual)",
                 "fp8lora": "LoRA (FP8 base)", "fp8pissa": "PiSSA (FP8 base)", "fp8milora": "MiLoRA (FP8 base)"}
COMMONSENSE_COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "winogrande": "WinoG",
                       "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def summary(values: list[float], digits: int = 1) -> str:
    """`m` for one value, `m ± s (a, b, ...)` for several (s = half the range)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    spread = (max(values) - min(values)) / 2
    listed = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{mean(values):.{digits}f} ± {spread:.{digits}f} ({listed})"


def runs_of(names, task: str, method: str) -> list[str]:
    return sorted(n for n in names if n.startswith(f"{task}_{method}_s"))


def part_value(evals: dict, name: str, part: str, key: str = "accuracy"):
    return evals.get(name, {}).get("parts", {}).get(part, {}).get(key)


def commonsense_average(evals: dict, name: str):
    values = [part_value(evals, name, part) for part in COMMONSENSE_COLUMNS]
    return mean(values) if values and None not in values else None


def cost_cells(train_stats: dict, runs: list[str]) -> list[str]:
    """Training minutes (trainer runtime) and peak GPU memory (GiB), over the runs."""
    minutes = [train_stats[r]["train_runtime_s"] / 60 for r in runs if train_stats.get(r, {}).get("train_runtime_s")]
    peaks = [train_stats[r]["peak_gpu_mib"] / 1024 for r in runs if train_stats.get(r, {}).get("peak_gpu_mib")]
    return [summary(minutes), summary(peaks, 2)]


def forgetting_cell(evals: dict, names: list[str]) -> str:
    base = part_value(evals, "base", "forgetting", "nll")
    values = [part_value(evals, n, "forgetting", "nll") for n in names]
    cell = summary(values, 3)
    if base is not None and names != ["base"] and None not in values and values:
        cell += f" ({mean(values) - base:+.3f})"
    return cell


def table_rows(task: str, train_stats: dict, evals: dict, value_cells) -> list[str]:
    rows = []
    for label, names in [("Base (no finetuning)", ["base"])] + [
            (METHOD_LABELS[m], runs_of(evals, task, m)) for m in METHOD_LABELS]:
        if not names or not all(n in evals for n in names):
            continue
        costs = ["–", "–"] if names == ["base"] else cost_cells(train_stats, names)
        rows.append("| " + " | ".join([label, *value_cells(names), forgetting_cell(evals, names), *costs]) + " |")
    return rows


def math_table(train_stats: dict, evals: dict) -> str:
    def cells(names):
        return [summary([part_value(evals, n, "gsm8k") for n in names]),
                summary([part_value(evals, n, "gsm8k", "accuracy_flexible") for n in names]),
                str(len(names)) if names != ["base"] else "–"]

    head = ("| method | GSM8K acc. (%) | GSM8K, last number (%) | seeds | forgetting NLL (Δ base) | train min | "
            "peak GiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    return "\n".join([head, *table_rows("math", train_stats, evals, cells)])


def commonsense_table(train_stats: dict, evals: dict) -> str:
    def cells(names):
        per_set = [summary([part_value(evals, n, part) for n in names]) for part in COMMONSENSE_COLUMNS]
        return [*per_set, summary([commonsense_average(evals, n) for n in names])]

    columns = " | ".join(COMMONSENSE_COLUMNS.values())
    head = (f"| method | {columns} | Avg. | forgetting NLL (Δ base) | train min | peak GiB |\n"
            "| --- |" + " ---: |" * (len(COMMONSENSE_COLUMNS) + 4))
    return "\n".join([head, *table_rows("commonsense", train_stats, evals, cells)])


def failures(train_stats: dict) -> list[str]:
    return [f"- {name}: {stats.get('status')} ({stats.get('error', 'no error recorded')})"
            for name, stats in sorted(train_stats.items()) if stats.get("status") != "done"]


def rows_note(evals: dict) -> str:
    base = evals.get("base", {}).get("parts", {})
    counts = ", ".join(f"{part} {scores.get('rows')}" for part, scores in base.items())
    return f"Rows evaluated per set: {counts}." if counts else ""


def markdown_tables(train_stats: dict, evals: dict) -> str:
    parts = ["### Math (GSM8K test, miniature of Table 2)", "", math_table(train_stats, evals), "",
             "### Commonsense (LLM-Adapters test sets, miniature of Table 1)", "",
             commonsense_table(train_stats, evals), "", rows_note(evals)]
    failed = failures(train_stats)
    if failed:
        parts += ["", "Runs that did not finish:", *failed]
    return "\n".join(parts) + "\n"
