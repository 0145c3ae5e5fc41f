"""One process of the miniature tables (scripts/miniature_tables.py starts them; each runs alone, in parallel).

    python scripts/miniature_worker.py train --stats FILE -- RECIPE.yaml --seed 1 --output_dir DIR ...
    python scripts/miniature_worker.py evaluate --model DIR --data_dir DIR --out FILE [--limit N]

`train` runs `recipes/sft.py` in this process and then writes FILE (JSON): wall time, the trainer's own
runtime, steps, first and last logged losses and the peak GPU memory of the run (`torch.cuda.max_memory_allocated`,
which covers the whole run because it ran here).

`evaluate` scores one checkpoint (`--parts`: which of these; all by default): GSM8K test (MetaMath evaluation
prompt, greedy, graded by `eval_harness.math_grading`), the LLM-Adapters commonsense test sets (their Alpaca prompt,
greedy, answers extracted by `eval_harness.commonsense`), and the forgetting loss: the mean negative log-likelihood
of the AlpacaEval reference outputs, each after its instruction in the model's chat template, over output tokens
only. FILE is rewritten after every part, and a rerun skips the parts already in it. Generation runs on milora's
engine (`eval_harness.generation`; `--batch_size` is the batch of the `model.generate` fallback).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from milora.io import read_json, read_json_rows, write_json  # noqa: E402

GSM8K_MAX_NEW_TOKENS = 400
COMMONSENSE_MAX_NEW_TOKENS = 32
FORGETTING_MAX_TOKENS = 1024
STOP = ("### Instruction", "### Response")


# --------------------------------------------------------------------------- training


def load_sft_entry():
    """recipes/sft.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("milora_recipes_sft", REPO / "recipes" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logged_losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def train_one(stats_file: str, sft_argv: list[str]) -> int:
    import torch

    started = time.time()
    stats = {"argv": sft_argv, "status": "failed"}
    try:
        trainer = load_sft_entry().train(sft_argv)
    except Exception as error:  # recorded for the table, then re-raised for the log
        stats["error"] = f"{type(error).__name__}: {error}"
        stats["wall_s"] = time.time() - started
        write_json(stats_file, stats)
        raise
    history = trainer.state.log_history
    losses = logged_losses(history)
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
    stats.update(
        status="done",
        wall_s=time.time() - started,
        train_runtime_s=runtime,
        global_step=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        losses=losses,
        peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    )
    write_json(stats_file, stats)
    return 0


# --------------------------------------------------------------------------- evaluation


def gsm8k_scores(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    from eval_harness.generation import GenerationConfig, generate
    from eval_harness.math_grading import (
        extract_gsm8k_answer,
        extract_gsm8k_answer_flexible,
        gsm8k_gold_answer,
        gsm8k_is_correct,
    )
    from milora.prompts import metamath_eval_prompt

    prompts = [metamath_eval_prompt(row["question"]) for row in rows]
    outputs = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens, batch_size, STOP), desc="gsm8k")
    golds = [gsm8k_gold_answer(row["answer"]) for row in rows]
    strict = [gsm8k_is_correct(extract_gsm8k_answer(o), g) for o, g in zip(outputs, golds, strict=True)]
    flexible = [gsm8k_is_correct(extract_gsm8k_answer_flexible(o), g) for o, g in zip(outputs, golds, strict=True)]
    return {
        "accuracy": 100 * sum(strict) / len(rows),
        "accuracy_flexible": 100 * sum(flexible) / len(rows),
        "rows": len(rows),
        "examples": [{"question": r["question"], "gold": g, "output": o}
                     for r, g, o in zip(rows[:3], golds[:3], outputs[:3], strict=True)],
    }


def commonsense_scores(model, tokenizer, name: str, rows: list[dict], batch_size: int, max_new_tokens: int) -> dict:
    from eval_harness.commonsense import is_commonsense_correct
    from eval_harness.generation import GenerationConfig, generate
    from milora.prompts import alpaca_prompt

    prompts = [alpaca_prompt(row["instruction"], row.get("input")) for row in rows]
    outputs = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens, batch_size, STOP), desc=name)
    correct = [is_commonsense_correct(name, o, row["answer"]) for o, row in zip(outputs, rows, strict=True)]
    return {"accuracy": 100 * sum(correct) / len(rows), "rows": len(rows), "examples": outputs[:3]}


