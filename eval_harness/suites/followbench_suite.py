"""``--suite followbench``: hard/soft satisfaction rates per constraint level, judged on any OpenAI-compatible
server (rule-checkable rows by FollowBench's rules: `eval_harness.followbench`). Rows come from
--followbench_file (a file, or a folder of FollowBench's ``*_constraints.json``) or the data folder's
``followbench/``; the judge prompt of a level-n row lists the instructions of levels 0..n of its seed."""

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
    """The rows of one file, or of every ``*.json`` / ``*.jsonl`` file in a folder (in name order)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    rows = [row for file in files for row in read_json_rows(file)]
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
    responses = generate_for_instructions(args, [r["instruction"] for r in constrained], desc="followbench generation")
    endpoint = judge_endpoint(args)
    scores = followbench.score_responses(
        rows, constrained, responses, lambda prompts: ask_judge(endpoint, prompts, desc="followbench judging")
    )
    return SuiteResult(
        metrics={"followbench": scores.metrics},
        data_sources={"followbench": str(path)},
        records={"followbench": scores.records},
    )
