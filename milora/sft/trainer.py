"""TRL's `SFTTrainer` with no host synchronisation inside a training step.

TRL computes its per-step metrics (entropy, mean_token_accuracy, num_tokens) with `.item()` right after the
forward pass: the host waits there for the GPU to finish the forward before it can queue the backward, so the
GPU idles for as long as the host takes to reach the first backward kernel, every step. `SFTTrainer` here
computes the same metrics from the same tensors but keeps them on the device, and reads all of a logging
interval's values in one transfer when the Trainer logs. The loss, its gradients and the logged values are
TRL's (tests/milora/sft/test_trainer.py compares them).

Only TRL's plain loss path is taken over (`loss_type` nll or dft, no `compute_loss_func`, label smoothing,
MoE auxiliary loss or sequence parallelism) and only in training; anything else goes to TRL as it is.

The other synchronisations of a step are settings (`MiloraSFTConfig`): `logging_nan_inf_filter` off (the
Trainer checks every step's loss for NaN on the host) and the batches copied from pinned memory without
blocking (`dataloader_pin_memory` with accelerate's `non_blocking`).
"""

from __future__ import annotations

import torch
from trl import SFTTrainer as TRLSFTTrainer

PLAIN_LOSS_TYPES = ("nll", "dft")


class SFTTrainer(TRLSFTTrainer):
    """`trl.SFTTrainer` whose training step never waits for the GPU (see the module docstring)."""

    def _takes_plain_loss(self, model) -> bool:
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        return (
            model.training
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.args.loss_type in PLAIN_LOSS_TYPES
            and not (parallelism is not None and getattr(parallelism, "sp_enabled", False))
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._takes_plain_loss(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        if self.args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._record_step_metrics(outputs, inputs)
        return loss

    @torch.no_grad()
    def _record_step_metrics(self, outputs, inputs) -> None:
        """TRL's step metrics as device tensors: the ratios of this step (0 where no token counts), and the step's
        token count added to a device total."""
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        denominator = num_valid.clamp(min=1).to(entropy_sum.dtype)
        counted = num_valid > 0
        metrics = self._metrics["train"]
        metrics["entropy"].append(torch.where(counted, entropy_sum / denominator, 0.0))
        metrics["mean_token_accuracy"].append(torch.where(counted, num_correct / denominator, 0.0))
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:  # padding-free: one row of packed sequences
            tokens = inputs["position_ids"].new_full((), inputs["position_ids"].size(1))  # a fill, not a copy
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        tokens = gather(tokens).sum() // self._tp_size
        pending = getattr(self, "_pending_train_tokens", None)
        self._pending_train_tokens = tokens if pending is None else pending + tokens
        metrics["num_tokens"] = [self._total_train_tokens]  # brought up to date in `log`

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Read the interval's device metrics (one transfer), then log as TRL does."""
        metrics = self._metrics["train"]
        pending = [(key, i) for key, values in metrics.items() for i, v in enumerate(values)
                   if isinstance(v, torch.Tensor)]
        tokens = getattr(self, "_pending_train_tokens", None)
        if pending or tokens is not None:
            tensors = [metrics[key][i].reshape(()).double() for key, i in pending]
            if tokens is not None:
                tensors.append(tokens.reshape(()).double())
            values = torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()
            if tokens is not None:
                self._total_train_tokens += int(values.pop())
                self._pending_train_tokens = None
                metrics["num_tokens"] = [self._total_train_tokens]
            for (key, i), value in zip(pending, values, strict=True):
                metrics[key][i] = value
        super().log(logs, start_time)
