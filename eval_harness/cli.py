"""`milora eval`: score a merged checkpoint on a named suite and write ``results.json`` + ``results.md``.

Suites:

- ``commonsense``: the 8 LLM-Adapters sets (generation + first option word) and their mean accuracy
  (``milora_commonsense``);
- ``math``: GSM8K and MATH (MetaMath prompt and answer checks); ``gsm8k`` and ``competition_math`` alone;
- ``ifeval``: IFEval strict/loose, prompt/instruction level;
- ``lm_eval``: any lm-eval tasks by name (``--tasks boolq,piqa,arc_easy``), built-in or the project's;
- ``alpaca_eval``: AlpacaEval 2 win rates with a judge on any OpenAI-compatible server;
- ``followbench``: hard/soft satisfaction rate per level, judged by an OpenAI-compatible server;
- ``vqa``: one LLaVA benchmark (VQAv2, VizWiz, TextVQA, GQA, ScienceQA, POPE, MMBench) from a local file.

lm-eval tasks read the hub unless a local file is given; GSM8K (and MATH) default to the files in
``--data_dir`` (``../shared/data`` next to the repository) when they exist. Every output file is written
atomically. Exit status: 0 all requested evaluations ran, 3 some were skipped (see the report), 1 none ran.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval_harness.local_tasks import REPO_ROOT

# fmt: off
COMMONSENSE_TASKS = [
    "milora_boolq", "milora_piqa", "milora_social_i_qa", "milora_hellaswag",
    "milora_winogrande", "milora_arc_easy", "milora_arc_challenge", "milora_openbookqa",
]
# fmt: on
COMMONSENSE_GROUP = "milora_commonsense"
LM_EVAL_SUITES = {
    "commonsense": COMMONSENSE_TASKS,
    "math": ["milora_gsm8k", "milora_math"],
    "gsm8k": ["milora_gsm8k"],
    "competition_math": ["milora_math"],
    "ifeval": ["milora_ifeval"],
}
OTHER_SUITES = ("lm_eval", "alpaca_eval", "followbench", "vqa")
SUITES = tuple(LM_EVAL_SUITES) + OTHER_SUITES

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# File names looked for in --data_dir when no explicit file is given.
DEFAULT_DATA_FILES = {"milora_gsm8k": "gsm8k_test.jsonl", "milora_math": "math_test.jsonl"}
HUB = "hub"
EXIT_OK, EXIT_NONE_RAN, EXIT_PARTIAL = 0, 1, 3

LOGGER = logging.getLogger("milora.eval")


@dataclass
class SuiteResult:
    """Metrics per task, what was skipped and why, where each task's data came from, per-item records."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    data_sources: dict[str, str] = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milora eval",
        description="Score a merged checkpoint on an evaluation suite; writes results.json and results.md.",
    )
    parser.add_argument("--suite", required=True, choices=SUITES, help="what to evaluate")
    parser.add_argument("--model", required=True, help="merged checkpoint directory (or hub id)")
    parser.add_argument("--output_dir", help="where results go (default outputs/eval/<model name>/<suite>)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max_length", type=int, help="model context length for lm-eval (default: from the config)")
    parser.add_argument("--max_gen_toks", type=int, help="override the number of new tokens of every generation")
    parser.add_argument("--num_beams", type=int, help="beam search width (LLM-Adapters' commonsense protocol uses 4)")
    parser.add_argument(
        "--apply_chat_template", action="store_true", help="lm-eval suites: wrap prompts in the chat template"
    )

    data = parser.add_argument_group("data (a file path, or 'hub' for the Hugging Face copy)")
    data.add_argument(
        "--data_dir", default=str(DEFAULT_DATA_DIR), help="default files: gsm8k_test.jsonl, math_test.jsonl"
    )
    data.add_argument("--gsm8k_file", help="GSM8K test jsonl (question/answer)")
    data.add_argument("--math_file", help="MATH test jsonl (problem/solution)")
    data.add_argument("--commonsense_dir", help="LLM-Adapters dataset/ folder: <name>/test.json per set")
    data.add_argument("--ifeval_file", help="IFEval input jsonl (key/prompt/instruction_id_list/kwargs)")
    data.add_argument("--tasks", help="lm_eval suite: comma-separated lm-eval task names")
    data.add_argument("--include_path", action="append", default=[], help="lm_eval suite: extra task folder")
    data.add_argument("--alpaca_eval_file", help="AlpacaEval set with reference outputs (json list / jsonl)")
    data.add_argument("--followbench_file", help="FollowBench rows (category/example_id/level/instruction)")
    data.add_argument("--vqa_benchmark", choices=["vqav2", "vizwiz", "textvqa", "gqa", "scienceqa", "pope", "mmbench"])
    data.add_argument("--vqa_file", help="benchmark questions (jsonl, see eval_harness/vqa.py)")
    data.add_argument("--image_dir", help="folder the image paths of --vqa_file are relative to")

    generation = parser.add_argument_group("open-ended generation (alpaca_eval, followbench, vqa)")
    generation.add_argument("--prompt_format", default="alpaca", choices=["alpaca", "chat", "raw"])
    generation.add_argument("--llava_prompt_style", default="llava_v1", choices=["llava_v1", "chat"])
    generation.add_argument("--generator_name", help="name of the model in the AlpacaEval outputs")

    judge = parser.add_argument_group("judge: any OpenAI-compatible chat-completions server")
    judge.add_argument("--judge_base_url", help="e.g. http://127.0.0.1:8000/v1 (default: OPENAI_BASE_URL or OpenAI)")
    judge.add_argument("--judge_api_key", help="default: OPENAI_API_KEY, else 'EMPTY'")
    judge.add_argument("--judge_model", default="gpt-4-1106-preview")
    judge.add_argument(
        "--judge_annotator",
        default="weighted_alpaca_eval_gpt4_turbo",
        help="alpaca_eval annotator config to derive from",
    )
    return parser


