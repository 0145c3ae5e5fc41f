"""``--suite alpaca_eval``: AlpacaEval 2 win rates of the checkpoint's answers, judged on any OpenAI-compatible
server. The instructions and reference outputs come from --alpaca_eval_file or the data folder, else from
alpaca_eval's own (hub) copy."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval_harness.data_paths import HUB, data_root, resolve_data_path
from eval_harness.suites import SuiteResult
from eval_harness.suites.open_ended import generate_for_instructions, judge_endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("alpaca_eval")
    group.add_argument("--alpaca_eval_file", help="instructions with reference outputs (json list / jsonl), or 'hub'")


def reference_rows(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The AlpacaEval set with its reference outputs, and where it came from."""
    from eval_harness import alpaca_eval_runner

    path = resolve_data_path("alpaca_eval", args.alpaca_eval_file, "--alpaca_eval_file", data_root(args.data_dir))
    if path is not None:
        return alpaca_eval_runner.load_eval_set(path), str(path)
    alpaca_eval_runner.import_alpaca_eval()
    from alpaca_eval import constants

    return [dict(r) for r in constants.ALPACAEVAL_REFERENCE_OUTPUTS()], HUB


def run(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness import alpaca_eval_runner
    from milora.io import write_json

    reference, source = reference_rows(args)
    reference = reference[: args.limit] if args.limit else reference
    instructions = [r["instruction"] for r in reference]
    outputs = generate_for_instructions(args, instructions, "alpaca_eval generation", output_dir, "alpaca_eval")
    generator = args.generator_name or Path(args.model.rstrip("/")).name
    model_outputs = alpaca_eval_runner.model_output_records(
        instructions, outputs, generator, [r.get("dataset", "alpaca_eval") for r in reference]
    )
    write_json(output_dir / "model_outputs.json", model_outputs)
    judge = judge_endpoint(args)
    annotator = alpaca_eval_runner.write_annotator_config(output_dir / "annotator", judge, args.judge_annotator)
    row = alpaca_eval_runner.run_alpaca_eval(model_outputs, reference, annotator, output_dir / "alpaca_eval", judge)
    return SuiteResult(metrics={"alpaca_eval": row}, data_sources={"alpaca_eval": source})
