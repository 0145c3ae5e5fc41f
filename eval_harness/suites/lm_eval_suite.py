"""The suites lm-eval runs: commonsense, math, gsm8k, competition_math, ifeval, and ``lm_eval --tasks ...``.

Each task reads its data file when one is found (`eval_harness.data_paths`), else its hub copy: a local file
becomes a task variant (`eval_harness.local_tasks`) that keeps the task's prompts and metrics. One lm-eval
model (`lm_eval_runner.build_lm`, ``--engine``) serves every task; a task whose data cannot be loaded is
reported as skipped. Under ``accelerate launch`` each process evaluates its share of every task and rank 0
reports (lm-eval gathers the results). Finished generations stream to ``samples/<task>.generations.jsonl``
and a rerun into the same output folder reuses them (`eval_harness.generation_store`).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness.data_paths import HUB, commonsense_test_files, data_root, resolve_data_path
from eval_harness.errors import UsageError
from eval_harness.suites import SuiteResult
from milora.io import read_json

# fmt: off
COMMONSENSE_TASKS = [
    "milora_boolq", "milora_piqa", "milora_social_i_qa", "milora_hellaswag",
    "milora_winogrande", "milora_arc_easy", "milora_arc_challenge", "milora_openbookqa",
]
# fmt: on
COMMONSENSE_GROUP = "milora_commonsense"


@dataclass(frozen=True)
class LmEvalSuite:
    """One `--suite` lm-eval runs: the tasks it stands for and how they run."""

    name: str
    tasks: tuple[str, ...] = ()  # none: the tasks --tasks names (the lm_eval suite)
    group: str | None = None  # run as this lm-eval group (its mean accuracy); task by task if one cannot load
    lm_eval_tasks: bool = False  # index lm-eval's own tasks too, so that --tasks may name them

    def run(self, args: argparse.Namespace, output_dir: Path) -> SuiteResult | None:
        return run(self, args, output_dir)


SUITES = (
    LmEvalSuite("commonsense", tuple(COMMONSENSE_TASKS), group=COMMONSENSE_GROUP),
    LmEvalSuite("math", ("milora_gsm8k", "milora_math")),
    LmEvalSuite("gsm8k", ("milora_gsm8k",)),
    LmEvalSuite("competition_math", ("milora_math",)),
    LmEvalSuite("ifeval", ("ifeval",)),  # lm-eval's own task
    LmEvalSuite("lm_eval", lm_eval_tasks=True),
)
# task -> (entry of the data folder layout, its explicit file flag)
TASK_DATA = {
    "milora_gsm8k": ("gsm8k", "gsm8k_file"),
    "milora_math": ("math", "math_file"),
    "ifeval": ("ifeval", "ifeval_file"),
}
ENGINES = ("milora", "hf", "vllm")
SHORT_CONTEXT = 1024  # tokens; the tasks generate up to 2048, which does not fit such a model with its prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lm-eval suites (commonsense, math, gsm8k, competition_math, ifeval, lm_eval)")
    group.add_argument("--gsm8k_file", help="GSM8K test jsonl (question/answer), or 'hub'")
    group.add_argument("--math_file", help="MATH test jsonl (problem/solution), or 'hub'")
    group.add_argument("--commonsense_dir", help="LLM-Adapters dataset/ folder (<set>/test.json), or 'hub'")
    group.add_argument("--ifeval_file", help="IFEval input jsonl (key/prompt/instruction_id_list/kwargs), or 'hub'")
    group.add_argument("--tasks", help="lm_eval suite: comma-separated lm-eval task names")
    group.add_argument("--include_path", action="append", default=[], help="lm_eval suite: extra task folder")
    group.add_argument("--max_length", type=int, help="model context length for lm-eval (default: from the config)")
    group.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the chat template")
    group.add_argument(
        "--engine",
        choices=ENGINES,
        default="milora",
        help="generation: milora (greedy and beam-search requests on milora's engine, concurrency from free "
        "memory; sampling and loglikelihood stay HF's, as does --batch_size), hf (lm-eval's HF model throughout; "
        "model.generate in batches of --batch_size for alpaca_eval and followbench), vllm (lm-eval's vLLM model; "
        "lm-eval suites only)",
    )


def suite_tasks(suite: LmEvalSuite, args: argparse.Namespace) -> list[str]:
    if suite.tasks:
        return list(suite.tasks)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--suite {suite.name} needs the tasks to run",
                         "pass --tasks, e.g. --tasks boolq,piqa,arc_easy")
    return tasks


def local_data_files(args: argparse.Namespace, tasks: Sequence[str], root: Path | None) -> dict[str, Path]:
    """task -> the local data file it reads (tasks missing here read the hub)."""
    files: dict[str, Path] = {}
    for task in tasks:
        if task in TASK_DATA:
            name, flag = TASK_DATA[task]
            path = resolve_data_path(name, getattr(args, flag), f"--{flag}", root)
            if path is not None:
                files[task] = path
    if any(task in COMMONSENSE_TASKS for task in tasks):
        directory = resolve_data_path("commonsense", args.commonsense_dir, "--commonsense_dir", root)
        if directory is not None:
            found = {f"milora_{name}": path for name, path in commonsense_test_files(directory).items()}
            files.update({task: path for task, path in found.items() if task in tasks})
    return files


def model_context_length(model: str) -> int | None:
    """`max_position_embeddings` of a local checkpoint or `.gguf` file (text config for LLaVA), None when unknown."""
    from milora.gguf import is_gguf_path, load_gguf_config

    if is_gguf_path(model):
        return getattr(load_gguf_config(model), "max_position_embeddings", None)
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file)
    return (config.get("text_config") or config).get("max_position_embeddings")


def generation_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """Generation settings that replace the tasks' own in every task: --max_gen_toks, --num_beams."""
    overrides: dict[str, Any] = {}
    if args.max_gen_toks:
        overrides["max_gen_toks"] = args.max_gen_toks
    if args.num_beams:
        overrides["num_beams"] = args.num_beams
    return overrides or None


