"""The step-0 check: before the first optimizer step, the initialised model must give the base model's outputs.

MiLoRA/PiSSA move part of every adapted weight into the adapter (`W = (W - s B0 A0) + s B0 A0`), so at step 0 the
model is the base model up to rounding. One forward pass of the first batch of the training data through the
original base model and through the initialised model gives the relative logit error and the loss difference;
they go to the log, TensorBoard and `milora_run.json`. Above a threshold that fits the weights' dtype the run
stops with one line naming the layer whose reconstructed weight is furthest from the original.

For plain LoRA (B = 0) the base is the same model with the adapter disabled. For the SVD methods the original
model is loaded once more for the check (the initialised model no longer holds its weights) and dropped after.

With `fp8_base` the check compares the model with its frozen layers in their own dtype, as above; the FP8
model's logit error against the base is measured beside it, stored, and refused only above `FP8_THRESHOLD`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch

from milora.sft.config import RecipeError

logger = logging.getLogger(__name__)

# relative logit error allowed at step 0, by the dtype of the adapted weights (README: <= 1e-5 in float32, and
# the bfloat16 residual W - B A is rounded to bf16, which bounds the error by about 2e-2)
DEFAULT_THRESHOLDS = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class Step0Result:
    logit_relative_error: float | None
    loss_base: float | None
    loss_initialised: float | None
    loss_difference: float | None
    threshold: float | None
    rows: int
    dtype: str
    skipped: str | None = None
    seconds: float | None = None  # what the check cost (the second model load included)
    fp8_logit_relative_error: float | None = None  # fp8_base: the FP8 model's logits against the base's

    def as_dict(self) -> dict:
        return asdict(self)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`||out - ref|| / ||ref||` in float64."""
    ref64 = ref.double()
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300))


# A 4-bit base differs from the original weights by its quantization error (nf4: ~0.1 of each weight's norm),
# so an SVD-initialised 4-bit model is compared with a looser limit; a broken init still lands far above it.
FOUR_BIT_THRESHOLD = 0.5


# fp8_base rounds every frozen GEMM's operands to 3 mantissa bits: a few percent of each layer's output,
# compounding over the layers. A broken FP8 GEMM (wrong scales or layout) lands near 1 or above.
FP8_THRESHOLD = 0.5


def threshold_for(dtype: torch.dtype, configured: float | None, four_bit: bool = False) -> float:
    if configured is not None:
        return configured
    return FOUR_BIT_THRESHOLD if four_bit else DEFAULT_THRESHOLDS.get(dtype, 5e-2)


