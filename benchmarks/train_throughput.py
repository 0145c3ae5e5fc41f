"""Training throughput, MFU and peak memory: plain TRL + PEFT defaults vs our LoRA/MiLoRA recipes and each speed lever.

A LLaMA-2-7B-shaped model (random bf16 weights from LlamaConfig, no download), r = 64 on q,k,v,up,down,
MetaMathQA-like rows (benchmarks/throughput_batches.py: 100-600 tokens, mean ~250, loss on the response).
The pre-tokenized batches are built ONCE and saved (OUT/batches.json); every variant runs in its own process,
reads them and trains on the same rows in the same order (checked: each result carries a digest of the rows
its collator saw). Each process trains `warmup + steps` optimizer steps through TRL's `SFTTrainer`; the first
`warmup` are not timed. The variants run in alternating order (A B C ... A B C ...) for `--repeats` rounds.

Reported per variant (median over repeats): median optimizer-step time (wall clock between step ends, device
synchronised: data, forward, backward, optimizer); tokens/s = real tokens of the measured steps / their
total time; MFU (model FLOPs, benchmarks/mfu.py: 4*N_frozen*T + 6*N_lora*T + causal attention, recomputation
not counted) against 989 TFLOP/s; peak memory during training (torch.cuda.max_memory_allocated).

    python benchmarks/train_throughput.py                        # everything, the recorded configuration (one GPU)
    python benchmarks/train_throughput.py --smoke                # tiny model on CPU, seconds: checks the plumbing
    python benchmarks/train_throughput.py --table OUT            # the markdown table of finished runs in OUT
    python benchmarks/train_throughput.py --list                 # the variants

A rerun with the same --out skips the (variant, repeat) pairs already done, so a long run can be split.
The variants read the recipes' settings from recipes/llama2-7b_math_{lora,milora}.yaml and build the
trainer directly (SFTTrainer + milora.apply_milora on pre-tokenized rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from milora.attention import VARLEN_ATTENTION  # noqa: E402
from milora.io import read_json, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class Variant:
    """One training configuration. `None` fields keep the base's setting (TRL defaults or the recipe YAML)."""

    method: str  # lora | milora
    base: str  # trl_defaults | recipe
    description: str
    gradient_checkpointing: bool | None = None
    attention: str | None = None
    liger: bool | None = None
    grouping: str = "fixed"  # fixed (batch_size rows) | budget (token_budget tokens)
    micro_batch: int | None = None  # rows per forward; None: the base's (recipe: per_device_train_batch_size)
    lora_dropout: float | None = None
    compile: bool = False


FAST = dict(gradient_checkpointing=False, attention=VARLEN_ATTENTION, liger=True, grouping="budget", micro_batch=0)
VARIANTS = {  # in run order: the comparisons that matter most first, in case a time budget cuts a round
    "trl_defaults": Variant("lora", "trl_defaults", "SFTConfig defaults + PEFT LoraConfig (padded, GC on, sdpa)"),
    "lora_fast": Variant("lora", "recipe", "LoRA, all levers: GC off, varlen, Liger, token budget, 1 micro-batch",
                         **FAST),
    "milora_fast": Variant("milora", "recipe", "MiLoRA, all levers", **FAST),
    "lora_recipe": Variant("lora", "recipe", "LoRA recipe as written (recipes/llama2-7b_math_lora.yaml)"),
    "milora_recipe": Variant("milora", "recipe", "MiLoRA recipe as written (recipes/llama2-7b_math_milora.yaml)"),
    "lora_lowmem": Variant("lora", "recipe", "LoRA, all levers but GC on (low memory)",
                           **{**FAST, "gradient_checkpointing": True}),
    "lora_fast_sdpa": Variant("lora", "recipe", "all levers but sdpa instead of varlen",
                              **{**FAST, "attention": "sdpa"}),
    "lora_fast_noliger": Variant("lora", "recipe", "all levers but no Liger", **{**FAST, "liger": False}),
    "lora_fast_fixed": Variant("lora", "recipe", "all levers but fixed 16-row batches",
                               **{**FAST, "grouping": "fixed"}),
    # not in the default run:
    "lora_fast_dropout0": Variant("lora", "recipe", "all levers, lora_dropout 0 (the most a fused dropout could save)",
                                  **{**FAST, "lora_dropout": 0.0}),
    "lora_fast_compile": Variant("lora", "recipe", "all levers + torch_compile", **{**FAST, "compile": True}),
}
DEFAULT_VARIANTS = list(VARIANTS)[:9]