def response_token_ids(tokenizer, instruction: str, output: str, max_tokens: int) -> tuple[list[int], int]:
    """Chat-formatted instruction + output as token ids, and how many leading ids are prompt (no loss)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    return (prompt_ids + output_ids)[:max_tokens], len(prompt_ids)


def response_nll(model, tokenizer, rows: list[dict], batch_size: int, max_tokens: int = FORGETTING_MAX_TOKENS) -> dict:
    """Mean NLL (nats per token) of the reference outputs given their instructions, output tokens only
    (`milora.analysis.forgetting.sequence_nll`)."""
    from milora.analysis.forgetting import sequence_nll

    encoded = [response_token_ids(tokenizer, r["instruction"], r["output"], max_tokens) for r in rows]
    result = sequence_nll(model, [ids for ids, _ in encoded], [prompt_len for _, prompt_len in encoded],
                          batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    return {"nll": result["nll"], "tokens": result["token_count"], "rows": len(rows)}


PART_KINDS = ("gsm8k", "commonsense", "forgetting")


def evaluation_parts(data_dir: Path, limit: int | None, kinds: tuple[str, ...] = PART_KINDS) -> dict:
    """Part name -> (kind, rows) for the parts of the given kinds found under data_dir (layout:
    eval_harness/data_paths.py)."""
    from eval_harness.data_paths import DATA_LAYOUT, commonsense_test_files

    parts = {}
    if "gsm8k" in kinds:
        parts["gsm8k"] = ("gsm8k", read_json_rows(data_dir / DATA_LAYOUT["gsm8k"])[:limit])
    if "commonsense" in kinds:
        for name, path in commonsense_test_files(data_dir / DATA_LAYOUT["commonsense"]).items():
            parts[name] = ("commonsense", read_json_rows(path)[:limit])
    if "forgetting" in kinds:
        parts["forgetting"] = ("forgetting", read_json_rows(data_dir / DATA_LAYOUT["alpaca_eval"])[:limit])
    return parts


def part_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in PART_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown part kind(s) {unknown or text!r}: use {','.join(PART_KINDS)}")
    return kinds


def evaluate_one(args) -> int:
    from eval_harness.generation import load_causal_lm

    out = Path(args.out)
    results = read_json(out) if out.is_file() else {"model": args.model, "parts": {}}
    parts = evaluation_parts(Path(args.data_dir), args.limit, args.parts)
    todo = [name for name in parts if name not in results["parts"]]
    if not todo:
        return 0
    started = time.time()
    model, tokenizer = load_causal_lm(args.model)
    for name in todo:
        kind, rows = parts[name]
        part_started = time.time()
        if kind == "gsm8k":
            scores = gsm8k_scores(model, tokenizer, rows, args.batch_size, args.gsm8k_max_new_tokens)
        elif kind == "commonsense":
            scores = commonsense_scores(model, tokenizer, name, rows, args.batch_size * 2, COMMONSENSE_MAX_NEW_TOKENS)
        else:
            scores = response_nll(model, tokenizer, rows, max(1, args.batch_size // 32))  # 1024-token rows
        scores["seconds"] = time.time() - part_started
        results["parts"][name] = scores
        write_json(out, results)
        value = scores.get("accuracy", scores.get("nll"))
        print(f"{out.stem} {name}: {value:.4g} ({scores['seconds']:.0f} s)", flush=True)
    results["seconds"] = results.get("seconds", 0.0) + time.time() - started
    write_json(out, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="one process of scripts/miniature_tables.py")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run recipes/sft.py here and record its time and peak memory")
    train.add_argument("--stats", required=True, help="JSON file for the run's statistics")
    evaluate = commands.add_parser("evaluate", help="score one checkpoint")
    evaluate.add_argument("--model", required=True, help="checkpoint directory")
    evaluate.add_argument("--data_dir", required=True, help="evaluation data folder (eval_harness/data_paths.py)")
    evaluate.add_argument("--out", required=True, help="results JSON (rewritten after every part)")
    evaluate.add_argument("--limit", type=int, default=None, help="first N rows of every set (smoke runs)")
    evaluate.add_argument("--batch_size", type=int, default=256, help="GSM8K generation batch (commonsense: 2x)")
    evaluate.add_argument("--gsm8k_max_new_tokens", type=int, default=GSM8K_MAX_NEW_TOKENS)
    evaluate.add_argument("--parts", type=part_kinds, default=PART_KINDS,
                          help=f"comma-separated kinds of parts to score (default: all, {','.join(PART_KINDS)})")
    if argv[:1] == ["train"] and "--" in argv:
        split = argv.index("--")
        args = parser.parse_args(argv[:split])
        return train_one(args.stats, argv[split + 1 :])
    args = parser.parse_args(argv)
    if args.command == "train":
        parser.error("train needs the recipe arguments after --")
    return evaluate_one(args)


if __name__ == "__main__":
    sys.exit(main())
