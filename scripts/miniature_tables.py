"""A miniature of the MiLoRA paper's Tables 1-2: LoRA, PiSSA and MiLoRA on SmolLM2-135M-Instruct (GGUF), math
(GSM8K) and commonsense (LLM-Adapters sets), trained side by side on one GPU and evaluated, with forgetting.

    python scripts/miniature_tables.py prepare  --data_dir DATA --out outputs/miniature
    python scripts/miniature_tables.py train    --model SmolLM2-135M-Instruct.Q4_1.gguf --out outputs/miniature
    python scripts/miniature_tables.py evaluate --model SmolLM2-135M-Instruct.Q4_1.gguf --runs_dir outputs/miniature \
        --data_dir outputs/miniature/data
    python scripts/miniature_tables.py table    --runs_dir outputs/miniature      # Markdown for docs/results.md

DATA is laid out as eval_harness/data_paths.py describes, with the training sets beside the test sets:
`gsm8k_train.jsonl`, `commonsense/<set>/train.json`. `prepare` writes OUT/data: the two training files of the
recipes (GSM8K train as is; the four LLM-Adapters training sets concatenated) and a copy of the evaluation
files, so OUT/data alone is what a machine without DATA needs.

`train` converts the GGUF once to OUT/base (safetensors; every run then loads it in seconds) and runs
`recipes/sft.py recipes/smollm2_<task>_<method>.yaml --seed S` for each run (`--runs`: names like math_milora_s1, or
`all`) as concurrent processes, each in scripts/miniature_worker.py, which records its wall time and peak GPU memory
in OUT/train/<run>.json. `evaluate` scores the base model on everything and every trained run on its own task's sets
and the forgetting loss, one process per model, into OUT/eval/<model>.json. Everything is written as it finishes: a
finished run or model is skipped by a rerun, an interrupted run resumes from its last checkpoint, an interrupted
evaluation from its last finished part. `--deadline_s` stops whatever is still running at that time (to fit a
command limit) so that a rerun continues it. `--smoke`: a few steps and 8 rows per set, for a check on CPU.

An output directory holds the results of one mode: the first `train` or `evaluate` records it in
OUT/miniature_mode.json (`smoke` or `full`), and the other mode is refused there, so that a smoke run's jobs
never count as done for a real run (nor resume its checkpoints). `table` marks smoke results as such.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from milora.io import read_json  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from miniature_report import markdown_tables  # noqa: E402

TASKS = {"math": 2, "commonsense": 1}  # task -> seeds
METHODS = ("lora", "pissa", "milora")
ALL_RUNS = [f"{task}_{method}_s{seed}" for task, seeds in TASKS.items() for method in METHODS
            for seed in range(1, seeds + 1)]
# 4-bit bases: the bf16 method's recipe with load_in_4bit (QPiSSA with the 5 refits of its paper); `--runs quantized`
QUANTIZED_METHODS = {"qlora": ("lora", []), "qpissa": ("pissa", ["--qpissa_iterations", "5"]),
                     "qmilora": ("milora", [])}
QUANTIZED_RUNS = [f"commonsense_{method}_s1" for method in QUANTIZED_METHODS]
# FP8 frozen bases: the bf16 method's recipe with fp8_base (compute capability >= 8.9); `--runs fp8`
FP8_METHODS = {f"fp8{method}": (method, ["--fp8_base", "true"]) for method in METHODS}
FP8_RUNS = [f"commonsense_{method}_s1" for method in FP8_METHODS]
BASE_VARIANTS = {method: (recipe_method, ["--load_in_4bit", "true", *refits])
                 for method, (recipe_method, refits) in QUANTIZED_METHODS.items()} | FP8_METHODS
TRAIN_FILES = {"math": "gsm8k_train.jsonl", "commonsense": "commonsense_train.json"}
TASK_PARTS = {"math": "gsm8k", "commonsense": "commonsense"}  # the worker's part kinds a task's table shows
EVAL_FILES = ("gsm8k_test.jsonl", "alpaca_eval/gpt4_1106_preview_outputs.json")
SMOKE_TRAIN = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--effective_batch_size", "2",
               "--dataset_max_samples", "16", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "1",
               "--report_to", "none"]
SMOKE_EVAL = ["--limit", "8", "--batch_size", "8", "--gsm8k_max_new_tokens", "48"]
WORKER = REPO / "scripts" / "miniature_worker.py"
MODE_FILE = "miniature_mode.json"  # in OUT: {"mode": "smoke" | "full"}, the mode whose results OUT holds
SMOKE_NOTE = "**Smoke run (`--smoke`: a few steps, 8 rows per set): a check of the plumbing, not results.**"


class DriverError(Exception):
    """Bad input to the driver; reported on one line."""


# --------------------------------------------------------------------------- prepare


def prepare(data_dir: Path, out: Path) -> Path:
    """OUT/data: the recipes' two training files and a copy of the evaluation files."""
    sys.path.insert(0, str(REPO / "recipes" / "data"))
    from prepare_commonsense_train import concatenate_train_sets

    from milora.io import write_json as write_rows

    target = out / "data"
    gsm8k_train = data_dir / TRAIN_FILES["math"]
    if not gsm8k_train.is_file():
        raise DriverError(f"{gsm8k_train} not found (GSM8K train.jsonl with question/answer rows)")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gsm8k_train, target / TRAIN_FILES["math"])
    try:
        write_rows(target / TRAIN_FILES["commonsense"], concatenate_train_sets(data_dir / "commonsense"))
    except (OSError, ValueError) as error:
        raise DriverError(str(error)) from error
    for name in EVAL_FILES:
        if not (data_dir / name).is_file():
            raise DriverError(f"{data_dir / name} not found (needed by evaluate)")
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / name, target / name)
    tests = sorted((data_dir / "commonsense").glob("*/test.json"))
    if not tests:
        raise DriverError(f"no commonsense/<set>/test.json under {data_dir}")
    for test in tests:
        (target / "commonsense" / test.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(test, target / "commonsense" / test.parent.name / "test.json")
    return target


# --------------------------------------------------------------------------- processes


def ensure_base(model: str, out: Path) -> Path:
    """The GGUF converted once to OUT/base (a directory model is used as is)."""
    from milora.gguf import convert_gguf, is_gguf_path

    if not is_gguf_path(model):
        return Path(model)
    base = out / "base"
    if not (base / "config.json").is_file():
        print(f"converting {model} -> {base}", flush=True)
        convert_gguf(model, base)
    return base


def run_parallel(jobs: dict[str, list[str]], logs: Path, parallel: int, deadline_s: float | None) -> dict[str, int]:
    """Run each job (name -> argv) as its own process, `parallel` at a time, output to logs/<name>.log.

    Returns name -> exit code; jobs still running at the deadline are stopped (code None), jobs never
    started are left out."""
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, min(parallel, len(jobs))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    pending, running, codes = list(jobs), {}, {}
    started = time.time()
    try:
        _run_loop(jobs, logs, parallel, deadline_s, env, pending, running, codes, started)
    finally:  # Ctrl-C or a crash of the driver: stop the jobs it started (they run in their own sessions)
        for process, log, _ in running.values():
            if process.poll() is None:
                os.killpg(process.pid, 15)
                process.wait()
            log.close()
    return codes


def _run_loop(jobs, logs, parallel, deadline_s, env, pending, running, codes, started) -> None:
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            log = open(logs / f"{name}.log", "a")  # noqa: SIM115 (closed when the process ends)
            running[name] = (subprocess.Popen(jobs[name], stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True), log, time.time())
            print(f"started {name}", flush=True)
        for name, (process, log, began) in list(running.items()):
            if process.poll() is not None:
                log.close()
                codes[name] = process.returncode
                del running[name]
                state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see {log.name})"
                print(f"{name}: {state} after {time.time() - began:.0f} s", flush=True)
        if deadline_s is not None and time.time() - started > deadline_s and running:
            for name, (process, log, _) in running.items():
                os.killpg(process.pid, 15)
                process.wait()
                log.close()
                codes[name] = None
                print(f"{name}: stopped at the deadline; rerun to continue it", flush=True)
            running.clear()
            pending.clear()
        time.sleep(1)


