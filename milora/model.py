"""`apply_milora`: turn a Hugging Face model into a PEFT model whose LoRA adapters start from chosen
singular components of the weights they adapt (MiLoRA, PiSSA, ablations) or from PEFT's default (LoRA).

The adapters are ordinary PEFT LoRA layers; only their initial values and the frozen base weights
(the residual `W - scaling * B A`) differ from plain LoRA. The math lives in `milora.decomposition`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from transformers.pytorch_utils import Conv1D

from milora.autocast import skip_input_casts_under_autocast
from milora.decomposition import DEFAULT_SOLVER, MODES
from milora.distributed import initialize_layers, is_zero3_partitioned, lora_layers
from milora.errors import MiLoRAError
from milora.quantization import is_quantized_module, quantize_base, refit_for, refuse_quantized, requantize_residual
from milora.streaming import check_finite

# The method families a recipe or `apply_milora(method=...)` names, and the slice of the spectrum each one
# initialises from (`milora.decomposition.MODES`; None = PEFT's default LoRA init, base weights untouched).
METHODS = ("milora", "pissa", "lora", "mid", "random")
DEFAULT_METHOD = "milora"
METHOD_MODES = {"milora": "minor", "pissa": "principal", "lora": None, "mid": "mid", "random": "random"}
# Every name the deprecated `mode=` accepts: the spectrum slices and the method names.
MODE_ALIASES = {**{mode: mode for mode in MODES}, **METHOD_MODES}
_REGEX_CHARS = set("^$*+?[](){}|\\")


def check_method(method: str) -> str:
    """The method name, lower-cased; a `MiLoRAError` naming the choices for any other name."""
    key = str(method).lower()
    if key not in METHODS:
        raise MiLoRAError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return key


def normalize_mode(mode: str) -> str | None:
    """The spectrum slice for a mode or method name (`milora` -> `minor`, `lora` -> None)."""
    key = str(mode).lower()
    if key not in MODE_ALIASES:
        raise MiLoRAError(
            f"unknown mode {mode!r}; choose one of {', '.join(MODE_ALIASES)} "
            "(milora = minor, pissa = principal, lora = plain LoRA)"
        )
    return MODE_ALIASES[key]


def method_of_mode(mode: str | None) -> str:
    """The method for a mode or method name (`minor` -> `milora`, None -> `lora`); reads what older versions
    wrote, where the choice was named by its spectrum slice."""
    slice_ = None if mode is None else normalize_mode(mode)
    return next(method for method, m in METHOD_MODES.items() if m == slice_)


def resolve_method(method: str | None, mode: str | None = None) -> str:
    """The method from `method=`, or from `mode=`, its deprecated alias (warns; removed in the next release)."""
    if mode is not None:
        warnings.warn(
            f"mode={mode!r} is deprecated and will be removed in the next release; pass method="
            f"{method_of_mode(mode)!r} instead (one of {', '.join(METHODS)})", FutureWarning, stacklevel=3,
        )
        if method is not None and check_method(method) != method_of_mode(mode):
            raise MiLoRAError(f"mode={mode!r} and method={method!r} disagree; pass method only")
        return method_of_mode(mode)
    return check_method(method) if method is not None else DEFAULT_METHOD


def record_method(peft_model, method: str | None) -> None:
    """Remember on the model which method initialised it (`save_init_dir` records it; `method_of_model`)."""
    peft_model.milora_method = method


def method_of_model(peft_model) -> str | None:
    """The method `apply_milora` (or `load_init_dir`) initialised `peft_model` with; None for other models."""
    return peft_model.__dict__.get("milora_method")


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D))


def language_model_prefix(model: torch.nn.Module) -> str | None:
    """For vision-language models (LLaVA), the module path of the language tower; None for text models.

    Only the language model is adapted there: the vision tower and projector keep their weights even
    where their layers share names (q_proj, ...) with the language model's.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "text_config", None) is None or getattr(config, "vision_config", None) is None:
        return None
    for name in ("model.language_model", "language_model"):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    raise MiLoRAError(f"{type(model).__name__} has a vision config but no language_model submodule to adapt")


