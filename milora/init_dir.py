"""`milora init` directories: a precomputed MiLoRA/PiSSA init that training loads with no SVD.

Layout of `DIR` (what the paper's authors ship for their runs):

    DIR/                 the residual base model `W - s B0 A0` (config + safetensors) and its tokenizer/processor
    DIR/milora_init/     the initial adapter `B0, A0`: an ordinary PEFT adapter for the model in DIR
    DIR/milora_init/milora.json   how it was made (mode, r, targets, source model)

`AutoModelForCausalLM.from_pretrained(DIR)` + `PeftModel.from_pretrained(..., DIR/milora_init)` is exactly
the model `apply_milora` returns, and the original weights are `merge(DIR, DIR/milora_init)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from milora.autocast import skip_input_casts_under_autocast
from milora.io import atomic_directory, read_json, write_json
from milora.layout import ADAPTER_CONFIG_FILE, INIT_SUBDIR, METADATA_FILE

__all__ = [
    "INIT_SUBDIR", "METADATA_FILE", "is_init_dir", "load_init_dir", "read_metadata", "residual_state_dict",
    "save_init_dir",
]


def residual_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with PEFT's wrappers removed: base layers (now residual) under their
    original names, no LoRA factors, the original copy of any `modules_to_save`."""
    state = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        clean = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[clean] = tensor
    return state


def is_init_dir(path: str | Path) -> bool:
    return (Path(path) / INIT_SUBDIR / ADAPTER_CONFIG_FILE).is_file()


def save_init_dir(peft_model, out_dir: str | Path, processing_class=None, metadata: dict | None = None,
                  write_base=None) -> Path:
    """Write the residual base model, its tokenizer/processor and the initial adapter to `out_dir`.

    `write_base(directory)`, if given, writes the residual base model instead of `save_pretrained` (the
    file-by-file init of `milora.sharded_init`, whose model holds no weights)."""
    out_dir = Path(out_dir)
    peft_model.peft_config["default"].base_model_name_or_path = str(out_dir.resolve())
    with atomic_directory(out_dir) as tmp:
        base = peft_model.get_base_model()
        if write_base is not None:
            write_base(tmp)
        else:
            base.save_pretrained(tmp, state_dict=residual_state_dict(peft_model))
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
        peft_model.save_pretrained(tmp / INIT_SUBDIR)
        write_json(tmp / INIT_SUBDIR / METADATA_FILE, metadata or {}, sort_keys=True)
    return out_dir


def load_init_dir(init_dir: str | Path, dtype="auto", is_trainable: bool = True, **model_kwargs):
    """The PEFT model stored in a `milora init` directory, ready to train (no decomposition runs)."""
    from peft import PeftModel

    from milora.loading import load_model

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
    return peft_model


def read_metadata(init_dir: str | Path) -> dict:
    path = Path(init_dir) / INIT_SUBDIR / METADATA_FILE
    return read_json(path) if path.is_file() else {}
