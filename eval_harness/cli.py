"""`milora eval`: score a checkpoint on a named suite and write ``results.json``, ``results.md`` and samples.

Suites (runners in `eval_harness.suites`):

- ``commonsense``: the 8 LLM-Adapters sets (4-beam generation, first option word) and their mean accuracy;
- ``math``: GSM8K and MATH (MetaMath prompt and answer checks); ``gsm8k`` and ``competition_math`` alone;
- ``ifeval``: lm-eval's IFEval task, strict/loose, prompt/instruction level;
- ``lm_eval``: any lm-eval tasks by name (``--tasks boolq,piqa,arc_easy``), built-in or the project's;
- ``alpaca_eval``: AlpacaEval 2 win rates with a judge on any OpenAI-compatible server;
- ``followbench``: hard/soft satisfaction rate per level, judged by an OpenAI-compatible server;
- ``vqa``: one LLaVA benchmark (VQAv2, VizWiz, TextVQA, GQA, ScienceQA, POPE, MMBench) from a local file.

Data comes from a suite's file flag, else the data folder (``--data_dir`` or ``$MILORA_EVAL_DATA``, layout in
`eval_harness.data_paths`), else the hub. Exit status: 0 all requested evaluations ran, 3 some were skipped
(see the report), 1 none ran, 2 bad input or a suite that failed (one line on stderr; ``--debug`` shows the
traceback). Errors are reported as for every ``milora`` command, by `milora.reporting.run_reporting_errors`,
whether this runs as ``milora eval`` or as ``python -m eval_harness.cli``; `milora.cli` imports this module to
dispatch ``milora eval`` to it, never the other way round.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval_harness.data_paths import DATA_DIR_ENV
from eval_harness.errors import UsageError
from eval_harness.suites import SuiteResult, alpaca_eval_suite, followbench_suite, lm_eval_suite, open_ended, vqa_suite
from milora.commands.arguments import check_model_argument
from milora.gguf import GGUFError
from milora.model_source import model_source
from milora.reporting import USER_ERRORS, CommandFailed, run_command

PROG = "milora eval"
# suite -> what evaluates it; each runner module adds its own argument group (`add_arguments`)
SUITE_RUNNERS: dict[str, Callable[[argparse.Namespace, Path], SuiteResult | None]] = {
    **{suite.name: suite.run for suite in lm_eval_suite.SUITES},
    "alpaca_eval": alpaca_eval_suite.run,
    "followbench": followbench_suite.run,
    "vqa": vqa_suite.run,
}
ARGUMENT_GROUPS = (lm_eval_suite, open_ended, alpaca_eval_suite, followbench_suite, vqa_suite)
SUITES = tuple(SUITE_RUNNERS)
EXIT_OK, EXIT_NONE_RAN, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
SECRET_SETTINGS = ("judge_api_key",)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``milora eval: error: ...`` line (exit status 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}; see `{PROG} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG, description="Score a checkpoint on an evaluation suite; writes results.json and results.md."
    )
    parser.add_argument("--suite", required=True, choices=SUITES, help="what to evaluate")
    parser.add_argument("--model", required=True, help="merged checkpoint directory, .gguf file or hub id")
    parser.add_argument("--output_dir", help="where results go (default outputs/eval/<model name>/<suite>)")
    parser.add_argument(
        "--data_dir",
        help=f"folder of evaluation data (layout: eval_harness/README.md); default ${DATA_DIR_ENV}, else hub",
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max_gen_toks", type=int, help="override the number of new tokens of every generation")
    parser.add_argument("--num_beams", type=int, help="beam search width (commonsense defaults to 4, others to 1)")
    for runner in ARGUMENT_GROUPS:
        runner.add_arguments(parser)
    return parser


def default_output_dir(model: str, suite: str) -> Path:
    return Path("outputs") / "eval" / Path(model.rstrip("/")).name / suite


def build_report(args: argparse.Namespace, result: SuiteResult) -> dict[str, Any]:
    return {
        "suite": args.suite,
        "model": args.model,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": result.metrics,
        "skipped": result.skipped,
        "data_sources": result.data_sources,
        "settings": {k: v for k, v in vars(args).items() if k not in (*SECRET_SETTINGS, "model_source")},
    }


def exit_status(result: SuiteResult) -> int:
    if not result.metrics:
        return EXIT_NONE_RAN
    return EXIT_PARTIAL if result.skipped else EXIT_OK


def evaluate(args: argparse.Namespace) -> int:
    """Run the suite, write the report and samples, print the table; the exit status."""
    import logging

    from eval_harness.results import markdown_table, write_report, write_samples
    from milora.loading import default_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # the check of every command's model argument: a missing path, a file, a .gguf that is not GGUF
        check_model_argument("--model", args.model)
    except (OSError, GGUFError) as error:
        raise UsageError(str(error)) from error
    args.model_source = model_source(args.model)  # what --model names, decided once for the loaders
    args.device = args.device or default_device()
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, args.suite)
    output_dir.mkdir(parents=True, exist_ok=True)

    result = SUITE_RUNNERS[args.suite](args, output_dir)
    if result is None:  # a process of a data-parallel run other than rank 0, which writes the report
        return EXIT_OK
    json_path, md_path = write_report(output_dir, build_report(args, result))
    write_samples(output_dir, result.records)

    print(f"\n{args.suite} evaluation of {args.model}\n")
    print(markdown_table(result.metrics))
    for task, reason in result.skipped.items():
        print(f"skipped {task}: {reason}", file=sys.stderr)
    print(f"wrote {json_path} and {md_path}")
    card = append_to_model_card(args.model, args.suite, markdown_table(result.metrics)) if result.metrics else None
    if card is not None:
        print(f"added the table to the model card {card}")
    return exit_status(result)


def append_to_model_card(model: str, suite: str, table: str):
    """The table goes into the card of the milora training run `model` belongs to (RUN or RUN/merged); any other
    model folder is left untouched. Returns the card's path or None."""
    from milora.model_card import append_evaluation

    return append_evaluation(model, suite, table)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    """``milora eval`` on `argv`: the exit status. Bad input raises (ValueError, OSError; `UsageError` is a
    ValueError) and any other failure of a suite raises `CommandFailed` naming it, for
    `milora.reporting.run_reporting_errors` to report as one line, or with ``--debug`` to re-raise as it was raised."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        status = evaluate(args)
    except USER_ERRORS:
        raise
    except Exception as error:
        raise CommandFailed(f"{one_line(error)}; run again with --debug for the traceback") from error
    from milora.processes import end_processes  # under `accelerate launch`: see there

    end_processes()
    return status


if __name__ == "__main__":
    from milora.processes import exit_process  # under `accelerate launch`: see there

    exit_process(run_command(PROG, main))
