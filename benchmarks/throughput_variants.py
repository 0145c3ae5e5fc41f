"""The training configurations benchmarks/train_throughput.py and benchmarks/step_ratio.py compare.

A variant starts from a base, plain TRL + PEFT defaults or the recipe recipes/llama2-7b_math_<method>.yaml as
written, and changes the levers it names (gradient checkpointing, attention, Liger, batching, ...).
`resolved_settings` is what a variant runs with on this machine; `build_model` the LLaMA-2-7B-shaped model
(random bf16 weights, no download) or the tiny one of the smoke runs. Imported by the scripts beside it,
which put the checkout and this folder on sys.path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from init_speed import LLAMA2_7B, random_llama

from milora.attention import VARLEN_ATTENTION

ROOT = Path(__file__).resolve().parents[1]

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Variant:
    """One training configuration. `None` fields keep the base's setting (TRL defaults or the recipe YAML)."""

    method: str  # lora | milora | pissa
    base: str  # trl_defaults | recipe
    description: str
    gradient_checkpointing: bool | None = None
    attention: str | None = None
    liger: bool | None = None
    grouping: str = "fixed"  # fixed (batch_size rows) | budget (token_budget tokens)
    micro_batch: int | None = None  # rows per forward; None: the base's (recipe: per_device_train_batch_size)
    lora_dropout: float | None = None
    compile: bool = False  # TrainingArguments.torch_compile as transformers runs it (the whole model)
    compile_layers: bool = False  # each decoder layer compiled in place (milora.regional_compile)
    liger_ops: tuple[str, ...] | None = None  # Liger's kernels to apply (liger_kernel_config); None: all
    optim: str | None = None  # None: the base's
    init_cache: bool = False  # load the MiLoRA/PiSSA factors computed by an earlier process (no decomposition here)
    peft_input_cast: bool = False  # keep PEFT's float32 copy of LoRA inputs under autocast (milora.autocast)
    load_in_4bit: bool = False  # nf4 base (QLoRA / QMiLoRA): the residual quantized after the decomposition
    fp8_base: bool = False  # frozen decoder GEMMs in FP8 after the adapters are in place (milora.fp8)
    compile_mode: str | None = None  # torch.compile mode of the compiled layers ("reduce-overhead": CUDA graphs)
    pad_to_budget: bool = False  # every batch padded to token_budget tokens (SFTConfig.pad_to_multiple_of): one shape
    # no host wait inside a step, as recipes/sft.py trains: milora.sft.trainer.SFTTrainer (TRL's step metrics kept on
    # the device), logging_nan_inf_filter off, batches pinned and copied without blocking
    sync_free: bool = False


