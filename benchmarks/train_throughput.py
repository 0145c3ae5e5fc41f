"""Training throughput and peak memory: plain TRL + PEFT LoRA defaults vs our LoRA and MiLoRA recipes.

A LLaMA-2-7B-shaped model (random weights, bf16), r=64 on q,k,v,up,down, sequences of realistic,
variable length (64-512 tokens, MetaMathQA-like prompt/response rows), the same data and batch size for
every variant. Each variant trains `--steps` optimizer steps after `--warmup` untimed ones through TRL's
`SFTTrainer`; tokens/s counts real (non-padding) tokens.

Variants:
  (a) plain TRL + PEFT: `SFTConfig` defaults (padded batches, gradient checkpointing) + `peft_config`
  (b) our LoRA recipe: recipes/llama2-7b_math_lora.yaml settings (padding-free batches, Liger's fused
      RMSNorm/SwiGLU/RoPE/cross-entropy kernels, gradient checkpointing)
  (c) our MiLoRA recipe: recipes/llama2-7b_math_milora.yaml settings (MiLoRA init runs before timing)
  (b-noliger), (c-noliger): the recipes without the Liger kernels, to show what they bring

    python benchmarks/train_throughput.py                          # the recorded configuration (one H100)
    python benchmarks/train_throughput.py --layers 2 --hidden 256  # a quick look, CPU works too
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (device-synchronised) and real tokens seen by the model."""

    def __init__(self, warmup: int):
        self.warmup, self.step_times, self.tokens, self._start, self._tokens_now = warmup, [], 0, None, 0

    def count(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is not None and module.training:
            self._tokens_now += int(mask.sum()) if mask is not None else ids.numel()

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._start, self._tokens_now = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.step_times.append(time.perf_counter() - self._start)
            self.tokens += self._tokens_now


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    """MetaMathQA-like rows whose tokenized lengths (byte tokenizer) spread over 64-512 tokens."""
    rng = random.Random(seed)
    words = "the of a number is and total what if each how many more than twice half sum left".split()
    rows = []
    for _ in range(count):
        total = int(min(512, max(64, rng.lognormvariate(5.5, 0.45))))
        prompt_len = rng.randint(total // 4, total // 2)
        text = lambda n: " ".join(rng.choice(words) for _ in range(n))[:n]  # noqa: E731
        rows.append({"query": text(prompt_len), "response": text(total - prompt_len - 40) + " The answer is: 7"})
    return rows


def build_model(args, dtype):
    from init_speed import random_llama
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = random_llama(config, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    model.config._attn_implementation = "sdpa"
    return model


def recipe_config(name: str, output_dir: str, args, liger: bool):
    """The SFTConfig our recipe builds (padding-free, ...), with the benchmark's step count and batch size."""
    from milora.sft_config import parse_recipe

    overrides = [
        "--output_dir", output_dir, "--max_steps", str(args.warmup + args.steps), "--report_to", "none",
        "--per_device_train_batch_size", str(args.batch_size), "--effective_batch_size", str(args.batch_size),
        "--save_strategy", "no", "--logging_steps", "1000", "--merge", "false",
        "--bf16", str(torch.cuda.is_available()).lower(), "--use_liger_kernel", str(liger).lower(),
    ]
    recipe = parse_recipe([str(ROOT / "recipes" / name), *overrides])
    return recipe


def run_variant(label, args, rows, tokenizer, dtype):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from milora import apply_milora
    from milora.data import prepare_sft_dataset

    liger = not label.endswith("-noliger")
    model = build_model(args, dtype)
    timer = StepTimer(args.warmup)
    output_dir = f"/tmp/throughput_{label}"
    raw = Dataset.from_list(rows)
    if label == "a":
        training_args = SFTConfig(
            output_dir=output_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            report_to="none", save_strategy="no", logging_steps=1000, max_length=512,
            bf16=torch.cuda.is_available(),
        )
        dataset = prepare_sft_dataset(raw, "metamath")
        peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=TARGETS,
                                 task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[timer])
    else:
        method = "lora" if label.startswith("b") else "milora"
        recipe = recipe_config(f"llama2-7b_math_{method}.yaml", output_dir, args, liger)
        training_args = recipe.training
        dataset = prepare_sft_dataset(raw, "metamath")
        model = apply_milora(model, TARGETS, args.r, mode=method, lora_alpha=recipe.model.lora_alpha,
                             lora_dropout=recipe.model.lora_dropout)
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])
    trainer.model.register_forward_pre_hook(timer.count, with_kwargs=True)
    trainer.train()
    step = statistics.median(timer.step_times)
    result = {
        "variant": label, "median_step_s": step, "tokens_per_s": timer.tokens / sum(timer.step_times),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan"),
        "padding_free": bool(getattr(training_args, "padding_free", False)),
        "gradient_checkpointing": bool(training_args.gradient_checkpointing),
        "liger": bool(getattr(training_args, "use_liger_kernel", False)),
    }
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", default="a,b,c,b-noliger,c-noliger")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", nargs="+", default=None,
                        help="only print the table of these --json results (one process per variant)")
    args = parser.parse_args()
    if args.table:
        loaded = [json.loads(Path(f).read_text()) for f in args.table]
        print_table([r for d in loaded for r in d["results"]], loaded[0]["device"], argparse.Namespace(**loaded[0]["args"]))
        return
    if args.intermediate == 11008 and args.hidden != 4096:
        args.intermediate = args.hidden * 11008 // 4096

    from milora.tiny import tiny_tokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tokenizer = tiny_tokenizer()
    rows = synthetic_rows(args.batch_size * (args.warmup + args.steps) * 2)
    variants = [v for v in args.variants.split(",") if v]
    if importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available():
        variants = [v for v in variants if not v.endswith("-noliger")]  # the recipes run without Liger anyway
    results = []
    for variant in variants:
        results.append(run_variant(variant, args, rows, tokenizer, dtype))
        gc.collect()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print_table(results, device, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))


def print_table(results, device, args):
    by_name = {r["variant"]: r for r in results}
    print(f"\ndevice: {device}  torch {torch.__version__}  layers={args.layers} hidden={args.hidden} r={args.r} "
          f"batch={args.batch_size} steps={args.steps}")
    print(f"{'variant':<10}{'step s':>9}{'tokens/s':>11}{'peak GiB':>10}{'vs (a)':>8}{'vs (b)':>8}  settings")
    for r in results:
        vs_a = r["tokens_per_s"] / by_name["a"]["tokens_per_s"] if "a" in by_name else float("nan")
        base_b = by_name.get("b" if r["variant"] in ("b", "c") else "b-noliger")
        vs_b = r["median_step_s"] / base_b["median_step_s"] if base_b else float("nan")
        settings = f"padding_free={r['padding_free']} grad_ckpt={r['gradient_checkpointing']} liger={r['liger']}"
        print(f"{r['variant']:<10}{r['median_step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['peak_mem_gib']:>10.1f}"
              f"{vs_a:>7.2f}x{vs_b:>7.3f}   {settings}")
    print("'vs (a)': tokens/s ratio to plain TRL+PEFT; 'vs (b)': step-time ratio to our LoRA recipe with the same kernels")


if __name__ == "__main__":
    main()