def run_job(name: str, out: Path, base: Path, smoke: bool, extra: list[str]) -> list[str]:
    """The worker command line that trains one run (resuming from its last checkpoint if there is one)."""
    task, method, seed = name.split("_")
    run_dir = out / "runs" / name
    recipe_method, base_args = BASE_VARIANTS.get(method, (method, []))
    argv = [str(REPO / "recipes" / f"smollm2_{task}_{recipe_method}.yaml"), "--seed", seed.removeprefix("s"),
            "--output_dir", str(run_dir), "--model_name_or_path", str(base),
            "--dataset_name", str(out / "data" / TRAIN_FILES[task]), *base_args]
    if any(run_dir.glob("checkpoint-*")):
        argv += ["--resume_from_checkpoint", "true"]
    argv += (SMOKE_TRAIN if smoke else []) + extra
    return [sys.executable, str(WORKER), "train", "--stats", str(out / "train" / f"{name}.json"), "--", *argv]


def parse_runs(text: str) -> list[str]:
    named = {"all": ALL_RUNS, "quantized": QUANTIZED_RUNS, "fp8": FP8_RUNS}
    names = [name for n in text.split(",") if n.strip() for name in named.get(n.strip(), [n.strip()])]
    unknown = [n for n in names if n not in ALL_RUNS and not _valid_run(n)]
    if unknown:
        raise DriverError(f"unknown run(s) {', '.join(unknown)}: use TASK_METHOD_sSEED (e.g. {ALL_RUNS[0]}) or all")
    return names


