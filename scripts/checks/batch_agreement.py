"""How far greedy generations agree between milora's generation engine and Hugging Face `model.generate` at
batch 1 and at batch B (left padding, longest prompts first, lm-eval's stop-sequence criteria: as lm-eval's
HFLM generates), and whether each difference starts at a near-tie.

    python scripts/checks/batch_agreement.py MODEL PROMPTS [--task milora_gsm8k] [--dtype bfloat16]
        [--limit 200] [--hf_batch 64] [--max_new_tokens N] [--show 5] --out OUT

MODEL is a Hugging Face model folder. PROMPTS is a jsonl file of {"prompt": ...} rows, a `milora eval` samples
file (`samples/<task>.jsonl`: its prompts, stop strings and max_gen_toks are used) or lm-eval's own logged
samples (context and settings from each row's `arguments`), or a `milora eval` output folder with `--task`.
`--max_new_tokens` overrides the rows' limit (default 256 where a row has none).

Every answer is cut as lm-eval cuts it (at the first end-of-sequence token or stop string), so tokens made
past the end do not count. For each pair of generators: the share of identical answers and, for each differing
item, the first position where they part and the margin logit(first's token) - logit(second's token) there,
from one forward pass of prompt + common prefix at batch 1, in the run's dtype and in float32 (the same weights
upcast). A float32 margin no larger than the shift the run's dtype puts on it (dtype margin - float32 margin)
means the difference starts at a near-tie. Prints a table and writes OUT/batch_agreement.json (generators
`engine`, `hf_batch1`, `hf_batchB`; every difference, every answer's text and tokens, each generator's seconds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from milora.io import read_jsonl, write_json
from milora.reporting import run_command

GENERATORS = ("engine", "hf_batch1", "hf_batchB")
PAIRS = (("engine", "hf_batch1"), ("engine", "hf_batchB"), ("hf_batch1", "hf_batchB"))
DEFAULT_MAX_NEW_TOKENS = 256


def samples_file(path: Path, task: str | None) -> Path:
    """The jsonl to read: `path` itself, or `path/samples/<task>.jsonl` for a `milora eval` output folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"prompts {path} not found; give a jsonl file or a `milora eval` output folder")
    if not task:
        found = sorted(p.stem for p in (path / "samples").glob("*.jsonl") if ".generations" not in p.name)
        raise ValueError(f"{path} is an output folder; name its task with --task (one of: {', '.join(found)})")
    file = path / "samples" / f"{task}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; is {task!r} a task of that run?")
    return file


def read_requests(rows: Sequence[dict], max_new_tokens: int | None) -> list[dict]:
    """{"prompt", "until", "max_new_tokens"} per row: `milora eval` samples carry "prompt" and
    "generation_kwargs", lm-eval's logged samples "arguments" ([[context, settings], ...])."""
    requests = []
    for number, row in enumerate(rows, 1):
        arguments = row.get("arguments") or [[None]]
        if isinstance(arguments, dict):  # older lm-eval logs: {"gen_args_0": {"arg_0": context, "arg_1": settings}}
            arguments = [list(a.values()) for a in arguments.values()]
        prompt = row.get("prompt", arguments[0][0])
        settings = row.get("generation_kwargs") or (arguments[0][1] if len(arguments[0]) > 1 else None) or {}
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"row {number} has no prompt; give rows with a 'prompt' string or lm-eval 'arguments'")
        until = settings.get("until") or []
        limit = max_new_tokens or settings.get("max_gen_toks") or DEFAULT_MAX_NEW_TOKENS
        requests.append({"prompt": prompt, "until": [until] if isinstance(until, str) else list(until),
                         "max_new_tokens": int(limit)})  # fmt: skip
    return requests


