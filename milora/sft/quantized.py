"""What `load_in_4bit` adds to a recipe run: the checks of its keys, its `FourBitSettings`, and in its outputs how far
the standard LoRA, applied to the full-precision original base, is from the trained 4-bit model, measured on rows
of the training data and stated in the adapter's model card.

The trained model computes `dequant(Q(W_res)) + s B A`; the standard LoRA on the original base computes
`W + s (B A - B0 A0) = W_res + s B A`. They differ by the residual's quantization error `W_res - dequant(Q(W_res))`,
which training does not change (the base is frozen) and the conversion cannot remove.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from milora.sft.config import RecipeError

LOGGER = logging.getLogger(__name__)
PROBE_ROWS = 2
PROBE_TOKENS = 128


def check_4bit_keys(model_args) -> None:
    """Refuse 4-bit keys that cannot work together (`ModelArguments.__post_init__` calls it)."""
    from milora.quantization import QUANT_TYPES

    if model_args.bnb_4bit_quant_type not in QUANT_TYPES:
        raise RecipeError(
            f"bnb_4bit_quant_type {model_args.bnb_4bit_quant_type!r}: choose one of {', '.join(QUANT_TYPES)}"
        )
    iterations = model_args.qpissa_iterations
    if not isinstance(iterations, int) or iterations < 0:
        raise RecipeError(f"qpissa_iterations must be a non-negative integer, got {iterations!r}")
    if iterations and not (model_args.load_in_4bit and model_args.method == "pissa"):
        raise RecipeError(
            "qpissa_iterations refits PiSSA's factors to a 4-bit residual: it needs method: pissa and "
            "load_in_4bit: true (for MiLoRA the refits would replace the minor components by the quantization "
            "error's principal ones; docs/quantization.md)"
        )
    init_dir = model_args.milora_init_dir
    if model_args.load_in_4bit and init_dir is not None:
        record = getattr(model_args, "init_record", None)
        made = (record.quantization if record is not None else None) or {}
        ours = {"quant_type": model_args.bnb_4bit_quant_type, "nested": bool(model_args.use_bnb_nested_quant)}
        if made and any(made.get(k) != v for k, v in ours.items()):
            raise RecipeError(
                f"milora_init_dir {init_dir} refitted its factors for 4-bit {made}, this recipe quantizes with "
                f"{ours}; use the init's bnb_4bit_quant_type / use_bnb_nested_quant"
            )
    if iterations and init_dir is not None:
        raise RecipeError("qpissa_iterations run at initialisation; with a milora_init_dir pass them to `milora "
                          "init --qpissa_iterations N` instead")


def four_bit_settings(model_args):
    """The `milora.quantization.FourBitSettings` of a `load_in_4bit` recipe, else None."""
    if not model_args.load_in_4bit:
        return None
    from milora.loading import resolve_dtype
    from milora.quantization import FourBitSettings

    compute = resolve_dtype(model_args.bnb_4bit_compute_dtype or model_args.dtype)
    return FourBitSettings(model_args.bnb_4bit_quant_type, None if compute == "auto" else compute,
                           bool(model_args.use_bnb_nested_quant))


def probe_input_ids(dataset, rows: int = PROBE_ROWS, tokens: int = PROBE_TOKENS) -> torch.Tensor | None:
    """The first `rows` tokenized training rows, cut to the shortest of them and at most `tokens` long."""
    if dataset is None or "input_ids" not in getattr(dataset, "column_names", ()):
        return None
    ids = [list(dataset[i]["input_ids"]) for i in range(min(rows, len(dataset)))]
    if not ids:
        return None
    length = min(tokens, *(len(row) for row in ids))
    return torch.tensor([row[:length] for row in ids])


@torch.no_grad()
def logits_difference(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Relative Frobenius difference of two logit tensors, the largest log-probability difference and how often
    the most likely next token agrees."""
    reference, other = reference.to(torch.float64), other.to(torch.float64)
    logp_ref, logp = reference.log_softmax(-1), other.log_softmax(-1)
    return {
        "relative_logits_difference": float((reference - other).norm() / reference.norm()),
        "max_abs_logprob_difference": float((logp_ref - logp).abs().max()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).double().mean()),
        "tokens": int(reference.shape[0] * reference.shape[1]),
    }


@torch.no_grad()
def standard_lora_difference(trained_model, base_model: str, adapter_dir: str | Path, input_ids: torch.Tensor,
                             dtype: torch.dtype) -> dict | None:
    """Logits of the original base + the standard LoRA at `adapter_dir` (loaded in `dtype` on the trained model's
    GPU where it fits there, else on the CPU) against the trained 4-bit model's, on `input_ids`; None where it
    cannot run (on the CPU with Liger's CUDA-only kernels patched in)."""
    from peft import PeftModel

    from milora.loading import load_model

    original = PeftModel.from_pretrained(load_model(base_model, dtype=dtype), str(adapter_dir)).eval()
    device = next(p.device for p in trained_model.parameters())
    if device.type == "cuda" and _fits_on(original, device):
        original.to(device)
    elif _uses_cuda_only_kernels(original):
        LOGGER.warning("the standard LoRA's difference to the 4-bit model is not measured: the full-precision base "
                       "does not fit beside the trained model on %s, and Liger's kernels (use_liger_kernel) run "
                       "on CUDA only", device)
        return None
    reference = original(input_ids=input_ids.to(next(original.parameters()).device)).logits.cpu()
    del original
    was_training = trained_model.training
    trained = trained_model.eval()(input_ids=input_ids.to(device)).logits.cpu()
    trained_model.train(was_training)
    return logits_difference(reference, trained)


def _fits_on(model, device: torch.device, headroom: float = 1.5) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size * headroom < free


def _uses_cuda_only_kernels(model) -> bool:
    """Whether Liger patched the model's layer classes (it patches transformers' modules, so a model loaded after
    training gets its Triton kernels too, which need CUDA tensors)."""
    return any(type(module).__module__.startswith("liger_kernel") for module in model.modules())


def note_standard_lora_difference(trainer, recipe, adapter_dir: str | Path, base_model: str | None) -> dict | None:
    """Measure the difference for a `load_in_4bit` run (text models with a known base); None when it cannot be
    measured. The model card states it (`milora.model_card`)."""
    from milora.loading import is_vision_language, resolve_dtype
    from milora.quantization import compute_dtype_of

    model_args = recipe.model
    if not model_args.load_in_4bit or base_model is None or is_vision_language(base_model):
        return None
    input_ids = probe_input_ids(trainer.train_dataset)
    if input_ids is None:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    dtype = resolve_dtype(model_args.dtype, "cpu")
    dtype = compute_dtype_of(model) if dtype == "auto" else dtype
    return standard_lora_difference(model, base_model, adapter_dir, input_ids, dtype)