# --------------------------------------------------------------------------- data sources


def resolve_data_file(explicit: str | None, task: str, data_dir: str | None) -> Path | None:
    """The local file a task reads, or None for the hub: an explicit path wins, 'hub' forces the hub, else the
    conventional file in data_dir when it exists."""
    if explicit == HUB:
        return None
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{task}: data file not found: {explicit}")
        return path.resolve()
    default_name = DEFAULT_DATA_FILES.get(task)
    if default_name and data_dir:
        candidate = Path(data_dir) / default_name
        if candidate.is_file():
            return candidate.resolve()
    return None


def commonsense_files(commonsense_dir: str | None) -> dict[str, Path]:
    """milora task -> LLM-Adapters test.json found under commonsense_dir."""
    from eval_harness.commonsense import LLM_ADAPTERS_DIR_NAMES

    if not commonsense_dir:
        return {}
    found = {}
    for name, directory in LLM_ADAPTERS_DIR_NAMES.items():
        for candidate in (Path(commonsense_dir) / directory / "test.json", Path(commonsense_dir) / f"{directory}.json"):
            if candidate.is_file():
                found[f"milora_{name}"] = candidate.resolve()
                break
    if not found:
        raise FileNotFoundError(f"no LLM-Adapters test files (<name>/test.json) under {commonsense_dir}")
    return found


