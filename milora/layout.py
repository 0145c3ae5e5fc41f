"""Names of the files and directories milora writes, in one place so that writers and readers agree.

A `milora init` directory DIR holds the residual base model, the initial adapter in `DIR/INIT_SUBDIR/` and,
beside that adapter, `METADATA_FILE` (how the init was made).

A training run's output directory (layout in the README, "Outputs"):
- the root holds the adapter for the ORIGINAL base model (for the SVD methods the rank-2r standard LoRA),
  `MODEL_CARD_FILE`, the tokenizer and `RUN_INFO_FILE`;
- `RESIDUAL_ADAPTER_DIR/` the adapter as trained (rank r), for the residual base `W - B0 A0`;
- `INIT_ADAPTER_DIR/` the adapter as initialised, for the same residual base;
- `RESIDUAL_BASE_DIR/` the residual base model itself (`save_residual_base: true`);
- `MERGED_DIR/` a full checkpoint (`merge: true`).
Every adapter folder holds `ADAPTER_RECORD_FILE`: the base it applies to and that base's fingerprint
(`milora.fingerprint`). Output directories written before this layout had the residual adapter at the root and
the standard LoRA in `LEGACY_STANDARD_LORA_DIR/`.
"""

from __future__ import annotations

# `milora init` directories
INIT_SUBDIR = "milora_init"
METADATA_FILE = "milora.json"

# PEFT's file names
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

# beside every adapter milora writes: which base it applies to (milora.fingerprint)
ADAPTER_RECORD_FILE = "milora_adapter.json"

# training-run outputs
RESIDUAL_ADAPTER_DIR = "residual_adapter"
INIT_ADAPTER_DIR = "milora_init_adapter"
RESIDUAL_BASE_DIR = "residual_base"
MERGED_DIR = "merged"
RUN_INFO_FILE = "milora_run.json"
MODEL_CARD_FILE = "README.md"
LEGACY_STANDARD_LORA_DIR = "lora_adapter"

__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_RECORD_FILE", "ADAPTER_WEIGHTS_FILE", "INIT_ADAPTER_DIR", "INIT_SUBDIR",
    "LEGACY_STANDARD_LORA_DIR", "MERGED_DIR", "METADATA_FILE", "MODEL_CARD_FILE", "RESIDUAL_ADAPTER_DIR",
    "RESIDUAL_BASE_DIR", "RUN_INFO_FILE",
]
