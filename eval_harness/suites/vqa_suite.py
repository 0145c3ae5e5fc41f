"""``--suite vqa``: one LLaVA-1.5 benchmark (VQAv2, VizWiz, TextVQA, GQA, ScienceQA, POPE, MMBench) from a
local question file, answered by a LLaVA checkpoint and scored with the benchmark's official rules."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from eval_harness import vqa
from eval_harness.errors import UsageError
from eval_harness.suites import SuiteResult

DEFAULT_MAX_NEW_TOKENS = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vqa")
    group.add_argument("--vqa_benchmark", choices=vqa.BENCHMARKS)
    group.add_argument("--vqa_file", help="benchmark questions (jsonl, format in eval_harness/vqa.py)")
    group.add_argument("--image_dir", help="folder the image paths of --vqa_file are relative to")
    group.add_argument("--llava_prompt_style", default="llava_v1", choices=["llava_v1", "chat"])


def evaluate_vqa(benchmark: str, records: Sequence[dict], answer: Callable[[list], list[str]], image_dir=None):
    """Scores and per-question records of `answer` (VisualQuestions -> answers) on the benchmark's records."""
    pairs = vqa.build_requests(benchmark, records, image_dir=image_dir)
    predictions = answer([question for _, question in pairs])
    scored = [record for record, _ in pairs]
    rows = [dict(r, prediction=p, prompt=q.question) for (r, q), p in zip(pairs, predictions, strict=True)]
    return vqa.score(benchmark, scored, predictions), rows


def run(args: argparse.Namespace, output_dir: Path) -> SuiteResult:
    from eval_harness.llava_generation import answer_questions, load_llava

    if not (args.vqa_benchmark and args.vqa_file):
        raise UsageError("--suite vqa needs a benchmark and its questions", "pass --vqa_benchmark and --vqa_file")
    vqa_file = Path(args.vqa_file)
    if not vqa_file.is_file():
        raise UsageError(f"--vqa_file {args.vqa_file} does not exist", "give the benchmark's question file (jsonl)")
    records = vqa.load_records(vqa_file, limit=args.limit)
    model, processor = load_llava(args.model_source, device=args.device, dtype=args.dtype)

    def answer(questions: list) -> list[str]:
        return answer_questions(
            model,
            processor,
            questions,
            batch_size=args.batch_size,
            max_new_tokens=args.max_gen_toks or DEFAULT_MAX_NEW_TOKENS,
            style=args.llava_prompt_style,
            desc=args.vqa_benchmark,
        )

    name = args.vqa_benchmark
    scores, rows = evaluate_vqa(name, records, answer, image_dir=args.image_dir)
    return SuiteResult(metrics={name: scores}, data_sources={name: str(vqa_file.resolve())}, records={name: rows})
