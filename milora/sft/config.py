"""The three dataclasses a recipe fills, each resolving its own defaults in `__post_init__`.

A recipe is one flat YAML file whose keys are the fields of these dataclasses, named as Hugging Face names them:

- `DataArguments`: which dataset and how to read it (TRL `ScriptArguments` names plus `dataset_format`, ...).
- `ModelArguments`: the base model and the adapter (TRL `ModelConfig` names plus `method`, `milora_init_dir`).
- `MiloraSFTConfig`: TRL's `SFTConfig` (so every `transformers.TrainingArguments` key) plus the outputs
  (`merge`, `save_residual_base`), the step-0 check and `effective_batch_size`.

What a default depends on is resolved where the field is declared: `lora_alpha` from `method` and `lora_r`,
method/rank/alpha/targets from a `milora_init_dir`, `gradient_accumulation_steps` from `effective_batch_size`
and the process count, `bf16` and Liger from the hardware, `resume_from_checkpoint: true` to the last checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from trl import SFTConfig

from milora.data import FORMATS
from milora.init_dir import InitRecord
from milora.loading import default_dtype
from milora.model import DEFAULT_METHOD, METHODS
from milora.model_source import ModelSource, model_source

logger = logging.getLogger(__name__)

DEFAULT_RANK = 16
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message says which key is wrong and how to fix it."""