def _split_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")] if not _REGEX_CHARS & set(targets) else [targets]
    targets = [t for t in targets if t]
    if not targets:
        raise MiLoRAError("no target modules given; pass names such as ['q_proj', 'v_proj'] or 'all-linear'")
    return list(targets)


def _matches(name: str, target: str) -> bool:
    if _REGEX_CHARS & set(target):
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def resolve_target_modules(model: torch.nn.Module, targets) -> list[str]:
    """Full names of the modules `targets` selects (suffixes like `q_proj`, regexes, or `all-linear`).

    Raises a `MiLoRAError` that lists existing module names when nothing matches, and names the module
    when a match is not a linear layer.
    """
    targets = _split_targets(targets)
    prefix = language_model_prefix(model)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_scope = [
        (name, module)
        for name, module in model.named_modules()
        if name and (prefix is None or name.startswith(prefix + "."))
    ]
    if targets == ["all-linear"]:
        return [n for n, m in in_scope if _adaptable(m) and m is not output_layer]

    selected = [(n, m) for n, m in in_scope if any(_matches(n, t) for t in targets)]
    if not selected:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in in_scope if _adaptable(m)})
        scope = f" inside {prefix}" if prefix else ""
        raise MiLoRAError(
            f"target modules {targets} matched no module{scope}. Linear layers that exist here: "
            f"{', '.join(linear_names[:20])}. Pass some of those names, a regex, or 'all-linear'."
        )
    for name, module in selected:
        if not _adaptable(module):
            raise MiLoRAError(
                f"target {name!r} is a {type(module).__name__}, not a linear layer; MiLoRA adapts nn.Linear "
                "and Conv1D weights. Narrow the targets to linear layers (e.g. 'q_proj' instead of 'self_attn')."
            )
    return [n for n, _ in selected]


def _peft_target_modules(model, targets, names: list[str]):
    """What to put in LoraConfig.target_modules: the user's compact spelling when PEFT's own matching picks
    exactly `names`, else the explicit list of full names (e.g. to keep LLaVA's vision tower out)."""
    targets = _split_targets(targets)
    if targets == ["all-linear"]:
        return names
    if any(_REGEX_CHARS & set(t) for t in targets):
        candidates = ["|".join(f"(?:{t})" for t in targets)]
    else:
        all_matches = [n for n, _ in model.named_modules() if n and any(_matches(n, t) for t in targets)]
        if all_matches == names:
            return targets
        prefix = language_model_prefix(model) or ""
        candidates = [rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, targets))})"]
    for pattern in candidates:  # a compact regex when it selects exactly `names`
        if [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)] == names:
            return pattern
    return names


def check_weight(name: str, weight: torch.Tensor, r: int, values: bool = True) -> None:
    """Refuse weights MiLoRA cannot decompose, with a message that says what to do. `values=False` leaves
    the NaN/inf check to the decomposition device (`milora.streaming.check_finite`)."""
    if not torch.is_floating_point(weight) or weight.dtype not in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64
    ):
        raise MiLoRAError(
            f"{name}: weight dtype {weight.dtype} is not a float type (quantized layers cannot be decomposed). "
            "Load the model in bfloat16/float16/float32, run `milora init`, and quantize the residual model "
            "it writes afterwards."
        )
    shape = tuple(weight.ds_shape) if is_zero3_partitioned(weight) else tuple(weight.shape)
    if weight.numel() == 0 and not is_zero3_partitioned(weight):
        raise MiLoRAError(f"{name}: the weight is empty; load real weights before initialising.")
    smaller = min(shape)
    if r > smaller:
        raise MiLoRAError(
            f"{name}: rank r={r} is larger than the layer's smaller dimension {smaller} "
            f"(weight shape {shape}); choose r <= {smaller} or leave this layer out of the targets."
        )
    if values and not is_zero3_partitioned(weight):
        check_finite(name, weight)


