"""`milora.sft.trainer.SFTTrainer` trains and logs exactly as TRL's `SFTTrainer` does, with its step metrics kept
on the device until the Trainer logs."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig
from trl import SFTTrainer as TRLSFTTrainer

from milora.sft.trainer import SFTTrainer
from milora.tiny import tiny_model, tiny_tokenizer


class KeepLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(trainer_class, tmp_path, padding_free: bool, loss_type: str = "nll", accumulation: int = 1):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 250, (int(n),), generator=generator).tolist()
            for n in torch.randint(6, 30, (24,), generator=generator)]
    dataset = Dataset.from_dict({"input_ids": rows})
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    args = SFTConfig(output_dir=str(tmp_path / trainer_class.__module__), max_steps=6,
                     per_device_train_batch_size=4 // accumulation,
                     logging_steps=2, learning_rate=1e-2, report_to="none", save_strategy="no", seed=0,
                     padding_free=padding_free, max_length=None, loss_type=loss_type, logging_nan_inf_filter=False,
                     use_cpu=True, dataloader_pin_memory=False, gradient_accumulation_steps=accumulation)
    logs = KeepLogs()
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer(),
                            callbacks=[logs])
    trainer.train()
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return [log for log in logs.logs if "loss" in log], weights


@pytest.mark.parametrize("padding_free,loss_type,accumulation",
                         [(True, "nll", 1), (False, "nll", 1), (True, "dft", 1), (True, "nll", 2)])
def test_same_losses_metrics_and_weights_as_trl(tmp_path, padding_free, loss_type, accumulation):
    ours, our_weights = train(SFTTrainer, tmp_path, padding_free, loss_type, accumulation)
    theirs, their_weights = train(TRLSFTTrainer, tmp_path, padding_free, loss_type, accumulation)
    assert len(ours) == len(theirs) == 3
    for mine, reference in zip(ours, theirs, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm"):
            assert isinstance(mine[key], float | int), (key, type(mine[key]))
            assert mine[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
    assert ours[-1]["num_tokens"] > ours[0]["num_tokens"] > 0
    for name, weight in their_weights.items():
        torch.testing.assert_close(our_weights[name], weight, rtol=0, atol=0)


def test_step_metrics_wait_on_the_device_until_logged(tmp_path):
    """Between logging steps the metrics are tensors (no `.item()` in the step); the log reads them all."""
    seen = []

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            metrics = trainer._metrics["train"]
            seen.append((state.global_step, [type(v) for v in metrics["entropy"]]))

    torch.manual_seed(0)
    dataset = Dataset.from_dict({"input_ids": [list(range(3, 20 + i)) for i in range(8)]})
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2,
                     report_to="none", save_strategy="no", use_cpu=True, padding_free=True, max_length=None,
                     dataloader_pin_memory=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer(),
                         callbacks=[Peek()])
    trainer.train()
    # step 1: one tensor waiting; step 2 is a logging step, whose callback runs before the log
    assert seen[0] == (1, [torch.Tensor])
    assert seen[1][1] == [torch.Tensor, torch.Tensor]
    assert seen[2] == (3, [torch.Tensor])  # the log of step 2 read and cleared them
