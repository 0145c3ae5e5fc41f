"""milora: MiLoRA, PiSSA and LoRA finetuning side by side on the Hugging Face stack.

`apply_milora(model, targets, r, method="milora")` patches a model and returns an ordinary PEFT model whose
adapters start from the minor singular components of the weights they adapt (MiLoRA), or the principal ones
(PiSSA), or PEFT's default (LoRA). `method` names the family (`METHODS`), `mode=` the same choice by the slice
of the spectrum (`MODES`: minor, principal, mid, random), and `solver=` the SVD algorithm (`SOLVERS`).
"""

from milora.conversion import convert_to_lora, merge_adapter, merge_checkpoint
from milora.decomposition import (
    MODES,
    SOLVERS,
    SingularComponents,
    lora_factors,
    residual_weight,
    singular_components,
)
from milora.init_dir import is_init_dir, load_init_dir, save_init_dir
from milora.model import (
    METHOD_MODES,
    METHODS,
    MODE_ALIASES,
    MiLoRAError,
    apply_milora,
    method_of_mode,
    normalize_mode,
    resolve_target_modules,
)

__version__ = "0.1.0"

__all__ = [
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