def _valid_run(name: str) -> bool:
    parts = name.split("_")
    return (len(parts) == 3 and parts[0] in TASKS and parts[1] in (*METHODS, *BASE_VARIANTS)
            and parts[2].startswith("s")
            and parts[2][1:].isdigit())


def mode_name(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def held_mode(out: Path) -> str | None:
    """The mode whose results OUT holds: the one recorded in OUT/MODE_FILE or, in a directory written before
    that file existed, `smoke` if any run's recorded sft arguments hold the smoke settings, `full` if it has
    runs without them; None for a directory with neither."""
    if (out / MODE_FILE).is_file():
        mode = read_json(out / MODE_FILE).get("mode")
        if mode not in ("smoke", "full"):
            raise DriverError(f"{out / MODE_FILE}: mode {mode!r} is neither smoke nor full; fix or delete the file")
        return mode
    argvs = [read_json(path).get("argv", []) for path in sorted((out / "train").glob("*.json"))]
    if not argvs:
        return None
    width = len(SMOKE_TRAIN)
    smoke = any(argv[i:i + width] == SMOKE_TRAIN for argv in argvs for i in range(len(argv) - width + 1))
    return mode_name(smoke)


def claim_mode(out: Path, smoke: bool, flag: str) -> None:
    """Record this run's mode in OUT, or refuse an OUT that holds the other mode's results (its finished jobs
    would count as done, its checkpoints would be resumed)."""
    from milora.io import write_json

    wanted, held = mode_name(smoke), held_mode(out)
    if held is not None and held != wanted:
        raise DriverError(
            f"{out} holds the results of a {held} run (see {out / MODE_FILE}); a {wanted} run there would count "
            f"them as its own: pass another {flag} for it (e.g. {out}_{wanted}, after `prepare --out` there)"
        )
    if held is None or not (out / MODE_FILE).is_file():
        write_json(out / MODE_FILE, {"mode": wanted})


def is_done(stats_file: Path) -> bool:
    return stats_file.is_file() and read_json(stats_file).get("status") == "done"


def train(args) -> int:
    out = Path(args.out)
    runs = parse_runs(args.runs)
    for task in {name.split("_")[0] for name in runs}:
        if not (out / "data" / TRAIN_FILES[task]).is_file():
            raise DriverError(f"{out / 'data' / TRAIN_FILES[task]} not found: run `prepare --out {out}` first")
    claim_mode(out, args.smoke, "--out")
    base = ensure_base(args.model, out)
    todo = {name: run_job(name, out, base, args.smoke, args.sft_args) for name in runs
            if not is_done(out / "train" / f"{name}.json")}
    print(f"training {len(todo)} run(s) ({len(runs) - len(todo)} already done), {args.parallel} at a time", flush=True)
    codes = run_parallel(todo, out / "logs", args.parallel, args.deadline_s)
    return 0 if all(code == 0 for code in codes.values()) and len(codes) == len(todo) else 1


def trained_models(out: Path) -> dict[str, Path]:
    """Model name -> merged checkpoint of every finished run."""
    found = {}
    for stats_file in sorted((out / "train").glob("*.json")):
        merged = out / "runs" / stats_file.stem / "merged"
        if is_done(stats_file) and (merged / "config.json").is_file():
            found[stats_file.stem] = merged
    return found


def evaluated_parts(model: str) -> str:
    """What the tables show of a model: the base on everything, a run on its own task and the forgetting loss."""
    task = model.split("_")[0]
    return "gsm8k,commonsense,forgetting" if model == "base" else f"{TASK_PARTS[task]},forgetting"


def evaluate(args) -> int:
    out = Path(args.runs_dir)
    data_dir = Path(args.data_dir)
    if not (data_dir / "gsm8k_test.jsonl").is_file():
        raise DriverError(f"{data_dir}/gsm8k_test.jsonl not found: --data_dir must be laid out as "
                          "eval_harness/data_paths.py describes (prepare writes one in OUT/data)")
    claim_mode(out, args.smoke, "--runs_dir")
    models = {"base": ensure_base(args.model, out), **trained_models(out)}
    jobs = {}
    for name, path in models.items():
        command = [sys.executable, str(WORKER), "evaluate", "--model", str(path), "--data_dir", str(data_dir),
                   "--out", str(out / "eval" / f"{name}.json"), "--batch_size", str(args.batch_size),
                   "--parts", evaluated_parts(name)]
        jobs[f"eval_{name}"] = command + (SMOKE_EVAL if args.smoke else [])
    print(f"evaluating {len(jobs)} model(s), {args.parallel} at a time", flush=True)
    codes = run_parallel(jobs, out / "logs", args.parallel, args.deadline_s)
    return 0 if all(code == 0 for code in codes.values()) and len(codes) == len(jobs) else 1


def table(args) -> int:
    out = Path(args.runs_dir)
    train_stats = {p.stem: read_json(p) for p in sorted((out / "train").glob("*.json"))}
    evals = {p.stem: read_json(p) for p in sorted((out / "eval").glob("*.json"))}
    if not evals:
        raise DriverError(f"no results in {out / 'eval'}: run evaluate first")
    text = markdown_tables(train_stats, evals)
    if held_mode(out) == "smoke":
        text = f"{SMOKE_NOTE}\n\n{text}"
    print(text)
    if args.write:
        from milora.io import atomic_write_text

        atomic_write_text(args.write, text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="training files + a copy of the evaluation data in OUT/data")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", default="outputs/miniature")
    t = commands.add_parser("train", help="train the runs side by side")
    t.add_argument("--model", required=True, help="the .gguf file (or a converted model directory)")
    t.add_argument("--out", default="outputs/miniature")
    t.add_argument("--runs", default="all", help=f"comma-separated names, all ({', '.join(ALL_RUNS)}) or quantized "
                   f"({', '.join(QUANTIZED_RUNS)}: 4-bit bases) or fp8 ({', '.join(FP8_RUNS)}: FP8 frozen "
                   "bases)")
    t.add_argument("--parallel", type=int, default=len(ALL_RUNS))
    t.add_argument("--sft_args", nargs=argparse.REMAINDER, default=[], help="more recipe overrides, last")
    e = commands.add_parser("evaluate", help="score the base model and every trained run")
    e.add_argument("--model", required=True, help="the .gguf file the runs started from (the base row)")
    e.add_argument("--runs_dir", default="outputs/miniature")
    e.add_argument("--data_dir", required=True)
    e.add_argument("--parallel", type=int, default=len(ALL_RUNS) + 1)
    e.add_argument("--batch_size", type=int, default=256, help="GSM8K generation batch (commonsense: 2x)")
    for sub in (t, e):
        sub.add_argument("--deadline_s", type=float, default=None, help="stop what still runs after this long")
        sub.add_argument("--smoke", action="store_true", help="a few steps, 8 rows per set (CPU check)")
    s = commands.add_parser("table", help="Markdown tables of the results")
    s.add_argument("--runs_dir", default="outputs/miniature")
    s.add_argument("--write", default=None, help="also write the Markdown to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            print(f"prepare: wrote {prepare(Path(args.data_dir), Path(args.out))}")
            return 0
        return {"train": train, "evaluate": evaluate, "table": table}[args.command](args)
    except (DriverError, ValueError) as error:  # ValueError: milora's own input errors (GGUFError, ...)
        print(f"miniature_tables: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
