"""MiLoRA/PiSSA vs LoRA step time, interleaved in one process: the comparison without run-to-run noise.

benchmarks/train_throughput.py runs each variant in its own process; on a power-capped GPU the clock of one
process differs from the next by a few percent, as much as the 2% a MiLoRA/LoRA comparison must resolve.
Here one process holds one model per method (the same random LLaMA-2-7B-shaped base, the recipes' adapter
settings, the fast settings: varlen attention over padding-free rows, Liger's kernels, no gradient
checkpointing) and trains them step by step in turn, each on the same token-budget batch
(benchmarks/throughput_batches.py), the order rotating every step. Every method thus sees the same batches at
the same GPU state; the reported ratio is the median over the timed steps of (method's step) / (LoRA's step).

    python benchmarks/step_ratio.py --out OUT                   # LLaMA-2-7B shapes, one GPU (~45 GB)
    python benchmarks/step_ratio.py --smoke --out OUT           # the tiny model on CPU: checks the plumbing
    python benchmarks/step_ratio.py --load_in_4bit --out OUT    # QMiLoRA / QPiSSA vs QLoRA on nf4 bases

A step is forward, backward and AdamW, device-synchronised; the loop is written out here (no Trainer), so
the absolute times are close to, not equal to, train_throughput's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from milora.io import write_json  # noqa: E402


def padding_free_batch(rows: list[dict], device) -> dict:
    """The rows as one packed sequence: position ids restart at each row (the varlen boundaries)."""
    ids, labels, positions = [], [], []
    for row in rows:
        ids += row["input_ids"]
        labels += [-100] + row["labels"][1:]  # the first token of a row is not predicted from the previous row
        positions += list(range(len(row["input_ids"])))
    as_tensor = lambda values: torch.tensor([values], device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "labels": as_tensor(labels), "position_ids": as_tensor(positions)}


def build_trainee(method: str, spec: dict, device, load_in_4bit: bool = False):
    """(model, optimizer) of one method, with the settings of recipes/llama2-7b_math_<method>.yaml."""
    from throughput_variants import FAST, Variant, resolved_settings
    from train_throughput import adapted_model

    variant = Variant(method, "recipe", "", **FAST, load_in_4bit=load_in_4bit)
    settings = resolved_settings(variant, spec["batch_size"], spec["r"])
    model, _ = adapted_model(variant, spec, settings, cache_dir=None)
    if settings["liger"]:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings["learning_rate"], fused=device.type == "cuda")
    return model, optimizer, settings


def train_step(model, optimizer, batch, device) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def interleaved(methods: list[str], spec: dict, data: dict, device, load_in_4bit: bool = False) -> dict:
    """Per method: the step times and losses of every step, trained in turn on the same batches."""
    trainees = {m: build_trainee(m, spec, device, load_in_4bit) for m in methods}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    times = {m: [] for m in methods}
    losses = {m: [] for m in methods}
    collections = {m: [] for m in methods}  # Python's full (generation 2) garbage collections during each step
    full_collections = [0]

    def count_full_collections(phase, info):
        if phase == "start" and info["generation"] == 2:
            full_collections[0] += 1

    gc.callbacks.append(count_full_collections)
    groups = data["groupings"]["budget"]
    for step, group in enumerate(groups):
        batch = padding_free_batch([data["rows"][i] for i in group], device)
        order = methods[step % len(methods):] + methods[:step % len(methods)]
        for method in order:
            model, optimizer, _ = trainees[method]
            if device.type == "cuda":
                torch.cuda.synchronize()
            began, collected = time.perf_counter(), full_collections[0]
            loss = train_step(model, optimizer, batch, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - began)
            losses[method].append(float(loss))
            collections[method].append(full_collections[0] - collected)
    gc.callbacks.remove(count_full_collections)
    settings = trainees[methods[0]][2]
    return {"step_times_s": times, "losses": losses, "full_gc_collections": collections, "settings": settings}


def summary(result: dict, warmup: int, reference: str = "lora") -> list[dict]:
    """Per method: median step, per-step ratios to the reference, and the slow steps (> 1.2 x its median)."""
    rows = []
    ref = result["step_times_s"][reference][warmup:]
    for method, all_times in result["step_times_s"].items():
        times = all_times[warmup:]
        ratios = sorted(t / r for t, r in zip(times, ref, strict=True))
        quartile = max(1, len(ratios) // 4)
        median = statistics.median(times)
        slow = [i for i, t in enumerate(times) if t > 1.2 * median]
        gcs = result["full_gc_collections"][method][warmup:]
        rows.append({"method": method, "median_step_s": median, "total_s": sum(times),
                     "slow_steps": len(slow), "slow_steps_with_full_gc": sum(gcs[i] > 0 for i in slow),
                     "ratio_median": statistics.median(ratios), "ratio_total": sum(times) / sum(ref),
                     "ratio_iqr": (ratios[quartile - 1], ratios[-quartile])})
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| method | median step (s) | step vs LoRA (median of per-step ratios) | interquartile range "
             "| total time vs LoRA | slow steps (> 1.2x median) |", "| --- | ---: | ---: | --- | ---: | ---: |"]
    for row in rows:
        low, high = row["ratio_iqr"]
        lines.append(f"| {row['method']} | {row['median_step_s']:.3f} | {row['ratio_median']:.3f} "
                     f"| {low:.3f} - {high:.3f} | {row['ratio_total']:.3f} "
                     f"| {row['slow_steps']} ({row['slow_steps_with_full_gc']} with a full GC) |")
    return "\n".join(lines)


def main(argv=None):
    from throughput_batches import build_batches
    from throughput_variants import benchmark_spec, model_config
    from train_throughput import environment

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/step_ratio", help="step_ratio.json and step_ratio.md go here")
    parser.add_argument("--methods", default="lora,milora,pissa", help="comma-separated; lora is the reference")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, 3 steps: checks the plumbing")
    parser.add_argument("--load_in_4bit", action="store_true", help="every method on an nf4 base (QLoRA, QMiLoRA, ...)")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if "lora" not in methods:
        parser.error("--methods must include lora (the reference)")
    spec = benchmark_spec(args.smoke, r=args.r, warmup=args.warmup, steps=args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_batches(spec, model_config(spec).vocab_size)
    result = interleaved(methods, spec, data, device, args.load_in_4bit)
    rows = summary(result, spec["warmup"])
    env = environment()
    header = (f"device: {env['device']}, torch {env['torch']}, peft {env['peft']}; date {env['date']}; "
              f"{spec['model']}, r = {spec['r']}, {spec['warmup']} warm-up + {spec['steps']} timed steps per method, "
              f"interleaved{', nf4 bases' if args.load_in_4bit else ''}")
    table = markdown(rows, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "step_ratio.json", {**env, "spec": spec, "summary": rows, **result})
    (out / "step_ratio.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
