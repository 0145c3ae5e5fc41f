"""What the step-0 check costs next to training: runs a recipe for a few steps and prints the check's seconds,
the seconds per optimizer step, and the check as a share of the full run the recipe describes.

    python benchmarks/step0_cost.py recipes/tiny_milora.yaml --max_steps 20 --out outputs/bench/step0
    accelerate launch benchmarks/step0_cost.py recipes/llama2-7b_math_milora.yaml --max_steps 20 \\
        --out outputs/bench/step0_7b

Everything after the recipe is passed to `recipes/sft.py` (`--out` is this script's); the full run's step count
is the recipe's `max_steps`, else epochs x rows / examples per optimizer step. Writes `step0_cost.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def full_run_steps(recipe, trainer) -> int:
    """Optimizer steps of the run the recipe describes (not the shortened benchmark run): its `max_steps`, else
    epochs x rows / examples per optimizer step."""
    import yaml

    settings = yaml.safe_load(Path(recipe).read_text())
    if settings.get("max_steps", -1) > 0:
        return int(settings["max_steps"])
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return math.ceil(args.num_train_epochs * len(trainer.train_dataset) / per_step)


def cost_row(step0_seconds: float, train_seconds: float, steps: int, full_steps: int) -> dict:
    per_step = train_seconds / max(steps, 1)
    return {
        "step0_seconds": step0_seconds, "seconds_per_step": per_step, "step0_in_steps": step0_seconds / per_step,
        "full_run_steps": full_steps, "share_of_full_run": step0_seconds / (per_step * full_steps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True, help="output folder (the run's output_dir is OUT/run)")
    args, rest = parser.parse_known_args(argv)
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipes_sft", REPO_ROOT / "recipes" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    sys.modules["recipes_sft"] = sft
    spec.loader.exec_module(sft)
    out = Path(args.out)
    trainer = sft.train([args.recipe, "--output_dir", str(out / "run"), "--save_strategy", "no", "--merge", "false",
                         "--report_to", "none", *rest])
    info = json.loads((out / "run" / "milora_run.json").read_text())
    if info["step0_check"].get("skipped"):
        print(f"step-0 check skipped: {info['step0_check']['skipped']}")
        return 1
    runtime = next(e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e)
    row = cost_row(info["step0_check"]["seconds"], runtime, trainer.state.global_step,
                   full_run_steps(args.recipe, trainer))
    if trainer.accelerator.is_main_process:
        print("| recipe | step-0 check (s) | s / step | check in steps | full run steps | share of full run |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| {Path(args.recipe).name} | {row['step0_seconds']:.2f} | {row['seconds_per_step']:.3f} | "
              f"{row['step0_in_steps']:.1f} | {row['full_run_steps']} | {100 * row['share_of_full_run']:.3f}% |")
        (out / "step0_cost.json").write_text(json.dumps({"recipe": args.recipe, **row}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