def _check_values_on_host(weight: torch.Tensor, device) -> bool:
    """Whether to look for NaN/inf where the weight lives: not for weights streamed to another device for the
    decomposition (checked there, where it costs nothing) nor for weights on the meta device."""
    streamed = device is not None and torch.device(device).type != weight.device.type
    return not streamed and weight.device.type != "meta"


def wrap_model(
    model: torch.nn.Module,
    targets: str | Iterable[str],
    r: int,
    *,
    method: str = DEFAULT_METHOD,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    device: torch.device | str | None = None,
    adapter_values: bool = True,
    **lora_kwargs,
) -> PeftModel:
    """`model` checked and wrapped in PEFT LoRA layers as `apply_milora` configures them, not yet initialised
    (PEFT's default LoRA init, base weights untouched). The weights may be on the meta device (their values are
    then not checked): `milora.sharded_init` builds the adapter that way. `adapter_values=False` leaves the LoRA
    weights on the meta device, without values, for `milora.distributed.set_factors` to fill: PEFT's random init
    of 400 adapters at 70B shapes takes seconds on the CPU, and every SVD method overwrites it. Other arguments as
    in `apply_milora`."""
    method = check_method(method)
    if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules()):
        raise MiLoRAError("the model already carries LoRA layers; pass the plain base model to apply_milora")
    if not isinstance(r, int) or r < 1:
        raise MiLoRAError(f"rank r must be a positive integer, got {r!r}")
    names = resolve_target_modules(model, targets)
    for name in names:
        module = model.get_submodule(name)
        if method == "lora" and is_quantized_module(module):
            continue  # QLoRA on a model loaded in 4 bits: nothing to decompose
        refuse_quantized(name, module)
        weight = transpose(module.weight, isinstance(module, Conv1D))
        check_weight(name, weight, r, values=_check_values_on_host(module.weight, device))

    if lora_alpha is None:
        lora_alpha = 2 * r if method == "lora" else r
    task_type = lora_kwargs.pop("task_type", _default_task_type(model))
    uses_conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in names)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=_peft_target_modules(model, targets, names),
        fan_in_fan_out=lora_kwargs.pop("fan_in_fan_out", uses_conv1d),
        task_type=task_type,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=not adapter_values)
    skip_input_casts_under_autocast(peft_model)
    return peft_model


