"""milora: MiLoRA, PiSSA and LoRA finetuning side by side on the Hugging Face stack.

`apply_milora(model, targets, r, method="milora")` patches a model and returns an ordinary PEFT model whose
adapters start from the minor singular components of the weights they adapt (MiLoRA), or the principal ones
(PiSSA), or PEFT's default (LoRA). `method` names that choice (`METHODS`; `mode=` is its deprecated alias), and
`solver=` the SVD algorithm (`SOLVERS`).
"""

import importlib
import logging

# bitsandbytes, which peft imports whenever it is installed, looks up a CPU kernel on the Hub on every import on a CPU
# with AVX512-BF16, and logs when it cannot have it (its own CPU code runs instead): that the optional `kernels`
# package is missing or the kernel is not there, and, from `kernels` (which transformers >= 5.25 installs), that the
# Hub is offline. Only those messages about that kernel are dropped.
BITSANDBYTES_CPU_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BITSANDBYTES_CPU_KERNEL_OFFLINE_NOTICE = (
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith(BITSANDBYTES_CPU_KERNELS_NOTICE)
)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not str(record.msg).startswith(BITSANDBYTES_CPU_KERNEL_OFFLINE_NOTICE)
)

# Public names and the module each lives in. They load on first use (PEP 562), so that `import milora.prompts`
# or `milora --help` does not pay for torch, transformers and peft.
_EXPORTS = {
    **dict.fromkeys(("convert_to_lora", "merge_adapter", "merge_checkpoint"), "milora.conversion"),
    **dict.fromkeys(("MODES", "SOLVERS", "SingularComponents", "lora_factors", "residual_weight",
                     "singular_components"), "milora.decomposition"),
    **dict.fromkeys(("is_init_dir", "load_init_dir", "save_init_dir"), "milora.init_dir"),
    **dict.fromkeys(("METHOD_MODES", "METHODS", "MODE_ALIASES", "MiLoRAError", "apply_milora", "method_of_mode",
                     "normalize_mode", "resolve_target_modules"), "milora.model"),
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'milora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [  # noqa: F822 (loaded on first use by __getattr__)
    "METHODS",
    "METHOD_MODES",
    "MODES",
    "MODE_ALIASES",
    "SOLVERS",
    "MiLoRAError",
    "SingularComponents",
    "apply_milora",
    "convert_to_lora",
    "is_init_dir",
    "load_init_dir",
    "lora_factors",
    "merge_adapter",
    "merge_checkpoint",
    "method_of_mode",
    "normalize_mode",
    "residual_weight",
    "resolve_target_modules",
    "save_init_dir",
    "singular_components",
]
