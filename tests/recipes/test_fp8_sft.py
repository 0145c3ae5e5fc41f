"""`recipes/sft.py` with `fp8_base: true` on CPU: the tiny recipes train with their frozen decoder layers in FP8
(float32 weights, quantized from float32), the step-0 check measures the FP8 model beside the exact one, and the
outputs (adapters, merged checkpoint) are those of plain layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from milora.fp8 import Float8FrozenLinear
from milora.model_card import FP8_HEADING

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--per_device_train_batch_size", "4",
        "--effective_batch_size", "4", "--dataset_max_samples", "16", "--disable_tqdm", "true", "--report_to", "none"]


@pytest.mark.parametrize("recipe", ["tiny_milora.yaml", "tiny_lora.yaml"])
def test_tiny_recipe_trains_on_an_fp8_base(sft, tmp_path, recipe):
    trainer = sft.train([str(RECIPES / recipe), "--output_dir", str(tmp_path), "--fp8_base", "true", *FAST])
    assert not any(isinstance(m, Float8FrozenLinear) for m in trainer.model.modules()), (
        "the merge turned the FP8 layers back into plain ones")
    info = json.loads((tmp_path / "milora_run.json").read_text())
    assert info["fp8_base"] is True
    step0 = info["step0_check"]
    assert step0["logit_relative_error"] <= 1e-5, "the init is checked with the exact layers"
    assert 1e-3 < step0["fp8_logit_relative_error"] < 0.1, "the model held FP8 layers when training began"
    assert info["global_step"] == 2 and torch.isfinite(torch.tensor(info["final_loss"]))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert FP8_HEADING in (tmp_path / "README.md").read_text()


def test_a_milora_init_directory_trains_on_an_fp8_base(sft, tmp_path):
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--method", "milora", "--out", str(init_dir)]) == 0
    out = tmp_path / "run"
    sft.train([str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(out), "--milora_init_dir", str(init_dir),
               "--fp8_base", "true", *FAST])
    step0 = json.loads((out / "milora_run.json").read_text())["step0_check"]
    assert step0["logit_relative_error"] <= 1e-5 and 1e-3 < step0["fp8_logit_relative_error"] < 0.1