@dataclass
class DataArguments:
    """Which dataset to train on and how to read it."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (e.g. meta-math/MetaMathQA) or a local json/jsonl/parquet/csv file or "
                  "folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on (hub datasets)."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on when eval_strategy is not 'no' (hub datasets)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "alpaca|commonsense (instruction/input/output), metamath (query/response), gsm8k "
                  "(question/answer), chat (messages), prompt_completion, or auto (from the fields present)."},
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

    def __post_init__(self):
        if self.dataset_format not in FORMATS:
            raise RecipeError(f"unknown dataset_format {self.dataset_format!r}; choose one of {', '.join(FORMATS)}")


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
    method: str | None = field(
        default=None,
        metadata={"help": "milora (minor components), pissa (principal), lora (plain), mid, random (ablations). "
                  "Default: the milora_init_dir's method, else milora."},
    )
    lora_r: int | None = field(
        default=None, metadata={"help": f"Adapter rank. Default: the milora_init_dir's rank, else {DEFAULT_RANK}."}
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA alpha. Default: the milora_init_dir's alpha, else r for milora/pissa/mid/random and "
                  "2r for lora (the paper)."},
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt: name suffixes (a list or a comma string), a regex, or all-linear. "
                  f"Default: the milora_init_dir's targets, else {','.join(DEFAULT_TARGET_MODULES)}."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (LLaVA: multi_modal_projector)."},
    )
    milora_init_dir: str | None = field(
        default=None,
        metadata={"help": "Start from a `milora init` directory (residual model + initial adapter): no SVD at "
                  "start-up, the fast path for repeated runs."},
    )
    milora_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Reuse the SVD factors computed for the same weights, targets, rank and method by an "
                  "earlier run (stored there on first use): a resumed or repeated run skips the decomposition."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Train on a 4-bit base (QLoRA, QPiSSA, QMiLoRA): the decomposition reads the full-precision "
                  "weights, then the residual is quantized with bitsandbytes; the adapters keep the training dtype."},
    )
    fp8_base: bool = field(
        default=False,
        metadata={"help": "FP8 GEMMs for the frozen base: every frozen linear layer of the decoder (q, k, v, o, gate, "
                  "up, down; not lm_head, the embeddings or a vision tower) multiplies in float8 with row-wise "
                  "scales; adapters, gradients and optimizer state keep their dtypes. For H100/H200 class GPUs "
                  "(compute capability >= 8.9); opt-in; quality numbers in docs/results.md."},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": "dtype the 4-bit layers compute in. Default: dtype."}
    )
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit blocks' scales too (QLoRA's double quantization)."}
    )
    qpissa_iterations: int = field(
        default=0,
        metadata={"help": "PiSSA with load_in_4bit: refit the factors to what quantizing the residual loses, this "
                  "many times (QPiSSA; 5 in its paper). 0 keeps the principal components exactly."},
    )
    # Not a recipe key: lora_target_modules as the recipe gave it (None: not given) when a milora_init_dir's targets
    # replaced it; milora.sft.checks refuses one that selects other modules than the init directory's adapter.
    recipe_target_modules: list[str] | str | None = field(default=None, init=False, repr=False, compare=False)
    # Not a recipe key: how the milora_init_dir was made (`milora.init_dir.InitRecord`), read once here.
    init_record: InitRecord | None = field(default=None, init=False, repr=False, compare=False)
    # Not a recipe key: what the run loads (the milora_init_dir, else model_name_or_path), decided once here and
    # handed to the loaders (`milora.model_source`).
    model_source: ModelSource | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.method is not None:
            self.method = str(self.method).lower()
            if self.method not in METHODS:
                raise RecipeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.lora_r is not None and (not isinstance(self.lora_r, int) or self.lora_r < 1):
            raise RecipeError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if self.milora_init_dir is not None:
            self._take_settings_from_init_dir()
        self.method = self.method or DEFAULT_METHOD
        self.lora_r = self.lora_r or DEFAULT_RANK
        if self.lora_target_modules is None:
            self.lora_target_modules = list(DEFAULT_TARGET_MODULES)
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r if self.method == "lora" else self.lora_r
        if self.dtype is None:
            self.dtype = str(default_dtype()).removeprefix("torch.")
        loaded = self.milora_init_dir or self.model_name_or_path
        self.model_source = model_source(loaded) if loaded is not None else None
        self._check_4bit_keys()
        self._check_fp8_base()

    def _check_fp8_base(self) -> None:
        if not self.fp8_base:
            return
        if self.load_in_4bit:
            raise RecipeError("fp8_base and load_in_4bit both replace the frozen base's matrix multiplications; set "
                              "one of them")
        from milora.fp8 import fp8_unsupported_reason

        reason = fp8_unsupported_reason()
        if reason is not None:
            raise RecipeError(f"fp8_base: {reason}; drop fp8_base")

    def _check_4bit_keys(self) -> None:
        from milora.sft.quantized import check_4bit_keys

        check_4bit_keys(self)

    def four_bit_settings(self):
        """The `milora.quantization.FourBitSettings` of a `load_in_4bit` recipe, else None."""
        from milora.sft.quantized import four_bit_settings

        return four_bit_settings(self)

    def _take_settings_from_init_dir(self) -> None:
        """Method, rank, alpha and targets come from a `milora init` directory; a method, rank or alpha set here that
        differs is refused (a PiSSA recipe pointed at a MiLoRA init, a rank-32 recipe at a rank-64 init). Targets
        set here are kept in `recipe_target_modules` and compared by `milora.sft.checks.check_init_dir_targets`,
        on the modules they select (that needs the model's structure)."""
        from milora.init_dir import is_init_dir, read_init_record

        if not is_init_dir(self.milora_init_dir):
            raise RecipeError(
                f"milora_init_dir {self.milora_init_dir} is not a `milora init` directory (no "
                "milora_init/adapter_config.json); create one with `milora init --model ... --r ... --out DIR`"
            )
        if self.method == "lora":
            raise RecipeError("milora_init_dir holds an SVD init; it cannot be combined with method: lora")
        if self.lora_modules_to_save:
            raise RecipeError(
                f"lora_modules_to_save {self.lora_modules_to_save} is not applied to a milora_init_dir run (the init "
                "directory's adapter trains only its LoRA layers); drop milora_init_dir so the method is applied at "
                "start-up (under ZeRO-3 too), or drop lora_modules_to_save"
            )
        record = self.init_record = read_init_record(self.milora_init_dir)
        found = {"method": record.method, "lora_r": record.r, "lora_alpha": record.lora_alpha}
        for key in ("method", "lora_r", "lora_alpha"):
            ours = getattr(self, key)
            if ours is not None and found[key] is not None and ours != found[key]:
                raise RecipeError(
                    f"{key}: {ours} contradicts milora_init_dir {self.milora_init_dir}, which was made with "
                    f"{key} {found[key]}; use a matching init directory or drop {key} from the recipe"
                )
            setattr(self, key, found[key] if found[key] is not None else ours)
        self.recipe_target_modules = self.lora_target_modules
        self.lora_target_modules = record.target_modules


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
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step. Default: from effective_batch_size, else 1."},
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on assistant turns only (chat data). Default: on for chat data."},
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per optimizer step over all processes; sets gradient_accumulation_steps = "
                  "effective_batch_size / (per_device_train_batch_size * number of processes), and caps "
                  "per_device_train_batch_size at effective_batch_size / number of processes."},
    )
    merge: bool = field(default=False, metadata={"help": "Also save the merged full checkpoint to OUTPUT_DIR/merged."})
    save_residual_base: bool = field(
        default=False,
        metadata={"help": "For SVD methods without a milora_init_dir, also save the residual base model W - B0 A0 "
                  "(a full checkpoint) to OUTPUT_DIR/residual_base, the base residual_adapter/ applies to."},
    )
    step0_check: bool = field(
        default=True,
        metadata={"help": "Before the first step, compare the initialised model's logits on the first batch with "
                  "the base model's; stop above step0_max_error."},
    )
    step0_max_error: float | None = field(
        default=None,
        metadata={"help": "Relative logit error the step-0 check accepts. Default by the weights' dtype: 1e-4 "
                  "(float32), 5e-2 (bfloat16, float16)."},
    )

    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Replace NaN/inf step losses in the logged average (TrainingArguments' default: on). Off "
                  "here: the check reads every step's loss on the host, which makes each step wait for the GPU."},
    )

    def __post_init__(self):
        if self.accelerator_config is None and self.dataloader_pin_memory:
            # pinned batches copied without blocking: no wait for the previous step at each batch's copy
            self.accelerator_config = {"non_blocking": True}
        if self.bf16 is None:
            self.bf16 = not self.fp16 and default_dtype() == torch.bfloat16
        if self.use_liger_kernel and not liger_usable():
            warnings.warn(
                "use_liger_kernel: Liger's fused kernels need a CUDA GPU and `pip install liger-kernel` "
                "(or `pip install -e .[gpu]`); training without them.",
                stacklevel=3,
            )
            self.use_liger_kernel = False
        self.resume_from_checkpoint = resolve_resume_checkpoint(self.resume_from_checkpoint, self.output_dir)
        # Before TrainingArguments' own __post_init__: DeepSpeed's "auto" batch sizes are filled from it there.
        self._set_up_processes_without_gpus()
        self.per_device_train_batch_size = per_device_batch_size(
            self.effective_batch_size, self.per_device_train_batch_size, world_size()
        )
        self.gradient_accumulation_steps = accumulation_steps(
            self.effective_batch_size, self.per_device_train_batch_size, self.gradient_accumulation_steps,
            world_size(),
        )
        super().__post_init__()
        self._compile_layers_not_the_model()

    def _compile_layers_not_the_model(self) -> None:
        """`torch_compile: true` compiles each decoder layer in place (`milora.regional_compile`, with the recipe's
        `torch_compile_backend` / `torch_compile_mode`) instead of the Trainer compiling the whole PEFT model, which
        graph-breaks at every adapter. The Trainer is then told not to compile; `decoder_layer_compile` says how."""
        self.decoder_layer_compile = None
        if self.torch_compile:
            self.decoder_layer_compile = {"backend": self.torch_compile_backend or "inductor",
                                          "mode": self.torch_compile_mode}
            if self.torch_compile_mode == "reduce-overhead" and self.pad_to_multiple_of is None:
                warnings.warn(
                    "torch_compile_mode: reduce-overhead replays the compiled layers as CUDA graphs, recorded anew for "
                    "every batch length; set pad_to_multiple_of (the token budget of a step, or 512) so that few "
                    "lengths occur",
                    stacklevel=3,
                )
            self.torch_compile, self.torch_compile_backend, self.torch_compile_mode = False, None, None

    def _set_up_processes_without_gpus(self) -> None:
        """Several processes on CPUs (see milora.processes): DeepSpeed's CPU accelerator gets a process state with
        its backend; plain data parallel runs as accelerate's multi-CPU mode."""
        from milora.processes import several_processes_without_accelerator, share_deepspeed_cpu_process_state

        deepspeed = bool(self.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if not deepspeed and several_processes_without_accelerator():
            self.use_cpu = True
        elif share_deepspeed_cpu_process_state(deepspeed, timedelta(seconds=self.ddp_timeout)):
            config = self.accelerator_config
            if isinstance(config, str):  # a JSON file, as TrainingArguments accepts
                from milora.io import read_json

                config = read_json(config)
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
            self.accelerator_config = {**config, "use_configured_state": True}


def world_size() -> int:
    """The number of training processes: `accelerate launch`, torchrun and deepspeed set WORLD_SIZE; a plain
    `python` run is one process."""
    return int(os.environ.get("WORLD_SIZE", 1))


def per_device_batch_size(effective_batch_size: int | None, per_device: int, processes: int) -> int:
    """`per_device_train_batch_size`, capped so that one optimizer step holds no more than `effective_batch_size`
    examples over all processes: a recipe written for one GPU (16 rows in one micro-batch) runs unchanged on
    N GPUs (16 / N rows each). Unchanged without an effective batch size or where it already fits."""
    if effective_batch_size is None or per_device * processes <= effective_batch_size:
        return per_device
    capped = max(effective_batch_size // processes, 1)
    logger.warning(
        "per_device_train_batch_size %d x %d processes exceeds effective_batch_size %d: using %d per process",
        per_device, processes, effective_batch_size, capped,
    )
    return capped


def accumulation_steps(effective_batch_size: int | None, per_device: int, explicit: int | None, processes: int) -> int:
    """gradient_accumulation_steps for `effective_batch_size` examples per optimizer step on `processes` processes;
    without an effective batch size, the explicit value or 1."""
    if effective_batch_size is None:
        return 1 if explicit is None else explicit
    steps = effective_batch_size / (per_device * processes)
    if steps < 1 or not float(steps).is_integer():
        raise RecipeError(
            f"effective_batch_size {effective_batch_size} is not a multiple of per_device_train_batch_size "
            f"{per_device} x {processes} process(es)"
        )
    if explicit is not None and explicit != int(steps):
        raise RecipeError(
            f"gradient_accumulation_steps {explicit} contradicts effective_batch_size {effective_batch_size} "
            f"(which needs {int(steps)} with per_device_train_batch_size {per_device} on {processes} process(es)); "
            "set only one of them"
        )
    return int(steps)


def liger_usable() -> bool:
    """Liger's Triton kernels run on CUDA GPUs only, and only when the package is installed."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def resolve_resume_checkpoint(value, output_dir: str | None) -> str | None:
    """`true`/`last` -> the newest checkpoint in output_dir; `false`/none -> None; else a checkpoint path."""
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "none", "null", "no"):
        return None
    if text.lower() in ("true", "last", "yes"):
        from transformers.trainer_utils import get_last_checkpoint

        from milora.sft.checkpoints import last_complete_checkpoint

        last = last_complete_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
        if last is None:
            newest = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
            if newest is not None:  # a node's local copy holds only its own ranks' files: say so
                check_deepspeed_checkpoint_complete(newest)
            raise RecipeError(
                f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N directory to resume "
                "from"
            )
        return check_deepspeed_checkpoint_complete(last)
    if not os.path.isdir(text):
        raise RecipeError(f"resume_from_checkpoint {text}: no such checkpoint directory")
    return check_deepspeed_checkpoint_complete(text)


def check_deepspeed_checkpoint_complete(checkpoint: str) -> str:
    """A DeepSpeed checkpoint (`global_step*/` shards) must hold the `latest` file global rank 0 writes, or DeepSpeed
    cannot load it: on node-local disks the other nodes' copies hold only their own ranks' shards."""
    has_shards = any(name.startswith("global_step") for name in os.listdir(checkpoint))
    if has_shards and not os.path.isfile(os.path.join(checkpoint, "latest")):
        raise RecipeError(
            f"resume_from_checkpoint {checkpoint}: DeepSpeed shards without the 'latest' file the first node writes; "
            "with node-local disks copy every node's checkpoint-N/ into the same path on every node (see "
            "deepspeed_configs/README.md, several machines)"
        )
    return checkpoint
