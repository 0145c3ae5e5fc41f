"""Pieces the open-ended suites share: generating answers to instructions, and the judge endpoint's flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from eval_harness.errors import UsageError

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


def generate_for_instructions(args: argparse.Namespace, instructions: Sequence[str], desc: str) -> list[str]:
    """The checkpoint's answer to each instruction, in --prompt_format, cut at the next Alpaca instruction."""
    from eval_harness import generation

    engine = getattr(args, "engine", "milora")
    if engine not in generation.ENGINES:
        raise UsageError(f"--engine {engine} serves the lm-eval suites only",
                         f"use --engine {' or '.join(generation.ENGINES)} with --suite {args.suite}")
    model, tokenizer = generation.load_causal_lm(args.model_source, device=args.device, dtype=args.dtype)
    prompts = [generation.format_prompt(i, tokenizer, args.prompt_format) for i in instructions]
    config = generation.GenerationConfig(
        max_new_tokens=args.max_gen_toks or DEFAULT_MAX_NEW_TOKENS,
        batch_size=args.batch_size,
        stop=(ALPACA_STOP,) if args.prompt_format == "alpaca" else (),
        num_beams=args.num_beams or 1,
        engine=engine,
    )
    return generation.generate(model, tokenizer, prompts, config, desc=desc)
