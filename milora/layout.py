"""Names of the files and directories milora writes, in one place so that writers and readers agree.

A `milora init` directory DIR holds the residual base model, the initial adapter in `DIR/INIT_SUBDIR/` and,
beside that adapter, `METADATA_FILE` (how the init was made). A training run's output directory holds the
trained adapter and, for the SVD modes, `INIT_ADAPTER_DIR/` (the adapter as initialised), `STANDARD_LORA_DIR/`
(the rank-2r LoRA for the original base), `MERGED_DIR/` (a full checkpoint) and `RUN_INFO_FILE`.
"""

from __future__ import annotations

# `milora init` directories
INIT_SUBDIR = "milora_init"
METADATA_FILE = "milora.json"

# PEFT's adapter config file name
ADAPTER_CONFIG_FILE = "adapter_config.json"

# training-run outputs
INIT_ADAPTER_DIR = "milora_init_adapter"
STANDARD_LORA_DIR = "lora_adapter"
MERGED_DIR = "merged"
RUN_INFO_FILE = "milora_run.json"

__all__ = [
    "ADAPTER_CONFIG_FILE", "INIT_ADAPTER_DIR", "INIT_SUBDIR", "MERGED_DIR", "METADATA_FILE", "RUN_INFO_FILE",
    "STANDARD_LORA_DIR",
]
