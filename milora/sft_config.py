"""Recipe glue for `recipes/sft.py`: the dataclasses a recipe fills, their parsing, and the small steps between
parsing and `SFTTrainer` (building the model, applying the method, writing the outputs).

A recipe is one flat YAML file whose keys are the fields of three dataclasses, named as Hugging Face names them:

- `DataArguments`: which dataset and how to read it (TRL `ScriptArguments` names plus `dataset_format`, ...).
- `ModelArguments`: the base model and the adapter (TRL `ModelConfig` names plus `method`, `milora_init_dir`).
- `MiloraSFTConfig`: TRL's `SFTConfig` (so every `transformers.TrainingArguments` key) plus the outputs
  (`merge`, `save_standard_lora`) and `effective_batch_size`.

Parsing is TRL's `TrlParser`: the YAML (first positional argument or `--config`) sets the defaults, any key can
be overridden on the command line (`--learning_rate 1e-4`), and an unknown key is an error listing the valid ones.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, TrlParser

METHODS = ("milora", "pissa", "lora", "mid", "random")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
INIT_ADAPTER_DIR = "milora_init_adapter"
STANDARD_LORA_DIR = "lora_adapter"
MERGED_DIR = "merged"
RUN_INFO_FILE = "milora_run.json"


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message says which key is wrong and how to fix it."""


@dataclass
class DataArguments:
    """Which dataset to train on and how to read it."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. meta-math/MetaMathQA) or a local json/jsonl/parquet/csv file or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (hub datasets)."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on when eval_strategy is not 'no' (hub datasets)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "alpaca|commonsense (instruction/input/output), metamath (query/response), chat "
                  "(messages), prompt_completion, or auto (from the fields present)."},
    )
    dataset_messages_field: str = field(
        default="messages", metadata={"help": "Column holding the chat messages (UltraFeedback: chosen)."}
    )
    dataset_max_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows only (quick runs)."}
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "LLaVA data: folder the rows' image paths are relative to (default: the JSON's folder)."},
    )
    skip_missing_images: bool = field(
        default=False,
        metadata={"help": "LLaVA data: skip rows whose image is missing or unreadable (counted in the log) instead "
                  "of stopping with the row id and path."},
    )


@dataclass
class ModelArguments:
    """The base model and the adapter put on it."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id, local directory, or tiny:KIND (offline tiny models)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype: auto, bfloat16, float16, float32. Default: bfloat16 on a GPU with "
                  "bf16 support, else float32."},
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, flash_attention_2, eager, ..."}
    )
    method: str = field(
        default="milora",
        metadata={"help": "milora (minor components), pissa (principal), lora (plain), mid, random (ablations)."},
    )
    lora_r: int = field(default=16, metadata={"help": "Adapter rank."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha. Default: r for milora/pissa/mid/random, 2r for lora (the paper)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Modules to adapt: name suffixes, a regex, or all-linear."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (LLaVA: multi_modal_projector)."},
    )
    milora_init_dir: str | None = field(
        default=None,
        metadata={"help": "Start from a `milora init` directory (residual model + initial adapter): no SVD at "
                  "start-up; required for SVD methods under DeepSpeed ZeRO-3."},
    )
    milora_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Reuse the SVD factors computed for the same weights, targets, rank and method by an "
                  "earlier run (stored there on first use): a resumed or repeated run skips the decomposition."},
    )