def apply_milora(
    model: torch.nn.Module,
    targets: str | Iterable[str],
    r: int,
    *,
    method: str | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    device: torch.device | str | None = None,
    solver: str = DEFAULT_SOLVER,
    seed: int = 0,
    show_progress: bool = True,
    cache_dir: str | None = None,
    workers: int | None = None,
    transfer_stats=None,
    quantization=None,
    quantization_iterations: int = 0,
    quantize_residual: bool = True,
    mode: str | None = None,
    **lora_kwargs,
) -> PeftModel:
    """Wrap `model` in a PEFT LoRA model (adapter `default`) initialised by `method`.

    Args:
        model: any Hugging Face model with linear (or GPT-2 Conv1D) layers; for LLaVA only the language
            model is adapted.
        targets: module name suffixes (`["q_proj", "v_proj"]` or `"q_proj,v_proj"`), a regex matched
            against full module names, or `"all-linear"`.
        r: adapter rank.
        method: `milora` (the last r singular triplets, the default), `pissa` (the first r), `mid`, `random`
            (paper Table 6), or `lora` (PEFT's default init; the base weights stay untouched).
        lora_alpha: defaults to `r` (scaling 1) for the SVD modes and `2 * r` for plain LoRA, the
            paper's settings. Any alpha keeps the output unchanged at init (S is divided by the scaling).
        device: where to run the decomposition (e.g. "cuda" for a model still on CPU); defaults to each
            weight's device.
        solver: the algorithm: `auto` (default), `gram`, `subspace` or `svd`; see `milora.decomposition`.
        seed: seeds the `random` mode.
        cache_dir: reuse (or store) the computed factors there, keyed by weights, targets, r, method, seed.
        workers: decompositions in flight at once on a GPU, each on its own CUDA stream (default 4; 1 on CPU).
            Weights that live off `device` (a model in CPU memory, `device="cuda"`) are streamed there and back
            through pinned buffers, so the GPU holds about `workers` matrices at a time (`milora.streaming`).
        transfer_stats: a `milora.streaming.TransferStats` that collects the bytes copied and their device time.
        quantization: a `milora.quantization.FourBitSettings`: after the decomposition (which reads the
            full-precision weights) the residual and the other linear layers of the (language) model are quantized
            to 4 bits (on `device` when given), as QLoRA does; the factors keep the training dtype.
        quantization_iterations: QPiSSA's refits of the factors to what quantizing the residual loses
            (`milora.quantization.refit_factors`); 0 keeps the chosen singular components exactly.
        quantize_residual: False refits the factors for `quantization` but leaves the residual in full precision
            (`milora init`, whose residual a recipe quantizes on loading).
        mode: deprecated alias of `method` (also by spectrum slice: `minor`, `principal`); warns, and goes in
            the next release.
        **lora_kwargs: passed to `peft.LoraConfig` (`modules_to_save`, `use_rslora`, `task_type`, ...).

    Under torch.distributed the layers are split across ranks and broadcast; under DeepSpeed ZeRO-3
    they are gathered group by group (see `milora.distributed`). Every rank ends with the same factors.
    Under autocast the LoRA layers skip PEFT's float32 copy of their input (`milora.autocast`).
    """
    method = resolve_method(method, mode)
    if quantization_iterations and (quantization is None or method == "lora"):
        raise MiLoRAError("quantization_iterations refit SVD factors to a 4-bit residual: pass quantization= and an "
                          "SVD method (pissa, milora, ...)")
    if quantization is not None and quantize_residual and method == "lora":
        quantize_base(model, quantization, device, lora_kwargs.get("modules_to_save"))  # QLoRA
    # the SVD methods write every LoRA weight: PEFT need not draw random ones first (not under ZeRO-3, whose
    # partitioned LoRA weights are written in place)
    adapter_values = method == "lora" or _under_zero3(model)
    peft_model = wrap_model(model, targets, r, method=method, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            device=device, adapter_values=adapter_values, **lora_kwargs)
    record_method(peft_model, method)
    if method == "lora":
        return peft_model
    layers = lora_layers(peft_model)
    storage_dtype = layers[0][1].get_base_layer().weight.dtype

    unchecked = any(not _check_values_on_host(layer.get_base_layer().weight, device)
                    for _, layer in layers)
    initialize_layers(
        layers, METHOD_MODES[method], device=device, solver=solver, seed=seed,
        show_progress=show_progress, cache_dir=cache_dir, description=f"MiLoRA init ({method}, r={r})",
        workers=workers, stats=transfer_stats, check_values=unchecked,
        refit=refit_for(quantization, quantization_iterations, storage_dtype),
    )
    if quantization is not None and quantize_residual:
        peft_model = requantize_residual(peft_model, quantization, device)
        skip_input_casts_under_autocast(peft_model)
    if torch.cuda.is_available():
        # the float64 workspaces stay cached for the decomposition's side streams, where training cannot reuse
        # them: hand them back to the device
        torch.cuda.empty_cache()
    return peft_model


def _under_zero3(model: torch.nn.Module) -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or any(is_zero3_partitioned(p) for p in model.parameters())


def _default_task_type(model: torch.nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "ForConditionalGeneration")):
        return "CAUSAL_LM"
    return None


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "METHOD_MODES",
    "MODES",
    "MODE_ALIASES",
    "MiLoRAError",
    "apply_milora",
    "check_method",
    "check_weight",
    "language_model_prefix",
    "method_of_mode",
    "method_of_model",
    "normalize_mode",
    "record_method",
    "resolve_method",
    "resolve_target_modules",
    "wrap_model",
]
