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
    python benchmarks/train_throughput.py --variants quantized   # 4-bit bases (QLoRA, QMiLoRA) beside bf16
    python benchmarks/train_throughput.py --variants fp8         # FP8 frozen bases beside bf16 (LoRA, MiLoRA)

Each result also carries the GPU's SM clock, power and temperature over the timed steps (nvidia-smi, see
benchmarks/step_diagnostics.py); `--profile` adds one run per variant with two steps under torch.profiler.
Separate processes on a power-capped GPU differ by a few percent from run to run; benchmarks/step_ratio.py
compares MiLoRA/PiSSA with LoRA inside one process, step by step.

A rerun with the same --out skips the (variant, repeat) pairs already done, so a long run can be split.
The variants read the recipes' settings from recipes/llama2-7b_math_{lora,milora}.yaml and build the
trainer directly (SFTTrainer + milora.apply_milora on pre-tokenized rows).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from throughput_variants import (  # noqa: E402, F401 (the variants' names are part of this script's interface)
    DEFAULT_VARIANTS,
    FP8_VARIANTS,
    QUANTIZED_VARIANTS,
    TARGETS,
    VARIANTS,
    Variant,
    benchmark_spec,
    build_model,
    micro_batches,
    model_config,
    recipe_settings,
    resolved_settings,
)

from milora.attention import VARLEN_ATTENTION  # noqa: E402, F401 (tests read it from here)
from milora.io import read_json, write_json  # noqa: E402


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