@dataclass
class MiloraSFTConfig(SFTConfig):
    """TRL's `SFTConfig` with this toolkit's defaults and output options."""

    output_dir: str | None = field(default="outputs/sft", metadata={"help": "Where checkpoints and outputs go."})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Logging integrations (tensorboard by default)."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Default: on when a GPU supports it, else off."}
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on assistant turns only (chat data). Default: on for chat data."},
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step over all processes; sets gradient_accumulation_steps = "
                  "effective_batch_size / (per_device_train_batch_size * number of processes)."},
    )
    merge: bool = field(default=False, metadata={"help": "Also save the merged full checkpoint to OUTPUT_DIR/merged."})
    save_standard_lora: bool = field(
        default=True,
        metadata={"help": "For SVD methods, save the standard-LoRA conversion (for the original base model) to "
                  "OUTPUT_DIR/lora_adapter."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


RECIPE_TYPES = (DataArguments, ModelArguments, MiloraSFTConfig)


@dataclass
class Recipe:
    """A parsed recipe: the three dataclasses, the YAML it came from and the keys it set explicitly."""

    data: DataArguments
    model: ModelArguments
    training: MiloraSFTConfig
    path: str | None = None
    explicit_keys: frozenset[str] = frozenset()


class _RecipeParser(TrlParser):
    def error(self, message):  # argparse would print usage and exit; a recipe error is more useful to callers
        raise RecipeError(message)


def valid_keys() -> dict[str, list[str]]:
    """Recipe keys by dataclass."""
    return {cls.__name__: [f.name for f in fields(cls) if f.init] for cls in RECIPE_TYPES}


def unknown_key_error(keys: list[str], source: str) -> RecipeError:
    groups = valid_keys()
    every = [k for names in groups.values() for k in names] + ["env"]
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, every, n=3, cutoff=0.6)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    listing = "\n".join(f"  {name}: {', '.join(names)}" for name, names in groups.items())
    return RecipeError(
        f"unknown recipe key{'s' if len(keys) > 1 else ''} {', '.join(hints)} in {source}. Valid keys:\n{listing}"
    )


def read_recipe_file(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    with open(path) as handle:
        config = yaml.safe_load(handle)
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values")
    return config


def _split_recipe_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """The recipe path (first positional argument or `--config PATH`) and the remaining overrides."""
    argv = list(argv)
    recipe = None
    if argv and not argv[0].startswith("-"):
        recipe = argv.pop(0)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("--config needs a recipe path")
        if recipe is not None:
            raise RecipeError(f"two recipes given ({recipe} and {argv[index + 1]}); pass one")
        recipe = argv[index + 1]
        del argv[index : index + 2]
    return recipe, argv


def _cli_keys(argv: list[str]) -> set[str]:
    """Field names set on the command line (`--lora-r` spells `lora_r`, `--no_merge` sets `merge`)."""
    known = {k for names in valid_keys().values() for k in names}
    keys = set()
    for arg in argv:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            keys.add(key[3:] if key.startswith("no_") and key[3:] in known else key)
    return keys


def _parse(args: list[str]):
    try:
        return _RecipeParser(RECIPE_TYPES).parse_args_and_config(args)
    except ValueError as error:
        if isinstance(error, RecipeError) or "arguments are not used" not in str(error):
            raise
        unused = ast.literal_eval(str(error).split(": ", 1)[1])
        raise unknown_key_error([a.lstrip("-") for a in unused if a.startswith("--")] or unused, "the command line") from None


def parse_recipe(argv: list[str] | None = None) -> Recipe:
    """Parse `[RECIPE.yaml | --config RECIPE.yaml] [--key value ...]` into a checked `Recipe`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_path, overrides = _split_recipe_argv(argv)
    config = read_recipe_file(recipe_path) if recipe_path else {}
    known = {k for names in valid_keys().values() for k in names}
    unknown = [k for k in config if k not in known and k != "env"]
    if unknown:
        raise unknown_key_error(unknown, recipe_path)
    unknown = sorted(k for k in _cli_keys(overrides) if k not in known and k not in ("help", "h"))
    if unknown:
        raise unknown_key_error(unknown, "the command line")

    args = (["--config", recipe_path] if recipe_path else []) + overrides
    explicit = frozenset(set(config) | _cli_keys(overrides))
    data, model, training = _parse(args)
    steps = accumulation_steps(training, explicit)
    if steps != training.gradient_accumulation_steps:
        # Parse again rather than patch the field: DeepSpeed's "auto" batch sizes are filled in while the
        # training arguments are built.
        data, model, training = _parse([*args, "--gradient_accumulation_steps", str(steps)])
    recipe = Recipe(data, model, training, recipe_path, explicit)
    check_recipe(recipe)
    return recipe


# --- checks -------------------------------------------------------------------------------------------------


def resolve_input_path(value: str | None, recipe_path: str | None) -> str | None:
    """A local input path as given (relative to the current directory) or, failing that, relative to the
    recipe's directory, so recipes can name their bundled data as `data/...` from anywhere."""
    from milora.tiny import is_tiny

    if value is None or is_tiny(value):
        return value
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return expanded
    if recipe_path and not os.path.isabs(expanded):
        beside = os.path.join(os.path.dirname(os.path.abspath(recipe_path)), expanded)
        if os.path.exists(beside):
            return beside
    return value


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def deepspeed_zero_stage(training: MiloraSFTConfig) -> int | None:
    """The ZeRO stage this run uses (from `deepspeed:` or `accelerate launch --config_file`), or None."""
    plugin = getattr(training, "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage)
    from transformers.integrations import is_deepspeed_zero3_enabled

    return 3 if is_deepspeed_zero3_enabled() else None


def liger_usable() -> bool:
    """Liger's Triton kernels run on CUDA GPUs only, and only when the package is installed."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def check_recipe(recipe: Recipe) -> None:
    """Resolve local paths, fill method-dependent defaults and reject what cannot run, before anything loads."""
    from milora.data import FORMATS, is_local_data_path
    from milora.init_dir import is_init_dir
    from milora.tiny import TINY_KINDS, TINY_PREFIX, is_tiny

    data, model, training = recipe.data, recipe.model, recipe.training
    where = f" in {recipe.path}" if recipe.path else ""

    model.method = str(model.method).lower()
    if model.method not in METHODS:
        raise RecipeError(f"unknown method {model.method!r}{where}; choose one of {', '.join(METHODS)}")
    if not isinstance(model.lora_r, int) or model.lora_r < 1:
        raise RecipeError(f"lora_r must be a positive integer, got {model.lora_r!r}")
    if data.dataset_format not in FORMATS:
        raise RecipeError(f"unknown dataset_format {data.dataset_format!r}{where}; choose one of {', '.join(FORMATS)}")

    model.model_name_or_path = resolve_input_path(model.model_name_or_path, recipe.path)
    model.milora_init_dir = resolve_input_path(model.milora_init_dir, recipe.path)
    data.dataset_name = resolve_input_path(data.dataset_name, recipe.path)
    training.chat_template_path = resolve_input_path(training.chat_template_path, recipe.path)
    data.image_folder = resolve_input_path(data.image_folder, recipe.path)

    if model.milora_init_dir is not None:
        if not is_init_dir(model.milora_init_dir):
            raise RecipeError(
                f"milora_init_dir {model.milora_init_dir} is not a `milora init` directory (no "
                "milora_init/adapter_config.json); create one with `milora init --model ... --r ... --out DIR`"
            )
        if model.method == "lora":
            raise RecipeError("milora_init_dir holds an SVD init; it cannot be combined with method: lora")
        _adopt_init_dir_settings(recipe)
    elif model.model_name_or_path is None:
        raise RecipeError(f"no model{where}: set model_name_or_path (hub id, local directory or tiny:KIND)")
    else:
        name = model.model_name_or_path
        if is_tiny(name):
            kind = name[len(TINY_PREFIX):]
            if kind not in TINY_KINDS or kind == "bert":
                causal = [TINY_PREFIX + k for k in TINY_KINDS if k != "bert"]
                raise RecipeError(f"model_name_or_path {name!r} is not a tiny causal LM; use one of {', '.join(causal)}")
        elif _looks_local(name) and not os.path.isdir(name):
            raise RecipeError(f"model_name_or_path {name}: no such directory")
        elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise RecipeError(f"model_name_or_path {name} has no config.json (not a saved model directory)")

    if model.lora_alpha is None:
        model.lora_alpha = 2 * model.lora_r if model.method == "lora" else model.lora_r

    if data.dataset_name is None:
        raise RecipeError(f"no dataset{where}: set dataset_name (hub id or local json/jsonl/parquet file)")
    if is_local_data_path(data.dataset_name) and not os.path.exists(os.path.expanduser(data.dataset_name)):
        tried = [data.dataset_name]
        if recipe.path and not os.path.isabs(data.dataset_name):
            tried.append(os.path.join(os.path.dirname(os.path.abspath(recipe.path)), data.dataset_name))
        raise RecipeError(f"dataset file not found: {data.dataset_name} (looked for {' and '.join(tried)})")
    template = training.chat_template_path
    if template and template.endswith((".jinja", ".j2")) and not os.path.isfile(template):
        raise RecipeError(f"chat_template_path {training.chat_template_path}: no such file")

    if training.use_liger_kernel and not liger_usable():
        warnings.warn(
            "use_liger_kernel: Liger's fused kernels need a CUDA GPU and `pip install liger-kernel` "
            "(or `pip install -e .[gpu]`); training without them.",
            stacklevel=2,
        )
        training.use_liger_kernel = False

    zero_stage = deepspeed_zero_stage(training)
    if zero_stage == 3 and model.method != "lora" and model.milora_init_dir is None:
        raise RecipeError(
            f"method {model.method} under DeepSpeed ZeRO-3 needs milora_init_dir: ZeRO-3 partitions the weights "
            "as they load, so no process holds a whole matrix to decompose. Run `milora init --model "
            f"{model.model_name_or_path} --mode {model.method} --r {model.lora_r} --lora_alpha {model.lora_alpha} "
            f"--targets {_targets_arg(model.lora_target_modules)} --out DIR` once (one GPU or CPU), then train with "
            "milora_init_dir: DIR (see deepspeed_configs/README.md)"
        )
    if zero_stage == 3 and training.merge:
        raise RecipeError(
            "merge: true is not available under DeepSpeed ZeRO-3 (the weights are partitioned); train with "
            "merge: false, then run `milora merge` on the saved adapter (see deepspeed_configs/README.md)"
        )
    training.resume_from_checkpoint = resolve_resume_checkpoint(training.resume_from_checkpoint, training.output_dir)


def _targets_arg(targets) -> str:
    return ",".join(targets) if isinstance(targets, (list, tuple)) else str(targets)


def _adopt_init_dir_settings(recipe: Recipe) -> None:
    """Take method, rank, alpha and targets from a `milora init` directory; refuse a recipe that sets them
    differently (a PiSSA recipe pointed at a MiLoRA init, a rank-32 recipe at a rank-64 init)."""
    from milora.init_dir import INIT_SUBDIR, read_metadata
    from milora.model import normalize_mode

    model = recipe.model
    adapter = json.loads((Path(model.milora_init_dir) / INIT_SUBDIR / "adapter_config.json").read_text())
    mode = read_metadata(model.milora_init_dir).get("mode")
    method_of_mode = {"minor": "milora", "principal": "pissa", "mid": "mid", "random": "random"}
    found = {"method": method_of_mode.get(mode, model.method), "lora_r": adapter["r"], "lora_alpha": adapter["lora_alpha"]}
    for key, value in found.items():
        ours = getattr(model, key)
        same = normalize_mode(ours) == normalize_mode(value) if key == "method" else ours == value
        if key in recipe.explicit_keys and ours is not None and not same:
            raise RecipeError(
                f"{key}: {ours} contradicts milora_init_dir {model.milora_init_dir}, which was made with "
                f"{key} {value}; use a matching init directory or drop {key} from the recipe"
            )
        setattr(model, key, value)
    targets = adapter.get("target_modules")
    model.lora_target_modules = sorted(targets) if isinstance(targets, list) else targets


def accumulation_steps(training: MiloraSFTConfig, explicit_keys=frozenset()) -> int:
    """gradient_accumulation_steps for `effective_batch_size` examples per optimizer step on this many processes."""
    if training.effective_batch_size is None:
        return training.gradient_accumulation_steps
    per_step = training.per_device_train_batch_size * max(training.world_size, 1)
    steps = training.effective_batch_size / per_step
    if steps < 1 or not float(steps).is_integer():
        raise RecipeError(
            f"effective_batch_size {training.effective_batch_size} is not a multiple of "
            f"per_device_train_batch_size {training.per_device_train_batch_size} x {training.world_size} "
            "process(es)"
        )
    if "gradient_accumulation_steps" in explicit_keys and training.gradient_accumulation_steps != int(steps):
        raise RecipeError(
            f"gradient_accumulation_steps {training.gradient_accumulation_steps} contradicts effective_batch_size "
            f"{training.effective_batch_size} (which needs {int(steps)} on {training.world_size} process(es)); "
            "set only one of them"
        )
    return int(steps)


def resolve_resume_checkpoint(value, output_dir: str) -> str | None:
    """`true`/`last` -> the newest checkpoint in output_dir; `false`/none -> None; else a checkpoint path."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "none", "null", "no"):
        return None
    if text.lower() in ("true", "last", "yes"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise RecipeError(
                f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N directory to resume from"
            )
        return last
    if not os.path.isdir(text):
        raise RecipeError(f"resume_from_checkpoint {text}: no such checkpoint directory")
    return text


# --- data, model, adapter and outputs ------------------------------------------------------------------------


def load_training_data(recipe: Recipe, processing_class):
    """`(train_dataset, eval_dataset, data_collator)` for `SFTTrainer`, and the loss masking that goes with them.

    Text data goes through `milora.data` (prompt/completion or chat rows, TRL tokenizes and masks them);
    LLaVA models through `milora.llava_data` (its own collator reads the images and masks all but the answers).
    """
    from milora.data import load_sft_dataset
    from milora.llava_data import build_llava_train_data, is_llava

    data, model, training = recipe.data, recipe.model, recipe.training
    if is_llava(model.milora_init_dir or model.model_name_or_path):
        if training.eval_strategy != "no":
            raise RecipeError("LLaVA recipes train without an eval set; set eval_strategy: 'no'")
        train_dataset, collator = build_llava_train_data(
            data.dataset_name, data.image_folder, processing_class, training.max_length,
            data.skip_missing_images, max_samples=data.dataset_max_samples,
        )
        training.assistant_only_loss = False
        training.remove_unused_columns = False
        training.dataset_kwargs = {**(training.dataset_kwargs or {}), "skip_prepare_dataset": True}
        return train_dataset, None, collator

    kwargs = {
        "dataset_format": data.dataset_format, "config": data.dataset_config,
        "messages_field": data.dataset_messages_field, "max_samples": data.dataset_max_samples,
    }
    train_dataset = load_sft_dataset(data.dataset_name, split=data.dataset_train_split, **kwargs)
    eval_dataset = None
    if training.eval_strategy != "no":
        eval_dataset = load_sft_dataset(data.dataset_name, split=data.dataset_test_split, **kwargs)
    if training.assistant_only_loss is None:
        # prompt/completion rows get completion-only loss from TRL; chat rows need assistant-only loss
        training.assistant_only_loss = "messages" in train_dataset.column_names
    return train_dataset, eval_dataset, None


def model_dtype(model_args: ModelArguments):
    if model_args.dtype is not None:
        return model_args.dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def load_tokenizer(model_args: ModelArguments, training: MiloraSFTConfig):
    from milora.loading import load_processing_class

    source = model_args.model_name_or_path
    if model_args.milora_init_dir is not None and (
        source is None or os.path.isfile(os.path.join(model_args.milora_init_dir, "tokenizer_config.json"))
    ):
        source = model_args.milora_init_dir
    try:
        return load_processing_class(source)
    except (OSError, ValueError) as error:
        raise RecipeError(f"no tokenizer found for {source}: {error}") from error


def build_peft_model(model_args: ModelArguments, training: MiloraSFTConfig):
    """The PEFT model to train: `apply_milora` on the base model, or a `milora init` directory loaded as is."""
    from milora import apply_milora, load_init_dir
    from milora.loading import load_model
    from milora.tiny import is_tiny

    dtype = model_dtype(model_args)
    if model_args.milora_init_dir is not None:
        peft_model = load_init_dir(
            model_args.milora_init_dir, dtype=dtype, attn_implementation=model_args.attn_implementation,
            trust_remote_code=training.trust_remote_code,
        )
        set_lora_dropout(peft_model, model_args.lora_dropout)
        return peft_model
    hub_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training.trust_remote_code}
    model = load_model(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation,
        **({} if is_tiny(model_args.model_name_or_path) else hub_kwargs),
    )
    return apply_milora(
        model,
        model_args.lora_target_modules,
        model_args.lora_r,
        mode=model_args.method,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        seed=training.seed,
        modules_to_save=model_args.lora_modules_to_save,
        cache_dir=model_args.milora_cache_dir,
        # decompose on this process's GPU: minutes for a 7B model instead of most of an hour on CPU
        device=training.device if training.device.type == "cuda" else None,
        show_progress=training.local_process_index == 0 and not training.disable_tqdm,
    )


def set_lora_dropout(peft_model, p: float, adapter_name: str = "default") -> None:
    """Use the recipe's dropout on an adapter loaded from disk (`milora init` saves its adapter without one)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_dropout:
            module.lora_dropout[adapter_name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    peft_model.peft_config[adapter_name].lora_dropout = p


def needs_initial_adapter(model_args: ModelArguments) -> bool:
    """SVD-initialised adapters start from B0 A0 != 0, which the standard-LoRA conversion must subtract."""
    return model_args.method != "lora"


def save_initial_adapter(peft_model, model_args: ModelArguments, out_dir: str | Path) -> Path:
    """Write the adapter as initialised (before any training step) to `out_dir`, atomically."""
    import shutil

    from milora.init_dir import INIT_SUBDIR
    from milora.io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        if model_args.milora_init_dir is not None:
            source = Path(model_args.milora_init_dir) / INIT_SUBDIR
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
        else:
            peft_model.save_pretrained(tmp)
    return Path(out_dir)


def initial_adapter_mismatch(peft_model, saved_dir: str | Path, rtol: float = 1e-3) -> str | None:
    """Compare the model's current adapter with a saved initial one, as products `B A` (sign-invariant).

    Returns a description of the first mismatch, or None when every module agrees within `rtol`.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(saved_dir) / "adapter_model.safetensors"
    saved = load_file(str(path))
    current = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    a_keys = sorted(k for k in current if ".lora_A." in k)
    if sorted(k for k in saved if ".lora_A." in k) != a_keys:
        return f"{path} adapts other modules than this run"
    for key_a in a_keys:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        A, B = current[key_a].double(), current[key_b].double()
        A0, B0 = saved[key_a].double(), saved[key_b].double()
        if A.shape != A0.shape or B.shape != B0.shape:
            return f"{key_a}: shape {tuple(A.shape)} vs saved {tuple(A0.shape)}"
        # ||BA - B0A0||^2 from r x r products, without forming the full matrices
        norm = torch.trace((B.T @ B) @ (A @ A.T))
        norm0 = torch.trace((B0.T @ B0) @ (A0 @ A0.T))
        cross = torch.trace((B.T @ B0) @ (A0 @ A.T))
        diff = math.sqrt(max(float(norm + norm0 - 2 * cross), 0.0))
        if diff > rtol * math.sqrt(max(float(norm0), 1e-30)):
            return f"{key_a.rsplit('.lora_A.', 1)[0]}: relative difference {diff / math.sqrt(max(float(norm0), 1e-30)):.2e}"
    return None


def prepare_initial_adapter(peft_model, model_args: ModelArguments, training: MiloraSFTConfig) -> Path | None:
    """Save the initial adapter for the conversion, or, when resuming, check that this run rebuilt the same
    init as the original run (same base, method, rank): the residual base weights then match too."""
    if not needs_initial_adapter(model_args):
        return None
    out_dir = Path(training.output_dir) / INIT_ADAPTER_DIR
    if training.resume_from_checkpoint and (out_dir / "adapter_model.safetensors").is_file():
        mismatch = initial_adapter_mismatch(peft_model, out_dir)
        if mismatch is not None:
            raise RecipeError(
                f"cannot resume: the initial adapter rebuilt now differs from {out_dir} written by the original "
                f"run ({mismatch}). Resume with the same model_name_or_path, method, lora_r, lora_alpha and "
                "lora_target_modules (or the same milora_init_dir)."
            )
        return out_dir
    if training.process_index == 0:
        save_initial_adapter(peft_model, model_args, out_dir)
    return out_dir


def original_base_model(model_args: ModelArguments) -> str | None:
    """The model the standard-LoRA conversion applies to: the original model, never the residual one."""
    if model_args.milora_init_dir is not None:
        from milora.init_dir import read_metadata

        return read_metadata(model_args.milora_init_dir).get("source_model") or model_args.model_name_or_path
    return model_args.model_name_or_path


def save_outputs(trainer, model_args: ModelArguments, data_args: DataArguments, training: MiloraSFTConfig) -> dict:
    """After `trainer.save_model`: the standard-LoRA conversion, the merged checkpoint and a run summary.

    Runs on the main process only; the others wait at the end.
    """
    from milora import convert_to_lora, merge_adapter
    from milora.io import atomic_write_text

    out = Path(training.output_dir)
    info = {
        "method": model_args.method,
        "base_model": original_base_model(model_args),
        "milora_init_dir": model_args.milora_init_dir,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": model_args.lora_target_modules,
        "dataset": data_args.dataset_name,
        "adapter": str(out),
        "adapter_base": "residual" if needs_initial_adapter(model_args) else "original",
        "global_step": trainer.state.global_step,
    }
    if trainer.accelerator.is_main_process:
        if needs_initial_adapter(model_args):
            info["initial_adapter"] = str(out / INIT_ADAPTER_DIR)
            if training.save_standard_lora:
                convert_to_lora(out, out / INIT_ADAPTER_DIR, out / STANDARD_LORA_DIR)
                _set_adapter_base(out / STANDARD_LORA_DIR, info["base_model"])
                info["standard_lora_adapter"] = str(out / STANDARD_LORA_DIR)
        else:
            info["standard_lora_adapter"] = str(out)
        if training.merge:
            merge_adapter(trainer.accelerator.unwrap_model(trainer.model), out / MERGED_DIR, trainer.processing_class)
            info["merged"] = str(out / MERGED_DIR)
        atomic_write_text(out / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()
    return info


def _set_adapter_base(adapter_dir: Path, base_model: str | None) -> None:
    """Point a converted adapter's config at the original model (it applies there, not to the residual)."""
    from milora.io import atomic_write_text

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