def first_batch(trainer, rows: int) -> dict:
    """The first `rows` examples of the training data, through the trainer's collator, on the model's device."""
    dataset = trainer.train_dataset
    examples = [dataset[i] for i in range(min(rows, len(dataset)))]
    batch = trainer.data_collator(examples)
    device = next(trainer.model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward(model, batch: dict) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        output = model(**batch)
    return output.logits.detach(), float(output.loss)


def worst_layer(peft_model, original) -> tuple[str, float]:
    """The adapted layer whose `W_res + s B0 A0` is furthest from the original weight (relative, float64)."""
    from peft.utils.other import transpose

    from milora.distributed import ADAPTER_NAME, lora_layers
    from milora.fingerprint import base_module_name, base_weight

    worst = ("", -1.0)
    for name, layer in lora_layers(peft_model):
        plain = base_module_name(name)
        B = layer.lora_B[ADAPTER_NAME].weight.double()
        A = layer.lora_A[ADAPTER_NAME].weight.double()
        rebuilt = layer.get_base_layer().weight.double() + transpose(B @ A, layer.fan_in_fan_out) * layer.scaling[
            ADAPTER_NAME]
        error = relative_error(rebuilt.cpu(), base_weight(original, plain).detach().cpu())
        if error > worst[1]:
            worst = (plain, error)
    return worst


def _load_original(model_args, training):
    """The original base model for an SVD-initialised run, or (None, reason) when it cannot be loaded here."""
    from milora.sft.model import load_base_model
    from milora.sft.outputs import original_base_model

    if model_args.milora_init_dir is None:
        return load_base_model(model_args, training), None
    source = original_base_model(model_args)
    if source is None:
        return None, "the init directory does not record its original model"
    from milora.loading import load_model

    try:
        return load_model(source, dtype=model_args.dtype), None
    except (OSError, ValueError) as error:
        return None, f"the original model {source} could not be loaded ({' '.join(str(error).split())[:200]})"


def run_step0_check(trainer, model_args, training) -> Step0Result:
    """Compare the initialised model with its base on the first batch; log the result, stop above the threshold."""
    from milora.distributed import is_zero3_partitioned
    from milora.fp8 import has_fp8_layers, plain_linears
    from milora.sft.outputs import needs_initial_adapter

    model = trainer.model
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype  # 4-bit weights are packed bytes
    rows = training.per_device_train_batch_size
    if any(is_zero3_partitioned(p) for p in model.parameters()):
        return _skipped(rows, dtype, "ZeRO-3 partitions the weights before training starts; run the check on one "
                        "process (the same recipe without the DeepSpeed config)")
    started = time.perf_counter()
    if training.device.type != "cpu" and next(model.parameters()).device.type == "cpu":
        model.to(training.device)  # under DeepSpeed the model is still on the CPU here; ZeRO-2 moves it there too
    rng = torch.random.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        batch = first_batch(trainer, rows)
        fp8_logits = _forward(model, batch)[0] if has_fp8_layers(model) else None
        with plain_linears(model):
            logits, loss = _forward(model, batch)
            original = None
            if needs_initial_adapter(model_args):
                original, reason = _load_original(model_args, training)
                if original is None:
                    return _skipped(rows, dtype, reason)
                original.to(logits.device).eval()
                base_logits, base_loss = _forward(original, batch)
            else:
                with model.disable_adapter():
                    base_logits, base_loss = _forward(model, batch)
        result = Step0Result(
            logit_relative_error=relative_error(logits, base_logits), loss_base=base_loss, loss_initialised=loss,
            loss_difference=loss - base_loss, rows=rows,
            threshold=threshold_for(dtype, training.step0_max_error, getattr(model_args, "load_in_4bit", False)),
            dtype=str(dtype).removeprefix("torch."), seconds=round(time.perf_counter() - started, 3),
            fp8_logit_relative_error=None if fp8_logits is None else relative_error(fp8_logits, base_logits),
        )
        _report(trainer, result)
        if not result.logit_relative_error <= result.threshold:  # NaN fails too
            where = ""
            if original is not None:
                name, error = worst_layer(model, original)
                where = f"; worst layer {name} (relative weight error {error:.2e})"
            raise RecipeError(
                f"step-0 check failed: the initialised model's logits differ from the base model's by "
                f"{result.logit_relative_error:.2e} (relative; limit {result.threshold:.0e} in {result.dtype})"
                f"{where}; check the weights' dtype and the init (set step0_max_error to accept it)"
            )
        if fp8_logits is not None and not result.fp8_logit_relative_error <= FP8_THRESHOLD:
            raise RecipeError(
                f"step-0 check failed: with fp8_base the logits differ from the base model's by "
                f"{result.fp8_logit_relative_error:.2e} (relative; limit {FP8_THRESHOLD}), while the model in "
                f"{result.dtype} is within {result.logit_relative_error:.2e}: FP8 GEMMs do not fit this model; "
                "drop fp8_base"
            )
        return result
    finally:
        model.train(was_training)
        torch.random.set_rng_state(rng)


def _skipped(rows: int, dtype: torch.dtype, reason: str) -> Step0Result:
    logger.warning("step-0 check skipped: %s", reason)
    return Step0Result(None, None, None, None, None, rows, str(dtype).removeprefix("torch."), skipped=reason)


def _report(trainer, result: Step0Result) -> None:
    message = (f"step-0 check: relative logit error {result.logit_relative_error:.3e} (limit {result.threshold:.0e}, "
               f"{result.dtype}), loss base {result.loss_base:.6f} vs initialised {result.loss_initialised:.6f}, "
               f"{result.seconds:.1f} s")
    if result.fp8_logit_relative_error is not None:
        message += f"; with the FP8 base: relative logit error {result.fp8_logit_relative_error:.3e}"
    trainer.accelerator.print(message)
    logger.info(message)
    values = {"step0/logit_relative_error": result.logit_relative_error,
              "step0/loss_difference": result.loss_difference}
    if result.fp8_logit_relative_error is not None:
        values["step0/fp8_logit_relative_error"] = result.fp8_logit_relative_error
    if all(math.isfinite(v) for v in values.values()):
        _pin_tensorboard_dir(trainer)
        trainer.log(values)  # TensorBoard (and the other report_to integrations) at step 0


def _pin_tensorboard_dir(trainer) -> None:
    """A TensorBoard writer opened before training would write to ./runs; give it the folder `on_train_begin`
    would (OUTPUT_DIR/runs/...), which then keeps the same writer for the whole run."""
    import os

    from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())
