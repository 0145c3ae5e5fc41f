"""Which weights `--base`, `--tuned` and `--adapter` stand for, and loading them as merged in-memory models.

A model argument is a merged checkpoint (local directory or hub id), `tiny:<kind>`, a PEFT adapter directory,
or a `milora init` directory DIR: the RESIDUAL base model (W - s B0 A0, s the LoRA scaling) with its initial
adapter in DIR/milora_init/ (an ordinary PEFT adapter directory). The rules:

- `--base DIR` (init dir): the true base is DIR + merge(DIR/milora_init), i.e. the original W.
- `--base M` (checkpoint): M.
- `--tuned M` (checkpoint): M; `--tuned DIR` (init dir): DIR + merge(DIR/milora_init).
- `--tuned ADAPTER` (adapter dir) or `--adapter ADAPTER` without `--tuned`: the adapter merged onto the
  model it was trained from, which is the raw `--base` path: for an init dir that is the residual DIR, so
  tuned = DIR + merge(ADAPTER) (an adapter trained from `milora init` holds B A, not B A - B0 A0).
- `--tuned M --adapter ADAPTER`: M (raw, even if an init dir) + merge(ADAPTER).

Adapters are merged in memory with PEFT (`PeftModel.from_pretrained(...).merge_and_unload()`), in the load
dtype: float32 by default, so that a small update is not lost to bf16 rounding when merged.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from milora.init_dir import is_init_dir, read_init_record
from milora.io import read_json
from milora.layout import ADAPTER_CONFIG_FILE, INIT_SUBDIR

DEFAULT_RANK = 8


class AnalysisInputError(ValueError):
    """A command-line input that cannot be analysed as given (reported as a usage error, not a crash)."""


def is_milora_init_dir(path: str | os.PathLike | None) -> bool:
    """A `milora init` directory: holds `milora_init/adapter_config.json`."""
    return path is not None and is_init_dir(path)


def is_adapter_dir(path: str | os.PathLike | None) -> bool:
    """A PEFT adapter directory: `adapter_config.json` and no model `config.json`."""
    if path is None:
        return False
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file() and not (Path(path) / "config.json").is_file()


def adapter_rank(adapter_dir: str | os.PathLike) -> int | None:
    """The LoRA rank `r` in an adapter's config, or None if it has none."""
    config = read_json(Path(adapter_dir) / ADAPTER_CONFIG_FILE)
    rank = config.get("r")
    return int(rank) if isinstance(rank, int) else None


@dataclass
class ModelSource:
    """The weights one side of the comparison stands for: `model` (raw), plus `adapter` merged on top."""

    model: str
    adapter: str | None = None
    kind: str = "checkpoint"  # checkpoint | milora_init_dir | checkpoint+adapter

    def describe(self) -> dict:
        """JSON form, with how a `milora init` directory was made (method, r, ...) for one."""
        description = asdict(self)
        if self.kind == "milora_init_dir":
            description["init_metadata"] = asdict(read_init_record(self.model))
        return description


def resolve_sources(base: str, tuned: str | None = None, adapter: str | None = None) -> tuple[ModelSource, ModelSource]:
    """Apply the rules in the module docstring to the three command-line arguments."""
    if is_adapter_dir(base):
        raise AnalysisInputError(f"--base {base} is an adapter directory; give the model it applies to as --base")
    if tuned is None and adapter is None:
        raise AnalysisInputError("give the finetuned model: --tuned (checkpoint or adapter dir) and/or --adapter")
    if adapter is not None and not is_adapter_dir(adapter):
        raise AnalysisInputError(f"--adapter {adapter} has no {ADAPTER_CONFIG_FILE}")
    if is_milora_init_dir(base):
        base_source = ModelSource(base, str(Path(base) / INIT_SUBDIR), "milora_init_dir")
    else:
        base_source = ModelSource(base)

    if adapter is not None:
        tuned_source = ModelSource(tuned if tuned is not None else base, adapter, "checkpoint+adapter")
    elif is_adapter_dir(tuned):
        tuned_source = ModelSource(base, tuned, "checkpoint+adapter")
    elif is_milora_init_dir(tuned):
        tuned_source = ModelSource(tuned, str(Path(tuned) / INIT_SUBDIR), "milora_init_dir")
    else:
        tuned_source = ModelSource(tuned)
    return base_source, tuned_source


def default_rank(base_source: ModelSource, tuned_source: ModelSource) -> tuple[int, str]:
    """The r of the principal/minor split when the user gives none: the base's `milora_init` adapter rank,
    else the tuned adapter's rank, else 8. Returns (r, where it came from)."""
    for source, label in ((base_source, "base adapter"), (tuned_source, "tuned adapter")):
        if source.adapter is not None:
            rank = adapter_rank(source.adapter)
            if rank is not None:
                return rank, f"{label} {source.adapter}"
    return DEFAULT_RANK, "default"


def source_warnings(tuned_source: ModelSource) -> list[str]:
    """Warnings about a likely mix-up: an adapter trained from a `milora init` directory (its config names that
    directory, as `milora init` writes it) merged onto a model that is not an init directory. Its B A already
    contains B0 A0, so merging it onto the original weights would count the initial adapter as an update."""
    if tuned_source.adapter is None or is_milora_init_dir(tuned_source.model):
        return []
    config = read_json(Path(tuned_source.adapter) / ADAPTER_CONFIG_FILE)
    trained_from = config.get("base_model_name_or_path")
    if not trained_from or not is_milora_init_dir(trained_from):
        return []
    if Path(tuned_source.adapter).resolve() == (Path(trained_from) / INIT_SUBDIR).resolve():
        return []  # the initial adapter itself, merged where the user asked
    return [
        f"adapter {tuned_source.adapter} was trained from the milora init directory {trained_from}, but is merged "
        f"onto {tuned_source.model}; pass --base {trained_from} so that dW = B A - B0 A0"
    ]


def merge_adapter_in_memory(model, adapter_dir: str):
    """`model` with the PEFT adapter at `adapter_dir` merged into its weights (no disk writes)."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter_dir)
    # The saved A, B are loaded as they are; an init such as "pissa" must not run again on the base weights.
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    peft_model = PeftModel.from_pretrained(model, adapter_dir, config=config)
    return peft_model.merge_and_unload()


def load_source(source: ModelSource, dtype: str = "float32"):
    """The in-memory model `source` stands for (eval mode, on the CPU)."""
    from milora.loading import load_model

    model = load_model(source.model, dtype=dtype)
    if source.adapter is not None:
        model = merge_adapter_in_memory(model, source.adapter)
    return model.eval()


def load_tokenizer(*candidates: str | None):
    """The tokenizer saved with the first candidate path that has one (a processor's tokenizer for LLaVA).

    Raises the last loading error when none has one.
    """
    from milora.loading import load_processing_class

    error: Exception | None = None
    for path in candidates:
        if path is None:
            continue
        try:
            processing_class = load_processing_class(path)
        except Exception as exc:  # noqa: BLE001 - try the next candidate, report the last failure
            error = exc
            continue
        return getattr(processing_class, "tokenizer", processing_class)
    raise error if error is not None else ValueError("no tokenizer candidates given")
