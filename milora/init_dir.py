"""`milora init` directories: a precomputed MiLoRA/PiSSA init that training loads with no SVD.

Layout of `DIR` (what the paper's authors ship for their runs):

    DIR/                 the residual base model `W - s B0 A0` (config + safetensors) and its tokenizer/processor
    DIR/milora_init/     the initial adapter `B0, A0`: an ordinary PEFT adapter for the model in DIR
    DIR/milora_init/milora.json   how it was made (`InitRecord`: method, r, targets, source model)

`AutoModelForCausalLM.from_pretrained(DIR)` + `PeftModel.from_pretrained(..., DIR/milora_init)` is exactly
the model `apply_milora` returns, and the original weights are `merge(DIR, DIR/milora_init)`.

This module alone writes and reads `milora.json`: `save_init_dir` writes an `InitRecord`, `read_init_record`
reads one back (directories written before the method was named `method` recorded `mode`; they still load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from milora.autocast import skip_input_casts_under_autocast
from milora.fingerprint import base_module_name
from milora.io import atomic_directory, read_json, write_json
from milora.layout import ADAPTER_CONFIG_FILE, INIT_SUBDIR, METADATA_FILE

__all__ = [
    "INIT_SUBDIR", "METADATA_FILE", "InitRecord", "is_init_dir", "load_init_dir", "read_init_record",
    "residual_state_dict", "save_init_dir",
]


@dataclass(frozen=True)
class InitRecord:
    """How a `milora init` directory was made. `r`, `lora_alpha` and `target_modules` are its adapter's own
    settings (read from the adapter config); the rest is what `milora.json` records."""

    method: str | None  # milora, pissa, mid, random; None only in a directory whose metadata never named it
    r: int
    lora_alpha: float
    target_modules: list[str] | str  # the adapter config's (a list sorted, or PEFT's regex)
    targets: list[str] | str | None = None  # as given when it was made (`milora init --targets`), for messages
    source_model: str | None = None  # the model it was decomposed from: the base a standard LoRA applies to
    solver: str | None = None
    seed: int | None = None
    # the 4-bit settings and QPiSSA refits the factors were fitted for (`milora init --qpissa_iterations`)
    quantization: dict | None = None

    def metadata(self) -> dict:
        """The `milora.json` form (the adapter config holds the target modules)."""
        return {"method": self.method, "r": self.r, "lora_alpha": self.lora_alpha, "targets": self.targets,
                "source_model": self.source_model, "solver": self.solver, "seed": self.seed,
                **({"quantization": self.quantization} if self.quantization else {})}


def plain_base_key(key: str, modules_to_save: str = "original") -> str | None:
    """A PEFT model's state-dict key (its base model's, or the PEFT model's own) as the plain base model names
    it, or None for a key the plain model lacks: LoRA factors, and of a `modules_to_save` module the copy not
    kept (`modules_to_save`: "original" keeps the untouched copy, as in a residual base; "trained" the trained
    one, as in a merged model)."""
    key = base_module_name(key)
    if ".lora_" in key:
        return None
    trained = modules_to_save == "trained"
    if (".original_module." if trained else ".modules_to_save.") in key:
        return None
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key) if trained else key.replace(".original_module.", ".")


def plain_state_dict(state: dict[str, torch.Tensor], modules_to_save: str = "original") -> dict[str, torch.Tensor]:
    """`state` (a PEFT model's, or its base model's) under the plain base model's keys (`plain_base_key`)."""
    plain = {}
    for key, tensor in state.items():
        clean = plain_base_key(key, modules_to_save)
        if clean is not None:
            plain[clean] = tensor
    return plain