def make_trainer(model, training_args, dataset, tokenizer, loader_batches, peft_config, callbacks, sync_free=False):
    from torch.utils.data import DataLoader
    from trl import SFTTrainer

    from milora.sft.trainer import SFTTrainer as SyncFreeSFTTrainer

    class SavedBatchesTrainer(SyncFreeSFTTrainer if sync_free else SFTTrainer):
        """SFTTrainer whose training batches are exactly `loader_batches` (row indices), in order."""

        def get_train_dataloader(self):
            pinned = self.args.dataloader_pin_memory and self.args.accelerator_config.non_blocking
            loader = DataLoader(self.train_dataset, batch_sampler=loader_batches, collate_fn=self.data_collator,
                                pin_memory=pinned)
            return self.accelerator.prepare(loader)

    trainer = SavedBatchesTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=callbacks)
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    return trainer


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times of the start of training and of the end of every optimizer step (`ends`, seconds, host clock).

        On a GPU each step's end is an event recorded on the stream and read after training, so that timing adds
        no wait to the step: a synchronisation at every step would hide whether the step itself waits for the GPU.
        The events' times are the GPU's, mapped onto the host clock at the synchronised start."""

        def __init__(self):
            self.ends, self.events = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            self.ends = [time.perf_counter()]
            self.events = []
            if torch.cuda.is_available():
                self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[0].record()

        def on_step_end(self, args, state, control, **kwargs):
            if self.events:
                self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[-1].record()
            else:
                self.ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            if self.events:
                sync()
                start = self.ends[0]
                self.ends = [start + self.events[0].elapsed_time(event) / 1000 for event in self.events]
                self.events = []

    return StepTimer()


def adapted_model(variant: Variant, spec: dict, settings: dict, cache_dir: str | None):
    """The model with the variant's adapters (None for TRL's own PEFT wrapping) and the PEFT config TRL needs."""
    from peft import LoraConfig

    from milora import apply_milora
    from milora.autocast import skip_input_casts_under_autocast

    model = build_model(spec, settings["attention"])
    if variant.base == "trl_defaults":
        return model, LoraConfig(r=spec["r"], lora_alpha=settings["lora_alpha"], task_type="CAUSAL_LM",
                                 lora_dropout=settings["lora_dropout"], target_modules=TARGETS)
    if variant.init_cache and cache_dir is None:
        raise ValueError(f"{variant.method}: init_cache needs a cache directory")
    quantization = None
    if variant.load_in_4bit:
        from milora.quantization import FourBitSettings

        quantization = FourBitSettings("nf4", compute_dtype=next(model.parameters()).dtype)
    model = apply_milora(model, TARGETS, spec["r"], method=variant.method, lora_alpha=settings["lora_alpha"],
                         lora_dropout=settings["lora_dropout"], show_progress=False,
                         cache_dir=cache_dir if variant.init_cache else None, quantization=quantization)
    if quantization is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bf16 weights the 4-bit layers replaced
    if variant.peft_input_cast:
        skip_input_casts_under_autocast(model, enabled=False)
    if variant.fp8_base:  # as recipes/sft.py: the frozen layers are converted once the adapters are in place
        from milora.fp8 import convert_frozen_linears_to_fp8

        convert_frozen_linears_to_fp8(model)
    if variant.compile_layers:
        from milora.regional_compile import compile_repeated_blocks

        compile_repeated_blocks(model, **({"mode": variant.compile_mode} if variant.compile_mode else {}))
    return model, None


def run_worker(variant_name: str, data: dict, output_dir: str, cache_dir: str | None = None,
               profile_table: Path | None = None) -> dict:
    """Train one variant on the saved batches; its measurements. With `profile_table`, the first two timed
    steps run under torch.profiler (their kernel table is written there) and the timings are not comparable."""
    from datasets import Dataset
    from mfu import attention_width, linear_weight_counts, mfu, step_flops
    from step_diagnostics import GpuSampler, profiled_steps
    from throughput_batches import batch_lengths, rows_digest
    from trl import SFTConfig

    from milora.attention import kernel_available
    from milora.fp8 import Float8FrozenLinear
    from milora.tiny import tiny_tokenizer

    spec, variant = data["spec"], VARIANTS[variant_name]
    settings = resolved_settings(variant, spec["batch_size"], spec["r"])
    groups = data["groupings"][variant.grouping]
    loader_batches, accumulation = micro_batches(groups, settings["micro_batch"])
    model, peft_config = adapted_model(variant, spec, settings, cache_dir)
    recipe_args = {k: settings[k] for k in ("optim", "learning_rate") if settings[k] is not None}
    if variant.base == "recipe":
        recipe_args |= dict(padding_free=settings["padding_free"], max_length=None,
                            gradient_checkpointing=settings["gradient_checkpointing"],
                            use_liger_kernel=settings["liger"], torch_compile=variant.compile)
        if settings["liger"] and variant.liger_ops is not None:
            # SFTTrainer fuses the LM head with Liger's cross-entropy itself whenever use_liger_kernel is on
            recipe_args["liger_kernel_config"] = {op: op in variant.liger_ops for op in ("rope", "swiglu", "rms_norm")}
        if variant.pad_to_budget:
            if variant.grouping != "budget":
                raise ValueError(f"{variant_name}: pad_to_budget needs the budget grouping")
            recipe_args["pad_to_multiple_of"] = spec["token_budget"]
        if variant.sync_free:  # as MiloraSFTConfig sets them for recipes/sft.py
            recipe_args |= dict(logging_nan_inf_filter=False, accelerator_config={"non_blocking": True},
                                dataloader_pin_memory=torch.cuda.is_available())
    training_args = SFTConfig(
        output_dir=output_dir, max_steps=len(groups), per_device_train_batch_size=len(loader_batches[0]),
        gradient_accumulation_steps=accumulation, report_to="none", save_strategy="no", logging_steps=10**6,
        bf16=settings["bf16"], seed=42, **recipe_args,
    )
    rows = data["rows"]
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    timer = step_timer()
    callbacks = [timer]
    if variant.compile_mode == "reduce-overhead":  # as recipes/sft.py does for its CUDA graphs
        from milora.sft.model import CudaGraphStepMarker

        callbacks.append(CudaGraphStepMarker())
    if profile_table is not None:
        callbacks.append(profiled_steps(spec["warmup"], 2, profile_table))
    trainer = make_trainer(model, training_args, dataset, tiny_tokenizer(), loader_batches, peft_config, callbacks,
                           sync_free=variant.sync_free)
    if variant.load_in_4bit:  # as recipes/sft.py: float32 adapters, not the bf16 ones SFTTrainer makes of them
        from milora.quantization import adapters_to_float32

        adapters_to_float32(trainer.model)
    frozen, trainable = linear_weight_counts(trainer.model)
    fp8_layers = sum(isinstance(module, Float8FrozenLinear) for module in trainer.model.modules())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    sampler = GpuSampler() if torch.cuda.is_available() else None
    try:
        training_loss = trainer.train().training_loss
    finally:
        if sampler is not None:
            sampler.stop()

    expected = [rows[i]["input_ids"] for batch in groups for i in batch]
    if rows_digest(trainer.data_collator.rows) != rows_digest(expected):
        raise RuntimeError(f"{variant_name}: the trainer did not see the saved batches in their order")
    warmup = spec["warmup"]
    step_times = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:], strict=True)][warmup:]
    gpu = {}
    if sampler is not None:  # the timed steps as a whole, and each step's median SM clock
        gpu = sampler.window(timer.ends[warmup], timer.ends[-1])
        gpu["step_sm_clock_mhz"] = [sampler.window(a, b).get("sm_clock_mhz")
                                    for a, b in zip(timer.ends[warmup:-1], timer.ends[warmup + 1:], strict=True)]
    lengths = batch_lengths(data, variant.grouping)[warmup:]
    if len(step_times) != len(lengths):
        raise RuntimeError(f"{variant_name}: timed {len(step_times)} steps, expected {len(lengths)}")
    config = model.config
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
        "fp8_layers": fp8_layers,
        "training_loss": training_loss, "batches_digest": rows_digest(expected), "gpu": gpu,
        "init_cache": variant.init_cache,
        **({"profile": callbacks[-1].summary, "profiled": True} if profile_table is not None else {}),
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
    cache_dir = str(Path(args.data).parent / "init_cache")
    if args.prepare_cache:  # compute and store the factors the *_cached variants load
        variant = VARIANTS[args.worker]
        adapted_model(variant, data["spec"], resolved_settings(variant, data["spec"]["batch_size"], data["spec"]["r"]),
                      cache_dir)
        return
    profile = Path(args.json).with_suffix(".txt") if args.profile else None
    result = run_worker(args.worker, data, str(Path(args.json).with_suffix("")) + "_trainer", cache_dir, profile)
    write_json(args.json, {**environment(), "spec": data["spec"], "repeat": args.repeat, **result})


def spec_from_args(args) -> dict:
    return benchmark_spec(args.smoke, r=args.r, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size,
                          token_budget=args.token_budget, layers=args.layers)


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
    named = {"quantized": QUANTIZED_VARIANTS, "fp8": FP8_VARIANTS, "default": DEFAULT_VARIANTS}
    variants = [name for v in args.variants.split(",") if v for name in named.get(v, [v])]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; --list shows them")
    start, results = time.perf_counter(), []

    def worker(name: str, path: Path, *extra: str) -> tuple[int, str]:
        log = path.with_suffix(".log")
        cmd = [sys.executable, __file__, "--worker", name, "--data", str(data), "--json", str(path), *extra]
        began = time.perf_counter()
        with open(log, "w") as handle:
            rc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        print(f"{path.stem}: rc={rc} in {time.perf_counter() - began:.0f} s" + (f"  {tail[0]}" if rc else ""))
        return rc, tail[0]

    for name in variants:  # the *_cached variants load factors an earlier process computed
        if VARIANTS[name].init_cache and not (out / "init_cache" / f"{VARIANTS[name].method}.done").exists():
            if worker(name, out / f"{name}__prepare_cache.json", "--prepare_cache")[0] == 0:
                (out / "init_cache" / f"{VARIANTS[name].method}.done").touch()
    for repeat in range(args.repeats):
        for name in variants:
            path = out / f"{name}__r{repeat}.json"
            results.append(path)
            if path.exists():
                continue
            if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                print(f"time budget spent: {name} repeat {repeat} not run (rerun with the same --out to continue)")
                continue
            path.with_suffix(".failed.json").unlink(missing_ok=True)
            rc, tail = worker(name, path, "--repeat", str(repeat))
            if rc:
                write_json(path.with_suffix(".failed.json"), {"variant": name, "repeat": repeat, "error": tail})
    for name in variants if args.profile else []:  # after the timed rounds: the profiler slows the steps it sees
        path = out / f"{name}__profile.json"
        if not path.exists() and not (args.time_budget_s and time.perf_counter() - start > args.time_budget_s):
            worker(name, path, "--profile")
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
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rounds, one more run per variant with two steps under torch.profiler "
                             "(OUT/<variant>__profile.txt: the kernel table; .json: kernel vs wall time per step)")
    parser.add_argument("--table", default=None, help="print the table of the runs in this --out directory")
    parser.add_argument("--list", action="store_true", help="list the variants")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--prepare_cache", action="store_true", help=argparse.SUPPRESS)
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
