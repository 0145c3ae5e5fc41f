"""The markdown table of training-throughput runs (the JSON files benchmarks/train_throughput.py writes).

One row per variant, the median over its repeats; the spread is (max - min) / 2 / median of tokens/s over
the repeats. "vs TRL defaults" is the tokens/s ratio. "step vs LoRA" compares a MiLoRA or PiSSA variant with
the LoRA variant of the same settings (lora_X for milora_X, pissa_X and milora_X_cached; qlora_X for the 4-bit
qmilora_X and qpissa_X), on the same batches: per repeat round, the total time of its timed steps over the LoRA
run's of that round (the same steps, so the varying batch sizes cancel), then the median over the rounds.
"SM MHz" is the median SM clock during the timed steps (nvidia-smi), where it was sampled.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from milora.io import read_json


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _spread(runs: list[dict]) -> str:
    values = [run["tokens_per_s"] for run in runs]
    if len(values) < 2:
        return "1 run"
    return f"±{50 * (max(values) - min(values)) / statistics.median(values):.1f}%"


OPTIMIZER_NAMES = {"adamw_torch_fused": "fused AdamW", "adamw_torch": "unfused AdamW"}


def _settings(run: dict) -> str:
    s = run["settings"]
    attention = s["attention"] + (" (sdpa fallback)" if s["attention"] != "sdpa" and not run["varlen_kernel"] else "")
    batches = f"{run['spec']['token_budget']}-token budget" if s["grouping"] == "budget" else "fixed rows"
    if s.get("pad_to_budget"):
        batches += ", padded to it"
    if s["micro_batch"] and s["micro_batch"] < run["spec"]["batch_size"]:
        batches += f" in {s['micro_batch']}-row micro-batches"
    liger = "Liger" if s["liger"] else "no Liger"
    if s["liger"] and s.get("liger_ops") is not None:
        liger += f" ({', '.join(['LM head', *s['liger_ops']])})"
    parts = [f"GC {'on' if s['gradient_checkpointing'] else 'off'}", attention, liger,
             "padding-free" if s["padding_free"] else "padded", batches]
    if s.get("compile"):
        parts.append("compiled")
    if s.get("compile_layers"):
        parts.append("decoder layers compiled" + (f" ({s['compile_mode']})" if s.get("compile_mode") else ""))
    if s.get("optim") in OPTIMIZER_NAMES:
        parts.append(OPTIMIZER_NAMES[s["optim"]])
    if s.get("fp8_base"):
        parts.append("FP8 frozen base")
    if s.get("sync_free"):
        parts.append("no host wait in a step")
    if s["lora_dropout"] == 0:
        parts.append("dropout 0")
    if s.get("peft_input_cast") and s.get("base") != "trl_defaults":
        parts.append("PEFT's float32 input copy")
    return ", ".join(parts)


def lora_twin(name: str) -> str | None:
    """The LoRA variant with the same settings as a MiLoRA/PiSSA variant (QLoRA's for a 4-bit QMiLoRA/QPiSSA)."""
    quantized = name.startswith("q")
    for method in ("milora", "pissa"):
        if name.removeprefix("q" if quantized else "").startswith(method + "_"):
            return ("qlora" if quantized else "lora") + name[len(method) + quantized:].removesuffix("_cached")
    return None


def step_ratio(group: list[dict], twin: list[dict]) -> float:
    """Median over the repeat rounds both have of (total timed-step time) / (the twin's, same round)."""
    by_round = {run["repeat"]: run for run in twin}
    ratios = [sum(run["step_times_s"]) / sum(by_round[run["repeat"]]["step_times_s"])
              for run in group if run["repeat"] in by_round and "step_times_s" in run]
    if not ratios:  # no common round: the medians of the median step times
        return _median(group, "median_step_s") / _median(twin, "median_step_s")
    return statistics.median(ratios)


def _clock(group: list[dict]) -> str:
    clocks = [run["gpu"]["sm_clock_mhz"] for run in group if run.get("gpu", {}).get("sm_clock_mhz")]
    return f"{statistics.median(clocks):.0f}" if clocks else ""


def _same_batches(by_variant: dict[str, list[dict]]) -> list[str]:
    """Warnings for variants of one grouping that did not see the same batches."""
    digests: dict[str, set] = {}
    for runs in by_variant.values():
        for run in runs:
            digests.setdefault(run["settings"]["grouping"], set()).add(run["batches_digest"])
    return [f"WARNING: the {grouping} runs saw different batches" for grouping, d in digests.items() if len(d) > 1]


def markdown_table(files: list[Path], order: list[str] | None = None) -> str:
    loaded = [read_json(f) for f in files]
    failed = [r for r in loaded if "error" in r]
    runs = [r for r in loaded if "error" not in r]
    if not runs:
        return "no finished runs" + "".join(f"\n{r['variant']} r{r['repeat']} failed: {r['error']}" for r in failed)
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    names = sorted(by_variant, key=lambda n: (order or []).index(n) if n in (order or []) else len(order or []))
    first = runs[0]
    spec = first["spec"]
    layers = f" ({spec['layers']} layers)" if spec.get("layers") else ""
    lines = [
        f"device: {first['device']}, torch {first['torch']}, transformers {first['transformers']}, "
        f"peft {first['peft']}, trl {first['trl']}; date {first['date']}",
        f"model: {spec['model']}{layers}, r = {spec['r']}, "
        f"{spec['batch_size']}-row batches or {spec['token_budget']}-token budget batches, "
        f"{spec['warmup']} warm-up + {spec['steps']} timed steps, repeats: "
        f"{max(len(v) for v in by_variant.values())}",
        "",
        "| variant | settings | median step (s) | tokens/step | tokens/s | spread | MFU | peak GiB "
        "| vs TRL defaults | step vs LoRA | SM MHz | loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = by_variant.get("trl_defaults")
    for name in names:
        group = by_variant[name]
        tokens_per_s = _median(group, "tokens_per_s")
        vs_defaults = f"{tokens_per_s / _median(base, 'tokens_per_s'):.2f}x" if base else ""
        twin = by_variant.get(lora_twin(name) or "")
        vs_lora = f"{step_ratio(group, twin):.3f}" if twin else ""
        lines.append(
            f"| {name} | {_settings(group[0])} | {_median(group, 'median_step_s'):.3f} "
            f"| {_median(group, 'median_tokens_per_step'):.0f} | {tokens_per_s:,.0f} | {_spread(group)} "
            f"| {100 * _median(group, 'mfu'):.1f}% | {max(r['peak_mem_gib'] for r in group):.1f} "
            f"| {vs_defaults} | {vs_lora} | {_clock(group)} | {_median(group, 'training_loss'):.3f} |"
        )
    lines += _same_batches(by_variant)
    lines += [f"{r['variant']} repeat {r['repeat']} FAILED: {r['error']}" for r in failed]
    return "\n".join(lines)