FAST = dict(gradient_checkpointing=False, attention=VARLEN_ATTENTION, liger=True, grouping="budget", micro_batch=0)
# decoder layers compiled in place, Liger for the LM head and cross-entropy only (the recipes' fused AdamW kept)
COMPILED = dict(compile_layers=True, liger_ops=())
# ... and replayed as CUDA graphs, which need one shape: every batch padded to the token budget
GRAPHED = dict(**COMPILED, compile_mode="reduce-overhead", pad_to_budget=True)
NO_SYNC = dict(sync_free=True)
VARIANTS = {  # in run order: the comparisons that matter most first, in case a time budget cuts a round
    "trl_defaults": Variant("lora", "trl_defaults", "SFTConfig defaults + PEFT LoraConfig (padded, GC on, sdpa)"),
    "lora_fast": Variant("lora", "recipe", "LoRA, all levers: GC off, varlen, Liger, token budget, 1 micro-batch",
                         **FAST),
    "milora_fast": Variant("milora", "recipe", "MiLoRA, all levers", **FAST),
    "milora_fast_cached": Variant("milora", "recipe", "MiLoRA, all levers, factors loaded from an earlier run's cache",
                                  **FAST, init_cache=True),
    "pissa_fast": Variant("pissa", "recipe", "PiSSA, all levers", **FAST),
    "lora_recipe": Variant("lora", "recipe", "LoRA recipe as written (recipes/llama2-7b_math_lora.yaml)"),
    "milora_recipe": Variant("milora", "recipe", "MiLoRA recipe as written (recipes/llama2-7b_math_milora.yaml)"),
    "lora_lowmem": Variant("lora", "recipe", "LoRA, all levers but GC on (low memory)",
                           **{**FAST, "gradient_checkpointing": True}),
    "lora_fast_sdpa": Variant("lora", "recipe", "all levers but sdpa instead of varlen",
                              **{**FAST, "attention": "sdpa"}),
    "lora_fast_noliger": Variant("lora", "recipe", "all levers but no Liger", **{**FAST, "liger": False}),
    "lora_fast_fixed": Variant("lora", "recipe", "all levers but fixed 16-row batches",
                               **{**FAST, "grouping": "fixed"}),
    "lora_fast_peftcast": Variant("lora", "recipe", "all levers but PEFT's float32 copy of LoRA inputs",
                                  **FAST, peft_input_cast=True),
    # 4-bit bases (QLoRA, QMiLoRA), GC on: the 12-16 GB configuration; `--variants qlora_lowmem,qmilora_lowmem,...`
    "qlora_lowmem": Variant("lora", "recipe", "QLoRA: nf4 base, all levers but GC on",
                            **{**FAST, "gradient_checkpointing": True}, load_in_4bit=True),
    "qmilora_lowmem": Variant("milora", "recipe", "QMiLoRA: nf4 residual, all levers but GC on",
                              **{**FAST, "gradient_checkpointing": True}, load_in_4bit=True),
    "qpissa_lowmem": Variant("pissa", "recipe", "QPiSSA (no refits): nf4 residual, all levers but GC on",
                             **{**FAST, "gradient_checkpointing": True}, load_in_4bit=True),
    "qlora_fast": Variant("lora", "recipe", "QLoRA: nf4 base, all levers", **FAST, load_in_4bit=True),
    "qmilora_fast": Variant("milora", "recipe", "QMiLoRA: nf4 residual, all levers", **FAST, load_in_4bit=True),
    # FP8 frozen base (compute capability >= 8.9): `--variants fp8` runs these beside their bf16 twins
    "lora_fast_fp8": Variant("lora", "recipe", "LoRA, all levers, frozen base GEMMs in FP8", **FAST, fp8_base=True),
    "milora_fast_fp8": Variant("milora", "recipe", "MiLoRA, all levers, frozen base GEMMs in FP8", **FAST,
                               fp8_base=True),
    # not in the default run:
    "lora_fast_dropout0": Variant("lora", "recipe", "all levers, lora_dropout 0 (the most a fused dropout could save)",
                                  **{**FAST, "lora_dropout": 0.0}),
    "lora_fast_compile": Variant("lora", "recipe", "all levers + torch_compile", **{**FAST, "compile": True}),
    "lora_fast_layers": Variant("lora", "recipe", "all levers + decoder layers compiled", **FAST, compile_layers=True),
    "lora_fast_adamw": Variant("lora", "recipe", "all levers, AdamW unfused (the recipes' optimizer before "
                               "adamw_torch_fused)", **FAST, optim="adamw_torch"),
    "lora_fast_layers_flce": Variant("lora", "recipe", "all levers + decoder layers compiled, of "
                                     "Liger only the fused LM head and cross-entropy (the layers' norms, SwiGLU and "
                                     "RoPE left to the compiler)", **FAST, **COMPILED),
    "milora_fast_layers_flce": Variant("milora", "recipe", "MiLoRA, as lora_fast_layers_flce", **FAST, **COMPILED),
    "lora_lowmem_layers_flce": Variant("lora", "recipe", "lora_fast_layers_flce but GC on (low memory)",
                                       **{**FAST, "gradient_checkpointing": True}, **COMPILED),
    "lora_fast_layers_flce_fp8": Variant("lora", "recipe", "lora_fast_layers_flce + FP8 frozen base", **FAST,
                                         **COMPILED, fp8_base=True),
    "milora_fast_layers_flce_fp8": Variant("milora", "recipe", "milora_fast_layers_flce + FP8 frozen base", **FAST,
                                           **COMPILED, fp8_base=True),
    "lora_fast_graphs": Variant("lora", "recipe", "lora_fast_layers_flce, the layers replayed as CUDA graphs "
                                "(torch_compile_mode reduce-overhead), batches padded to the token budget",
                                **FAST, **GRAPHED),
    "milora_fast_graphs": Variant("milora", "recipe", "MiLoRA, as lora_fast_graphs", **FAST, **GRAPHED),
    "lora_fast_graphs_fp8": Variant("lora", "recipe", "lora_fast_graphs + FP8 frozen base", **FAST, **GRAPHED,
                                    fp8_base=True),
    "milora_fast_graphs_fp8": Variant("milora", "recipe", "milora_fast_graphs + FP8 frozen base", **FAST, **GRAPHED,
                                      fp8_base=True),
    # the same with no host synchronisation inside a step (the recipes' trainer and settings)
    "lora_fast_layers_flce_nosync": Variant("lora", "recipe", "lora_fast_layers_flce, no host wait in a step",
                                            **FAST, **COMPILED, **NO_SYNC),
    "milora_fast_layers_flce_nosync": Variant("milora", "recipe", "milora_fast_layers_flce, no host wait in a step",
                                              **FAST, **COMPILED, **NO_SYNC),
    "lora_fast_layers_flce_fp8_nosync": Variant("lora", "recipe", "lora_fast_layers_flce_fp8, no host wait in a step",
                                                **FAST, **COMPILED, fp8_base=True, **NO_SYNC),
    "lora_fast_graphs_fp8_nosync": Variant("lora", "recipe", "lora_fast_graphs_fp8, no host wait in a step", **FAST,
                                           **GRAPHED, fp8_base=True, **NO_SYNC),
    "milora_fast_graphs_fp8_nosync": Variant("milora", "recipe", "milora_fast_graphs_fp8, no host wait in a step",
                                             **FAST, **GRAPHED, fp8_base=True, **NO_SYNC),
}
QUANTIZED_VARIANTS = ["trl_defaults", "qlora_lowmem", "qmilora_lowmem", "lora_lowmem", "qlora_fast", "qmilora_fast"]
FP8_VARIANTS = ["lora_fast", "lora_fast_fp8", "milora_fast", "milora_fast_fp8"]
DEFAULT_VARIANTS = ["trl_defaults", "lora_fast", "milora_fast", "lora_recipe", "milora_recipe", "lora_lowmem",
                    "lora_fast_sdpa", "lora_fast_noliger", "lora_fast_fixed", "lora_fast_peftcast"]