def local_files_for(args: argparse.Namespace, tasks: Sequence[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    explicit = {"milora_gsm8k": args.gsm8k_file, "milora_math": args.math_file, "milora_ifeval": args.ifeval_file}
    for task in tasks:
        path = resolve_data_file(explicit.get(task), task, args.data_dir)
        if path:
            files[task] = path
    files.update({t: p for t, p in commonsense_files(args.commonsense_dir).items() if t in tasks})
    return files


# --------------------------------------------------------------------------- suites


def model_context_length(model: str) -> int | None:
    """`max_position_embeddings` of a local checkpoint (text config for LLaVA), None when unknown."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    config = config.get("text_config") or config
    return config.get("max_position_embeddings")


def generation_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    overrides: dict[str, Any] = {}
    if args.max_gen_toks:
        overrides["max_gen_toks"] = args.max_gen_toks
    else:
        context = model_context_length(args.model)
        if context is not None and context <= 1024:
            # the tasks generate up to 512 tokens, which a short-context model cannot fit with its prompt
            overrides["max_gen_toks"] = context // 4
            print(f"milora eval: context of {context} tokens; generating at most {context // 4} (--max_gen_toks)")
    if args.num_beams:
        overrides["num_beams"] = args.num_beams
    return overrides or None


def run_lm_eval_suite(
    args: argparse.Namespace, tasks: Sequence[str], output_dir: Path, include_defaults: bool
) -> SuiteResult:
    from eval_harness import lm_eval_runner
    from eval_harness.local_tasks import project_task_files, write_local_task_yaml

    result = SuiteResult()
    files = local_files_for(args, tasks)
    variant_dir = output_dir / "local_tasks"
    project_files = project_task_files()
    for task, path in files.items():
        write_local_task_yaml(project_files[task], path, variant_dir, task_name=task)
    for task in tasks:
        result.data_sources[task] = str(files[task]) if task in files else HUB
    manager = lm_eval_runner.task_manager(
        [variant_dir, *args.include_path] if files else list(args.include_path), include_defaults=include_defaults
    )
    lm = lm_eval_runner.build_lm(
        args.model, device=args.device, batch_size=args.batch_size, dtype=args.dtype, max_length=args.max_length
    )

    def run(names: Sequence[str]):
        return lm_eval_runner.run_tasks(
            lm,
            names,
            manager,
            limit=args.limit,
            gen_kwargs=generation_overrides(args),
            apply_chat_template=args.apply_chat_template,
        )

    if args.suite == "commonsense":
        # The group in one pass (lm-eval averages the 8 accuracies); set by set if some set cannot be loaded.
        grouped = run([COMMONSENSE_GROUP])
        outcome = grouped if not grouped.skipped else run(tasks)
    else:
        outcome = run(tasks)
    result.metrics, result.skipped, result.records = outcome.metrics, outcome.skipped, outcome.samples
    if args.suite == "commonsense" and COMMONSENSE_GROUP not in result.metrics:
        accuracies = [result.metrics[t]["acc"] for t in COMMONSENSE_TASKS if "acc" in result.metrics.get(t, {})]
        if accuracies:
            result.metrics[COMMONSENSE_GROUP] = {"acc": sum(accuracies) / len(accuracies), "n_tasks": len(accuracies)}
    return result


def judge_endpoint(args: argparse.Namespace):
    from eval_harness.judge import JudgeEndpoint

    return JudgeEndpoint(base_url=args.judge_base_url, api_key=args.judge_api_key, model=args.judge_model)


def generate_for_instructions(args: argparse.Namespace, instructions: Sequence[str], desc: str) -> list[str]:
    from eval_harness import generation

    model, tokenizer = generation.load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    prompts = [generation.format_prompt(i, tokenizer, args.prompt_format) for i in instructions]
    config = generation.GenerationConfig(
        max_new_tokens=args.max_gen_toks or 2048,
        batch_size=args.batch_size,
        stop=("### Instruction:",) if args.prompt_format == "alpaca" else (),
        num_beams=args.num_beams or 1,
    )
    return generation.generate(model, tokenizer, prompts, config, desc=desc)


def run_alpaca_eval_suite(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness import alpaca_eval_runner
    from eval_harness.results import write_json_atomic

    if args.alpaca_eval_file:
        reference = alpaca_eval_runner.load_eval_set(args.alpaca_eval_file)
        source = str(Path(args.alpaca_eval_file).resolve())
    else:
        alpaca_eval_runner.import_alpaca_eval()
        from alpaca_eval import constants as alpaca_constants

        reference = [dict(r) for r in alpaca_constants.ALPACAEVAL_REFERENCE_OUTPUTS()]
        source = HUB
    reference = reference[: args.limit] if args.limit else reference
    instructions = [r["instruction"] for r in reference]
    outputs = generate_for_instructions(args, instructions, desc="alpaca_eval generation")
    generator = args.generator_name or Path(args.model.rstrip("/")).name
    model_outputs = alpaca_eval_runner.model_output_records(
        instructions, outputs, generator, [r.get("dataset", "alpaca_eval") for r in reference]
    )
    write_json_atomic(output_dir / "model_outputs.json", model_outputs)
    annotator = alpaca_eval_runner.write_annotator_config(
        output_dir / "annotator", judge_endpoint(args), args.judge_annotator
    )
    row = alpaca_eval_runner.run_alpaca_eval(model_outputs, reference, annotator, output_dir / "alpaca_eval")
    return SuiteResult(metrics={"alpaca_eval": row}, data_sources={"alpaca_eval": source})


def load_rows(path: str) -> list[dict]:
    import json

    text = Path(path).read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_followbench_suite(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness import followbench
    from eval_harness.judge import ask_judge

    if not args.followbench_file:
        raise SystemExit("milora eval: --suite followbench needs --followbench_file")
    rows = load_rows(args.followbench_file)
    seeds = followbench.seed_instructions(rows)
    constrained = [r for r in rows if int(r["level"]) >= 1]
    constrained = constrained[: args.limit] if args.limit else constrained
    responses = generate_for_instructions(args, [r["instruction"] for r in constrained], desc="followbench generation")
    prompts = [
        followbench.judge_prompt(seeds[followbench.group_key(r)], r["instruction"], response, int(r["level"]))
        for r, response in zip(constrained, responses, strict=True)
    ]
    verdicts = ask_judge(judge_endpoint(args), prompts, desc="followbench judging")
    judged, records = [], []
    for row, response, verdict in zip(constrained, responses, verdicts, strict=True):
        satisfied = followbench.parse_judgments(verdict, int(row["level"]))
        judged.append(followbench.Judged(followbench.group_key(row), int(row["level"]), satisfied))
        records.append(dict(row, response=response, judge_output=verdict, satisfied=satisfied))
    return SuiteResult(
        metrics={"followbench": followbench.satisfaction_rates(judged)},
        data_sources={"followbench": str(Path(args.followbench_file).resolve())},
        records={"followbench": records},
    )


def run_vqa_suite(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness import vqa
    from eval_harness.llava_generation import answer_questions, load_llava

    if not (args.vqa_benchmark and args.vqa_file):
        raise SystemExit("milora eval: --suite vqa needs --vqa_benchmark and --vqa_file")
    records = vqa.load_records(args.vqa_file, limit=args.limit)
    pairs = vqa.build_requests(args.vqa_benchmark, records, image_dir=args.image_dir)
    model, processor = load_llava(args.model, device=args.device, dtype=args.dtype)
    predictions = answer_questions(
        model,
        processor,
        [q for _, q in pairs],
        batch_size=args.batch_size,
        max_new_tokens=args.max_gen_toks or 128,
        style=args.llava_prompt_style,
        desc=args.vqa_benchmark,
    )
    scored = [r for r, _ in pairs]
    name = args.vqa_benchmark
    return SuiteResult(
        metrics={name: vqa.score(name, scored, predictions)},
        data_sources={name: str(Path(args.vqa_file).resolve())},
        records={
            name: [dict(r, prediction=p, prompt=q.question) for (r, q), p in zip(pairs, predictions, strict=True)]
        },
    )


def run_suite(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    if args.suite in LM_EVAL_SUITES:
        return run_lm_eval_suite(args, LM_EVAL_SUITES[args.suite], output_dir, include_defaults=False)
    if args.suite == "lm_eval":
        if not args.tasks:
            raise SystemExit("milora eval: --suite lm_eval needs --tasks")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        return run_lm_eval_suite(args, tasks, output_dir, include_defaults=True)
    if args.suite == "alpaca_eval":
        return run_alpaca_eval_suite(args, output_dir)
    if args.suite == "followbench":
        return run_followbench_suite(args, output_dir)
    if args.suite == "vqa":
        return run_vqa_suite(args, output_dir)
    raise SystemExit(f"milora eval: unknown suite {args.suite!r}")


# --------------------------------------------------------------------------- report


def build_report(args: argparse.Namespace, result: SuiteResult) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k != "judge_api_key"}
    return {
        "suite": args.suite,
        "model": args.model,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": result.metrics,
        "skipped": result.skipped,
        "data_sources": result.data_sources,
        "settings": settings,
    }


def exit_status(result: SuiteResult) -> int:
    if not result.metrics:
        return EXIT_NONE_RAN
    return EXIT_PARTIAL if result.skipped else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from eval_harness import lm_eval_runner
    from eval_harness.generation import default_device
    from eval_harness.results import markdown_table, write_jsonl_atomic, write_report

    args.device = args.device or default_device()
    output_dir = Path(args.output_dir) if args.output_dir else lm_eval_runner.default_output_dir(args.model, args.suite)
    output_dir.mkdir(parents=True, exist_ok=True)

    result = run_suite(args, output_dir)
    report = build_report(args, result)
    json_path, md_path = write_report(output_dir, report)
    for task, rows in result.records.items():
        write_jsonl_atomic(output_dir / "samples" / f"{task.replace('/', '_')}.jsonl", rows)

    print(f"\n{args.suite} evaluation of {args.model}\n")
    print(markdown_table(result.metrics))
    for task, reason in result.skipped.items():
        print(f"skipped {task}: {reason}", file=sys.stderr)
    print(f"wrote {json_path} and {md_path}")
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