def recipe_settings(method: str) -> dict:
    """The training settings of recipes/llama2-7b_math_<method>.yaml (the file the recipe runs)."""
    import yaml

    return yaml.safe_load((ROOT / "recipes" / f"llama2-7b_math_{method}.yaml").read_text())


def model_config(spec: dict):
    from transformers import LlamaConfig

    if spec["model"] == "tiny":
        from milora.tiny import tiny_config

        return tiny_config("llama")
    overrides = {"num_hidden_layers": spec["layers"]} if spec.get("layers") else {}
    return LlamaConfig(**{**LLAMA2_7B, **overrides}, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def resolved_settings(variant: Variant, batch_size: int, r: int) -> dict:
    """What the variant runs with, after its base's defaults and what this machine supports."""
    on_gpu = torch.cuda.is_available()
    recipe = recipe_settings(variant.method) if variant.base == "recipe" else {}
    if variant.base == "recipe":
        base = dict(gradient_checkpointing=recipe["gradient_checkpointing"], attention=recipe["attn_implementation"],
                    liger=recipe["use_liger_kernel"], micro_batch=recipe["per_device_train_batch_size"],
                    lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                    padding_free=recipe["padding_free"], optim=recipe["optim"], learning_rate=recipe["learning_rate"])
    else:
        base = dict(gradient_checkpointing=True, attention="sdpa", liger=False, micro_batch=batch_size,
                    lora_alpha=2 * r, lora_dropout=0.05, padding_free=False, optim=None, learning_rate=None)
    chosen = {key: getattr(variant, key) for key in ("gradient_checkpointing", "attention", "liger", "micro_batch",
                                                     "lora_dropout")}
    settings = {**base, **{k: v for k, v in chosen.items() if v is not None}}
    settings["liger"] = bool(settings["liger"]) and on_gpu and importlib.util.find_spec("liger_kernel") is not None
    if not settings["micro_batch"] or settings["micro_batch"] >= batch_size or variant.grouping == "budget":
        settings["micro_batch"] = None  # the whole batch in one forward
    return {**settings, "method": variant.method, "base": variant.base, "grouping": variant.grouping,
            "compile": variant.compile, "bf16": on_gpu}


def micro_batches(groups: list[list[int]], micro: int | None) -> tuple[list[list[int]], int]:
    """The dataloader's batches and the gradient accumulation that puts one saved batch in each optimizer step."""
    if micro is None:
        return groups, 1
    if any(len(batch) % micro for batch in groups):
        raise ValueError(f"micro-batch {micro} does not divide the batches")
    return [batch[i:i + micro] for batch in groups for i in range(0, len(batch), micro)], len(groups[0]) // micro


def build_model(spec: dict, attention: str):
    from init_speed import random_llama

    from milora.attention import register_varlen_attention

    register_varlen_attention()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(model_config(spec), torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.set_attn_implementation(attention)
    return model


class RecordingCollator:
    """The trainer's collator, remembering every row it batched, in order."""

    def __init__(self, collate):
        self.collate, self.rows = collate, []

    def __call__(self, examples):
        self.rows.extend(list(example["input_ids"]) for example in examples)
        return self.collate(examples)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_trainer(model, training_args, dataset, tokenizer, loader_batches, peft_config, timer):
    from torch.utils.data import DataLoader
    from trl import SFTTrainer

    class SavedBatchesTrainer(SFTTrainer):
        """SFTTrainer whose training batches are exactly `loader_batches` (row indices), in order."""

        def get_train_dataloader(self):
            loader = DataLoader(self.train_dataset, batch_sampler=loader_batches, collate_fn=self.data_collator)
            return self.accelerator.prepare(loader)

    trainer = SavedBatchesTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[timer])
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Device-synchronised time at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())

    return StepTimer()


