"""``--suite followbench``: hard/soft satisfaction rates per constraint level, judged on any OpenAI-compatible
server (rule-checkable rows by FollowBench's rules: `eval_harness.followbench`). Rows come from
--followbench_file (a file, or a folder of FollowBench's ``*_constraints.json``) or the data folder's
``followbench/``; the judge prompt of a level-n row lists the instructions of levels 0..n of its seed.

Everything scoring needs (the rows' fields, what each rule reads, a judge prompt and a complete instruction
chain for each judged row, a judge to ask) is checked before the checkpoint generates anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval_harness.data_paths import DATA_DIR_ENV, data_root, resolve_data_path
from eval_harness.errors import UsageError
from eval_harness.suites import SuiteResult
from eval_harness.suites.open_ended import generate_for_instructions, judge_endpoint
from milora.io import read_json_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("followbench")
    group.add_argument(
        "--followbench_file",
        help="FollowBench rows (category/example_id/level/instruction): a json/jsonl file or folder",
    )


def read_followbench_rows(path: Path) -> list[dict]:
    """The rows of one file, or of every ``*.json`` / ``*.jsonl`` file in a folder (in name order), each with
    the fields of a FollowBench row."""
    from eval_harness.followbench import check_row_fields

    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    rows = []
    for file in files:
        file_rows = read_json_rows(file)
        check_row_fields(file_rows, str(file))
        rows += file_rows
    if not rows:
        raise UsageError(f"no FollowBench rows in {path}", "give FollowBench's data/*_constraints.json files")
    return rows


def run(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness import followbench
    from eval_harness.judge import ask_judge

    path = resolve_data_path("followbench", args.followbench_file, "--followbench_file", data_root(args.data_dir))
    if path is None:
        raise UsageError(
            "--suite followbench needs FollowBench's data",
            f"pass --followbench_file FILE_OR_FOLDER, or --data_dir (or {DATA_DIR_ENV}) holding followbench/",
        )
    rows = read_followbench_rows(path)
    constrained = followbench.constrained_rows(rows)
    constrained = constrained[: args.limit] if args.limit else constrained
    followbench.check_scorable(rows, constrained)
    endpoint = judge_endpoint(args)
    judged = len(followbench.judged_rows(constrained))
    if judged and not endpoint.is_configured():
        raise UsageError(
            f"{judged} of the {len(constrained)} FollowBench rows are scored by an LLM judge, and no judge is set",
            "pass --judge_base_url (an OpenAI-compatible server, e.g. vLLM) and --judge_model, "
            "or set OPENAI_API_KEY for OpenAI's API",
        )
    responses = generate_for_instructions(args, [r["instruction"] for r in constrained], "followbench generation",
                                          output_dir, "followbench")
    scores = followbench.score_responses(
        rows, constrained, responses, lambda prompts: ask_judge(endpoint, prompts, desc="followbench judging")
    )
    return SuiteResult(
        metrics={"followbench": scores.metrics},
        data_sources={"followbench": str(path)},
        records={"followbench": scores.records},
    )