def residual_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with PEFT's wrappers removed: base layers (now residual) under their
    original names, no LoRA factors, the original copy of any `modules_to_save`."""
    return plain_state_dict(peft_model.get_base_model().state_dict())


def is_init_dir(path: str | Path) -> bool:
    return (Path(path) / INIT_SUBDIR / ADAPTER_CONFIG_FILE).is_file()


def save_init_dir(
    peft_model, out_dir: str | Path, processing_class=None, *, method: str | None = None,
    source_model: str | None = None, targets: list[str] | str | None = None, solver: str | None = None,
    seed: int | None = None, write_base=None, quantization: dict | None = None,
) -> Path:
    """Write the residual base model, its tokenizer/processor and the initial adapter to `out_dir`, with the
    `InitRecord` of how it was made. `method` defaults to the one `apply_milora` initialised the model with,
    `source_model` to the model's own name or path, `targets` to the adapter's target modules.

    `write_base(directory)`, if given, writes the residual base model instead of `save_pretrained` (the
    file-by-file init of `milora.sharded_init`, whose model holds no weights)."""
    from milora.model import MiLoRAError, check_method, method_of_model

    method = check_method(method) if method is not None else method_of_model(peft_model)
    if method is None:
        raise MiLoRAError(
            "save_init_dir: the model's method is unknown (it was not made by apply_milora or load_init_dir); "
            "pass method='milora', 'pissa', 'mid' or 'random'"
        )
    config = peft_model.peft_config["default"]
    record = InitRecord(
        method=method, r=config.r, lora_alpha=config.lora_alpha, target_modules=_sorted(config.target_modules),
        targets=targets if targets is not None else _sorted(config.target_modules),
        source_model=source_model or getattr(peft_model.get_base_model().config, "name_or_path", None) or None,
        solver=solver, seed=seed, quantization=quantization,
    )
    out_dir = Path(out_dir)
    config.base_model_name_or_path = str(out_dir.resolve())
    with atomic_directory(out_dir) as tmp:
        base = peft_model.get_base_model()
        if write_base is not None:
            write_base(tmp)
        else:
            base.save_pretrained(tmp, state_dict=residual_state_dict(peft_model))
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        peft_model.save_pretrained(tmp / INIT_SUBDIR)
        write_json(tmp / INIT_SUBDIR / METADATA_FILE, record.metadata(), sort_keys=True)
    return out_dir


def read_init_record(init_dir: str | Path) -> InitRecord:
    """The `InitRecord` of a `milora init` directory (see `is_init_dir`)."""
    from milora.model import method_of_mode

    adapter = read_json(Path(init_dir) / INIT_SUBDIR / ADAPTER_CONFIG_FILE)
    path = Path(init_dir) / INIT_SUBDIR / METADATA_FILE
    metadata = read_json(path) if path.is_file() else {}
    method = metadata.get("method") or metadata.get("mode")  # `mode`: the spectrum slice, as older versions wrote
    return InitRecord(
        method=method_of_mode(method) if method else None, r=adapter["r"], lora_alpha=adapter["lora_alpha"],
        target_modules=_sorted(adapter.get("target_modules")), targets=metadata.get("targets"),
        source_model=metadata.get("source_model"), solver=metadata.get("solver"), seed=metadata.get("seed"),
        quantization=metadata.get("quantization"),
    )


def load_init_dir(init_dir: str | Path, dtype="auto", is_trainable: bool = True, **model_kwargs):
    """The PEFT model stored in a `milora init` directory, ready to train (no decomposition runs)."""
    from peft import PeftModel

    from milora.loading import load_model
    from milora.model import record_method

    init_dir = Path(init_dir)
    if not is_init_dir(init_dir):
        raise FileNotFoundError(
            f"{init_dir} is not a milora init directory (no {INIT_SUBDIR}/{ADAPTER_CONFIG_FILE}); "
            "create one with `milora init --model ... --out DIR`"
        )
    model = load_model(str(init_dir), dtype=dtype, **model_kwargs)
    if "quantization_config" in model_kwargs:  # a `milora init` residual quantized on loading (load_in_4bit)
        from milora.quantization import keep_packed_format

        keep_packed_format(model)
    peft_model = PeftModel.from_pretrained(model, str(init_dir / INIT_SUBDIR), is_trainable=is_trainable)
    skip_input_casts_under_autocast(peft_model)
    record_method(peft_model, read_init_record(init_dir).method)
    return peft_model


def _sorted(targets):
    """PEFT keeps a target list as a set: sorted, so that a record compares and prints the same every time."""
    return sorted(targets) if isinstance(targets, (list, set, tuple)) else targets