def run_worker(variant_name: str, data: dict, output_dir: str) -> dict:
    """Train one variant on the saved batches; its measurements."""
    from datasets import Dataset
    from mfu import attention_width, linear_weight_counts, mfu, step_flops
    from peft import LoraConfig
    from throughput_batches import batch_lengths, rows_digest
    from trl import SFTConfig

    from milora import apply_milora
    from milora.attention import kernel_available
    from milora.tiny import tiny_tokenizer

    spec, variant = data["spec"], VARIANTS[variant_name]
    settings = resolved_settings(variant, spec["batch_size"], spec["r"])
    groups = data["groupings"][variant.grouping]
    loader_batches, accumulation = micro_batches(groups, settings["micro_batch"])
    model = build_model(spec, settings["attention"])
    peft_config = None
    if variant.base == "trl_defaults":
        peft_config = LoraConfig(r=spec["r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                                 target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        model = apply_milora(model, TARGETS, spec["r"], mode=variant.method, lora_alpha=settings["lora_alpha"],
                             lora_dropout=settings["lora_dropout"], show_progress=False)
    recipe_args = {k: settings[k] for k in ("optim", "learning_rate") if settings[k] is not None}
    if variant.base == "recipe":
        recipe_args |= dict(padding_free=settings["padding_free"], max_length=None,
                            gradient_checkpointing=settings["gradient_checkpointing"],
                            use_liger_kernel=settings["liger"], torch_compile=variant.compile)
    training_args = SFTConfig(
        output_dir=output_dir, max_steps=len(groups), per_device_train_batch_size=len(loader_batches[0]),
        gradient_accumulation_steps=accumulation, report_to="none", save_strategy="no", logging_steps=10**6,
        bf16=settings["bf16"], seed=42, **recipe_args,
    )
    rows = data["rows"]
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    timer = step_timer()
    trainer = make_trainer(model, training_args, dataset, tiny_tokenizer(), loader_batches, peft_config, timer)
    frozen, trainable = linear_weight_counts(trainer.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    training_loss = trainer.train().training_loss

    expected = [rows[i]["input_ids"] for batch in groups for i in batch]
    if rows_digest(trainer.data_collator.rows) != rows_digest(expected):
        raise RuntimeError(f"{variant_name}: the trainer did not see the saved batches in their order")
    warmup = spec["warmup"]
    step_times = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:], strict=True)][warmup:]
    lengths = batch_lengths(data, variant.grouping)[warmup:]
    if len(step_times) != len(lengths):
        raise RuntimeError(f"{variant_name}: timed {len(step_times)} steps, expected {len(lengths)}")
    config = model_config(spec)
    n_layers, d_attn = attention_width(config)
    flops = sum(step_flops(batch, frozen, trainable, n_layers, d_attn) for batch in lengths)
    probe = torch.empty(1, 1, 1, d_attn // config.num_attention_heads, dtype=next(model.parameters()).dtype,
                        device=next(model.parameters()).device)  # (batch, heads, seq, head_dim) of this model
    return {
        "variant": variant_name, "description": variant.description, "settings": settings,
        "varlen_kernel": settings["attention"] == VARLEN_ATTENTION and kernel_available(probe),
        "median_step_s": statistics.median(step_times), "step_times_s": step_times,
        "tokens": sum(map(sum, lengths)), "tokens_per_s": sum(map(sum, lengths)) / sum(step_times),
        "median_tokens_per_step": statistics.median(map(sum, lengths)),
        "model_tflops_per_step": flops / len(lengths) / 1e12, "mfu": mfu(flops, sum(step_times)),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan"),
        "weights_gib": weights_gib, "frozen_linear_weights": frozen, "trainable_linear_weights": trainable,
        "training_loss": training_loss, "batches_digest": rows_digest(expected),
    }