def answer_tokens(tokens: Sequence[int], eos: set[int], stops: Sequence[str], decode: Callable) -> list[int]:
    """The tokens lm-eval's answer is made of: up to the first end-of-sequence token (kept), and up to the
    token that completes the first stop string (kept); what a batch generated after that is dropped."""
    tokens = list(tokens)
    end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
    tokens = tokens[:end]
    if not any(s in decode(tokens) for s in stops):
        return tokens
    low, high = 1, len(tokens)  # the shortest prefix whose text holds a stop string (containment grows)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if any(s in decode(tokens[:middle]) for s in stops) else (middle + 1, high)
    return tokens[:low]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where `a` and `b` differ (the shorter one's length if one is a prefix); None if equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def logit_margin(model, context: Sequence[int], token_a: int, token_b: int) -> tuple[float, int]:
    """logit(token_a) - logit(token_b) for the token after `context` (one forward pass, batch 1), and the
    model's own choice there."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([list(context)], device=device)).logits[0, -1].float()
    return float(logits[token_a] - logits[token_b]), int(logits.argmax())


def generate_hf(model, requests: list[dict], prompts: list[list[int]], batch: int, tokenizer, eos: list[int]):
    """HFLM's greedy `generate_until` path: requests grouped by settings, longest prompt first, batches of
    `batch` left-padded, lm-eval's stop-sequence criteria. The new tokens of each request, in input order."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    pad = eos[0] if pad is None else pad
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((tuple(request["until"]), request["max_new_tokens"]), []).append(index)
    outputs: list[list[int]] = [[] for _ in requests]
    progress = tqdm(total=len(requests), desc=f"hf batch {batch}", unit="seq")
    for (until, limit), members in groups.items():
        members.sort(key=lambda i: (-len(prompts[i]), requests[i]["prompt"]))
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
            criteria = stop_sequences_criteria(tokenizer, list(until), width, len(chunk)) if until else None
            made = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit, do_sample=False,
                                  num_beams=1, stopping_criteria=criteria, pad_token_id=pad, eos_token_id=eos,
                                  use_cache=True)  # fmt: skip
            for row, i in enumerate(chunk):
                outputs[i] = made[row, width:].tolist()
            progress.update(len(chunk))
    progress.close()
    return outputs