def recipe_settings(method: str) -> dict:
    """The training settings of recipes/llama2-7b_math_<method>.yaml (the file the recipe runs)."""
    import yaml

    return yaml.safe_load((ROOT / "recipes" / f"llama2-7b_math_{method}.yaml").read_text())


def benchmark_spec(smoke: bool, r: int = 64, warmup: int = 5, steps: int = 20, batch_size: int = 16,
                   token_budget: int = 4096, layers: int | None = None) -> dict:
    """The model, rank and batches a run trains on (saved with its batches; the tiny model for --smoke)."""
    if smoke:
        return {"model": "tiny", "r": 8, "warmup": 1, "steps": 2, "batch_size": 4, "token_budget": 160, "seed": 0}
    return {"model": "llama2-7b", "layers": layers, "r": r, "warmup": warmup, "steps": steps,
            "batch_size": batch_size, "token_budget": token_budget, "seed": 0}


def model_config(spec: dict):
    from transformers import LlamaConfig

    if spec["model"] == "tiny":
        from milora.tiny import tiny_config

        return tiny_config("llama")
    overrides = {"num_hidden_layers": spec["layers"]} if spec.get("layers") else {}
    return LlamaConfig(**{**LLAMA2_7B, **overrides}, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def resolved_settings(variant: Variant, batch_size: int, r: int) -> dict:
    """What the variant runs with, after its base's defaults and what this machine supports."""
    from milora.sft.config import liger_usable

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
    settings["liger"] = bool(settings["liger"]) and liger_usable()
    if not settings["micro_batch"] or settings["micro_batch"] >= batch_size or variant.grouping == "budget":
        settings["micro_batch"] = None  # the whole batch in one forward
    if variant.optim is not None:
        settings["optim"] = variant.optim
    return {**settings, "method": variant.method, "base": variant.base, "grouping": variant.grouping,
            "compile": variant.compile, "compile_layers": variant.compile_layers, "liger_ops": variant.liger_ops,
            "compile_mode": variant.compile_mode, "pad_to_budget": variant.pad_to_budget,
            "bf16": on_gpu,
            "peft_input_cast": variant.peft_input_cast or variant.base == "trl_defaults",
            "load_in_4bit": variant.load_in_4bit, "fp8_base": variant.fp8_base, "sync_free": variant.sync_free}


def micro_batches(groups: list[list[int]], micro: int | None) -> tuple[list[list[int]], int]:
    """The dataloader's batches and the gradient accumulation that puts one saved batch in each optimizer step."""
    if micro is None:
        return groups, 1
    if any(len(batch) % micro for batch in groups):
        raise ValueError(f"micro-batch {micro} does not divide the batches")
    return [batch[i:i + micro] for batch in groups for i in range(0, len(batch), micro)], len(groups[0]) // micro


def build_model(spec: dict, attention: str):
    from milora.attention import register_varlen_attention

    register_varlen_attention()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(model_config(spec), torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.set_attn_implementation(attention)
    return model