def short_context_cap(args: argparse.Namespace) -> int | None:
    """For a model of at most `SHORT_CONTEXT` tokens (and no --max_gen_toks): a quarter of its context, the
    most any task may generate (`lm_eval_runner.build_lm` lowers larger task limits to it, keeps smaller ones)."""
    if args.max_gen_toks:
        return None
    context = model_context_length(args.model)
    if context is None or context > SHORT_CONTEXT:
        return None
    cap = context // 4
    print(
        f"milora eval: context of {context} tokens; each task generates at most {cap} new tokens "
        "(fewer where the task asks for fewer; --max_gen_toks sets the number for every task)"
    )
    return cap


def task_include_paths(files: dict[str, Path], tasks: Sequence[str], variant_dir: Path) -> list[Path]:
    """Folders lm-eval must index: local-file variants, and lm-eval's own task folders the suite uses."""
    from eval_harness.local_tasks import LM_EVAL_TASK_FILES, lm_eval_task_yaml, task_yaml, write_local_task_yaml

    # lm-eval indexes the whole folder: variants left by an earlier run must not shadow this run's choices
    shutil.rmtree(variant_dir, ignore_errors=True)
    for task, path in files.items():
        write_local_task_yaml(task_yaml(task), path, variant_dir, task_name=task)
    paths = [variant_dir] if files else []
    return paths + [lm_eval_task_yaml(t).parent for t in tasks if t in LM_EVAL_TASK_FILES and t not in files]


def process_rank() -> int:
    """This process's rank under ``accelerate launch`` (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def run(suite: LmEvalSuite, args: argparse.Namespace, output_dir: Path) -> SuiteResult | None:
    """The suite's result; None in the processes of a data-parallel run other than rank 0 (which reports)."""
    from eval_harness import lm_eval_runner

    tasks = suite_tasks(suite, args)
    files = local_data_files(args, tasks, data_root(args.data_dir))
    rank = process_rank()  # each process writes its own task variants: one must not delete another's
    variant_dir = output_dir / ("local_tasks" if rank == 0 else f"local_tasks.rank{rank}")
    include = task_include_paths(files, tasks, variant_dir) + list(args.include_path)
    manager = lm_eval_runner.task_manager(include, include_defaults=suite.lm_eval_tasks)
    lm = lm_eval_runner.build_lm(
        args.model,
        device=args.device,
        batch_size=args.batch_size,
        dtype=args.dtype,
        max_length=args.max_length,
        max_gen_toks_cap=short_context_cap(args),
        engine=args.engine,
        generations_dir=output_dir / "samples",  # <task>.generations.jsonl, reused by a rerun
    )

    gen_kwargs = generation_overrides(args)

    def evaluate(names: Sequence[str]):
        return lm_eval_runner.run_tasks(
            lm,
            names,
            manager,
            limit=args.limit,
            gen_kwargs=gen_kwargs,
            apply_chat_template=args.apply_chat_template,
        )

    if suite.group:
        # The group in one pass (lm-eval averages the accuracies); set by set if some set cannot be loaded.
        outcome = evaluate([suite.group])
        outcome = outcome if not outcome.skipped else evaluate(tasks)
    else:
        outcome = evaluate(tasks)
    if getattr(lm, "rank", 0) != 0:
        return None
    result = SuiteResult(
        metrics=outcome.metrics,
        skipped=outcome.skipped,
        data_sources={task: str(files[task]) if task in files else HUB for task in tasks},
        records=outcome.samples,
    )
    if suite.group and suite.group not in result.metrics:
        accuracies = [result.metrics[t]["acc"] for t in tasks if "acc" in result.metrics.get(t, {})]
        if accuracies:
            result.metrics[suite.group] = {"acc": sum(accuracies) / len(accuracies), "n_tasks": len(accuracies)}
    return result
