"""Pieces the open-ended suites share: generating answers to instructions, and the judge endpoint's flags."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from eval_harness.errors import UsageError

LOGGER = logging.getLogger(__name__)
ALPACA_STOP = "### Instruction:"  # an Alpaca-format model that goes on writes the next instruction
DEFAULT_MAX_NEW_TOKENS = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    generation = parser.add_argument_group("open-ended generation (alpaca_eval, followbench)")
    generation.add_argument("--prompt_format", default="alpaca", choices=["alpaca", "chat", "raw"])
    generation.add_argument("--generator_name", help="name of the model in the AlpacaEval outputs")

    judge = parser.add_argument_group("judge: any OpenAI-compatible chat-completions server")
    judge.add_argument("--judge_base_url", help="e.g. http://127.0.0.1:8000/v1 (default: OPENAI_BASE_URL or OpenAI)")
    judge.add_argument("--judge_api_key", help="default: OPENAI_API_KEY (safer on a shared machine), else 'EMPTY'")
    judge.add_argument("--judge_model", default="gpt-4-1106-preview")
    judge.add_argument(
        "--judge_annotator",
        default="weighted_alpaca_eval_gpt4_turbo",
        help="alpaca_eval annotator config to derive from",
    )


def judge_endpoint(args: argparse.Namespace):
    from eval_harness.judge import JudgeEndpoint

    return JudgeEndpoint(base_url=args.judge_base_url, api_key=args.judge_api_key, model=args.judge_model)


def generate_for_instructions(args: argparse.Namespace, instructions: Sequence[str], desc: str, output_dir: Path,
                              task: str) -> list[str]:
    """The checkpoint's answer to each instruction, in --prompt_format, cut at the next Alpaca instruction.

    Answers stream to `output_dir/samples/<task>.generations.jsonl` as they are made
    (`eval_harness.generation_store`): a rerun with the same checkpoint, dtype, engine and generation settings
    generates only the instructions not answered there (an interrupted run resumes), and loads no model when
    every answer is stored."""
    from eval_harness import generation
    from eval_harness.generation_store import GenerationStore, weights_fingerprint

    engine = getattr(args, "engine", "milora")
    if engine not in generation.ENGINES:
        raise UsageError(f"--engine {engine} serves the lm-eval suites only",
                         f"use --engine {' or '.join(generation.ENGINES)} with --suite {args.suite}")
    config = generation.GenerationConfig(
        max_new_tokens=args.max_gen_toks or DEFAULT_MAX_NEW_TOKENS,
        batch_size=args.batch_size,
        stop=(ALPACA_STOP,) if args.prompt_format == "alpaca" else (),
        num_beams=args.num_beams or 1,
        engine=engine,
    )
    identity = {"model": str(args.model), "weights": weights_fingerprint(str(args.model)), "dtype": args.dtype,
                "engine": engine}
    store = GenerationStore(output_dir / "samples", identity)
    settings = {"prompt_format": args.prompt_format, "max_new_tokens": config.max_new_tokens,
                "stop": list(config.stop), "num_beams": config.num_beams}
    keys = [store.key(instruction, settings) for instruction in instructions]
    answers: list[str | None] = [store.answers.get(key) for key in keys]
    todo = [i for i, answer in enumerate(answers) if answer is None]
    if len(todo) < len(answers):
        LOGGER.info("%s: reusing %d stored answers from %s", task, len(answers) - len(todo), store.folder)
    if not todo:
        return answers

    def keep(position: int, text: str) -> None:
        i = todo[position]
        answers[i] = text
        store.add(keys[i], task, i, text)

    model, tokenizer = generation.load_causal_lm(args.model_source, device=args.device, dtype=args.dtype)
    prompts = [generation.format_prompt(instructions[i], tokenizer, args.prompt_format) for i in todo]
    generation.generate(model, tokenizer, prompts, config, desc=desc, on_answer=keep)
    return answers