def generate_engine(model, requests: list[dict], prompts: list[list[int]], tokenizer, eos: list[int]):
    from eval_harness.engine import GenerationEngine

    def stop(i: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        return any(s in text for s in requests[i]["until"])

    limits = [r["max_new_tokens"] for r in requests]
    return GenerationEngine(model, eos_token_ids=eos).generate(prompts, limits, stop=stop, desc="engine")


def compare_pair(first: list[list[int]], second: list[list[int]], prompts, models: dict) -> list[dict]:
    """One record per differing item: where the two part and the margins there (run's dtype, float32)."""
    differences = []
    for item, (a, b) in enumerate(zip(first, second, strict=True)):
        position = first_divergence(a, b)
        if position is None:
            continue
        record = {"item": item, "position": position, "first_token": None, "second_token": None}
        if position < len(a) and position < len(b):
            context = prompts[item] + a[:position]
            record.update(first_token=a[position], second_token=b[position])
            for name, model in models.items():
                margin, choice = logit_margin(model, context, a[position], b[position])
                record[f"margin_{name}"], record[f"choice_{name}"] = margin, choice
            record["shift"] = record["margin_dtype"] - record["margin_float32"]  # the run's dtype's rounding
        differences.append(record)
    return differences


def summarize(differences: list[dict], items: int) -> dict:
    def median_abs(key: str) -> float | None:
        values = [abs(d[key]) for d in differences if key in d]
        return statistics.median(values) if values else None

    measured = [d for d in differences if "choice_float32" in d]  # not where one answer is a prefix of the other
    first = sum(d["choice_float32"] == d["first_token"] for d in measured)
    second = sum(d["choice_float32"] == d["second_token"] for d in measured)
    return {
        "items": items,
        "identical": items - len(differences),
        "identical_share": (items - len(differences)) / max(1, items),
        "median_position": statistics.median([d["position"] for d in differences]) if differences else None,
        "median_abs_margin_dtype": median_abs("margin_dtype"),
        "median_abs_margin_float32": median_abs("margin_float32"),
        "max_abs_margin_float32": max((abs(d["margin_float32"]) for d in measured), default=None),
        "median_abs_shift": median_abs("shift"),
        "float32_picks": {"first": first, "second": second, "neither": len(measured) - first - second},
    }


TABLE_COLUMNS = ("pair", "identical", "share", "median first diff", "median abs margin (dtype)",
                 "median abs margin (float32)", "median abs shift (dtype - float32)",
                 "float32 picks first/second/neither")  # fmt: skip


def format_table(report: dict) -> str:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for pair, entry in report["pairs"].items():
        s = entry["summary"]
        cells = [pair, f"{s['identical']}/{s['items']}", f"{s['identical_share']:.1%}", cell(s["median_position"]),
                 cell(s["median_abs_margin_dtype"]), cell(s["median_abs_margin_float32"]),
                 cell(s["median_abs_shift"]), "/".join(str(n) for n in s["float32_picks"].values())]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_check(model, tokenizer, requests: list[dict], hf_batch: int) -> dict:
    """Generate with all three, cut as lm-eval cuts answers, compare each pair."""
    from eval_harness.engine.model_settings import eos_token_ids

    model.eval()
    eos = eos_token_ids(model, tokenizer)
    eos_text = tokenizer.decode(eos[:1], skip_special_tokens=False) if eos else None
    for request in requests:  # lm-eval adds the EOS text to every request's stop strings
        request["until"] = [s for s in dict.fromkeys([*request["until"], eos_text]) if s]
    prompts = [tokenizer(r["prompt"]).input_ids for r in requests]
    raw, seconds = {}, {}
    for name, batch in (("engine", None), ("hf_batch1", 1), ("hf_batchB", hf_batch)):
        tick = time.perf_counter()
        raw[name] = (generate_engine(model, requests, prompts, tokenizer, eos) if batch is None
                     else generate_hf(model, requests, prompts, batch, tokenizer, eos))  # fmt: skip
        seconds[name] = round(time.perf_counter() - tick, 2)

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=False)

    answers = {name: [answer_tokens(t, set(eos), r["until"], decode) for t, r in zip(out, requests, strict=True)]
               for name, out in raw.items()}  # fmt: skip
    models = {"dtype": model}
    needs_float32 = model.dtype != torch.float32 and any(answers[a] != answers[b] for a, b in PAIRS)
    models["float32"] = copy.deepcopy(model).float() if needs_float32 else model
    report = {"dtype": str(model.dtype), "hf_batch": hf_batch, "items": len(requests), "seconds": seconds, "pairs": {}}
    for first, second in PAIRS:
        differences = compare_pair(answers[first], answers[second], prompts, models)
        report["pairs"][f"{first} vs {second}"] = {"summary": summarize(differences, len(requests)),
                                                   "differences": differences}  # fmt: skip
    report["answers"] = [{"prompt": r["prompt"], "prompt_tokens": prompts[i],
                          **{name: decode(answers[name][i]) for name in GENERATORS},
                          "tokens": {name: answers[name][i] for name in GENERATORS}}
                         for i, r in enumerate(requests)]  # fmt: skip
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="Hugging Face model folder")
    parser.add_argument("prompts", type=Path, help="jsonl of prompts or samples, or a `milora eval` output folder")
    parser.add_argument("--task", help="the task whose samples to read, when PROMPTS is an output folder")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, help="first N prompts only")
    parser.add_argument("--max_new_tokens", type=int, help="override the rows' max_gen_toks (default 256)")
    parser.add_argument("--hf_batch", type=int, default=64, help="batch size of the batched HF run")
    parser.add_argument("--show", type=int, default=3, help="differing answers to print per pair")
    parser.add_argument("--out", type=Path, required=True, help="folder for batch_agreement.json")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"{args.model} is not a Hugging Face model folder (no config.json); give one")
    if args.hf_batch < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--hf_batch and --limit must be at least 1")
    requests = read_requests(read_jsonl(samples_file(args.prompts, args.task))[: args.limit], args.max_new_tokens)
    if not requests:
        raise ValueError(f"{args.prompts} holds no prompts; give a file with at least one row")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(args.device)
    report = run_check(model, tokenizer, requests, args.hf_batch)
    report.update(model=str(args.model), prompts=str(args.prompts), device=str(args.device))
    print(format_table(report).replace("hf_batchB", f"hf_batch{args.hf_batch}"))
    print("seconds: " + ", ".join(f"{name} {value}" for name, value in report["seconds"].items()))
    for pair, entry in report["pairs"].items():
        for difference in entry["differences"][: args.show]:
            answers = report["answers"][difference["item"]]
            where = f"item {difference['item']}, position {difference['position']}"
            print(f"{pair}, {where}, float32 margin {difference.get('margin_float32')}:")
            for name in pair.split(" vs "):
                print(f"  {answers[name]!r:.200}")
    write_json(args.out / "batch_agreement.json", report)
    print(f"wrote {args.out / 'batch_agreement.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command("batch_agreement.py", main))