def environment() -> dict:
    import peft
    import transformers
    import trl

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__}


def worker_main(args):
    data = read_json(args.data)
    result = run_worker(args.worker, data, str(Path(args.json).with_suffix("")) + "_trainer")
    write_json(args.json, {**environment(), "spec": data["spec"], "repeat": args.repeat, **result})


def spec_from_args(args) -> dict:
    if args.smoke:
        return {"model": "tiny", "r": 8, "warmup": 1, "steps": 2, "batch_size": 4, "token_budget": 160, "seed": 0}
    return {"model": "llama2-7b", "layers": args.layers, "r": args.r, "warmup": args.warmup, "steps": args.steps,
            "batch_size": args.batch_size, "token_budget": args.token_budget, "seed": 0}


def prepare_data(out: Path, spec: dict) -> Path:
    """OUT/batches.json, built once; a different spec in an existing OUT is refused."""
    from throughput_batches import build_batches

    path = out / "batches.json"
    if path.exists():
        saved = read_json(path)["spec"]
        if any(saved.get(k) != v for k, v in spec.items()):
            raise ValueError(f"{path} was built for another configuration; use a new --out")
        return path
    write_json(path, build_batches(spec, model_config(spec).vocab_size))
    return path


def orchestrate(args) -> list[Path]:
    """Every (repeat, variant) in alternating order, each in a fresh process; the result files."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out, spec_from_args(args))
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    start, results = time.perf_counter(), []
    for repeat in range(args.repeats):
        for name in variants:
            path = out / f"{name}__r{repeat}.json"
            results.append(path)
            if path.exists():
                continue
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                print(f"time budget spent: {name} repeat {repeat} not run (rerun with the same --out to continue)")
                continue
            log = out / f"{name}__r{repeat}.log"
            path.with_suffix(".failed.json").unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--json", str(path),
                   "--repeat", str(repeat)]
            began = time.perf_counter()
            with open(log, "w") as handle:
                rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
            tail = log.read_text().strip().splitlines()[-1:] or [""]
            print(f"{name} r{repeat}: rc={rc} in {time.perf_counter() - began:.0f} s" + (f"  {tail[0]}" if rc else ""))
            if rc:
                write_json(path.with_suffix(".failed.json"), {"variant": name, "repeat": repeat, "error": tail[0]})
    failed = [p.with_suffix(".failed.json") for p in results]
    return [p for p in results + failed if p.exists()]


def main(argv=None):
    from throughput_table import markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/train_throughput", help="batches, one JSON + log per run, table.md")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16, help="rows per step of the fixed grouping")
    parser.add_argument("--token_budget", type=int, default=4096, help="tokens per step of the budget grouping")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default 32)")
    parser.add_argument("--time_budget_s", type=float, default=None, help="start no new run after this long")
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU, 2 steps: checks the plumbing")
    parser.add_argument("--table", default=None, help="print the table of the runs in this --out directory")
    parser.add_argument("--list", action="store_true", help="list the variants")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:<20}{'*' if name in DEFAULT_VARIANTS else ' '} {variant.description}")
        return
    if args.worker:
        return worker_main(args)
    if args.table:
        print(markdown_table(sorted(Path(args.table).glob("*__r*.json")), order=list(VARIANTS)))
        return
    try:
        files = orchestrate(args)
    except ValueError as error:
        parser.error(str(error))
    table = markdown_table(files, order=list(VARIANTS))
    (Path(args.out) / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
