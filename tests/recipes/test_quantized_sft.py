"""`recipes/sft.py` with `load_in_4bit: true` on CPU: every method trains on a 4-bit (nf4) base, saves its adapter,
merges (dequantized residual + update) and converts, and the model card states the measured difference between
the standard LoRA on the original base and the trained 4-bit model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from milora import apply_milora
from milora.conversion import merge_adapter
from milora.model_card import FOUR_BIT_HEADING
from milora.quantization import FourBitSettings
from milora.sft.config import RecipeError
from milora.sft.parsing import parse_recipe
from milora.sft.quantized import logits_difference
from milora.tiny import tiny_model, tiny_tokenizer

pytest.importorskip("bitsandbytes")

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "recipes"
FAST = [
    "--max_steps", "4", "--warmup_steps", "1", "--logging_steps", "1", "--save_strategy", "no",
    "--per_device_train_batch_size", "4", "--effective_batch_size", "4", "--dataset_max_samples", "32",
    "--disable_tqdm", "true", "--report_to", "none", "--load_in_4bit", "true",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RUNS = {  # name: (recipe, extra arguments)
    "lora": ("tiny_lora.yaml", []),
    "pissa": ("tiny_pissa.yaml", []),
    "qpissa": ("tiny_pissa.yaml", ["--qpissa_iterations", "2"]),
    "milora": ("tiny_milora.yaml", []),
    "mid": ("tiny_milora.yaml", ["--method", "mid"]),
    "random": ("tiny_milora.yaml", ["--method", "random"]),
}


def trained_adapter_dir(name, out):
    """The adapter as trained: at the root for plain LoRA, in residual_adapter/ for the SVD methods."""
    return out if name == "lora" else out / "residual_adapter"


def trained_4bit_model(name, out):
    """The model the run trained, rebuilt: the 4-bit base made the same way + the saved adapter (the run's own
    model object is consumed by the merge). Seed 42: the recipes' seed, which the random method draws with."""
    method = {"qpissa": "pissa"}.get(name, name)
    base = apply_milora(tiny_model("llama"), TARGETS, 8, method=method, quantization=FourBitSettings(),
                        quantization_iterations=2 if name == "qpissa" else 0, seed=42, show_progress=False).unload()
    return PeftModel.from_pretrained(base, str(trained_adapter_dir(name, out)))


def logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def input_ids():
    return tiny_tokenizer()("### Instruction:\nTom has 3 apples and buys 4 more.", return_tensors="pt").input_ids


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, sft, tmp_path_factory):
    recipe, extra = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    trainer = sft.train([str(RECIPES / recipe), "--output_dir", str(out), *FAST, *extra])
    return request.param, out, trainer


def test_trains_on_a_4bit_base(run):
    name, out, trainer = run
    model = trained_4bit_model(name, out)
    quantized = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    assert len(quantized) == 14  # 7 linear layers x 2 blocks; lm_head stays in full precision
    assert trainer.state.global_step == 4
    # float32 factors (SFTTrainer casts a 4-bit model's adapters to bf16; recipes/sft.py undoes it)
    trained = trained_adapter_dir(name, out) / "adapter_model.safetensors"
    assert {t.dtype for t in load_file(str(trained)).values()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    info = json.loads((out / "milora_run.json").read_text())
    assert info["quantization"] == {"quant_type": "nf4", "compute_dtype": "float32", "nested": False}


def test_merged_checkpoint_is_the_trained_4bit_model_dequantized(run, input_ids):
    name, out, _ = run
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    trained = logits(trained_4bit_model(name, out), input_ids)
    torch.testing.assert_close(logits(merged, input_ids), trained, atol=1e-4, rtol=1e-4)
    # training moved the model away from its start
    assert (trained - logits(tiny_model("llama"), input_ids)).abs().max() > 1e-3


def test_standard_lora_carries_the_quantization_error_stated_in_the_card(run):
    name, out, trainer = run
    info = json.loads((out / "milora_run.json").read_text())
    adapter_dir = Path(info["standard_lora_adapter"])
    assert adapter_dir == out  # the root: the adapter for the original model
    recorded = info["standard_lora_difference"]
    probe = torch.tensor([list(trainer.train_dataset[i]["input_ids"]) for i in range(2)][0][:8])[None]
    converted = PeftModel.from_pretrained(tiny_model("llama"), str(adapter_dir))
    measured = logits_difference(logits(converted, probe), logits(trained_4bit_model(name, out), probe))
    # the conversion is exact up to the base's quantization error: small, but not zero
    assert 1e-4 < measured["relative_logits_difference"] < 0.5
    assert 1e-4 < recorded["relative_logits_difference"] < 0.5 and recorded["tokens"] > 0
    card = (adapter_dir / "README.md").read_text()
    assert FOUR_BIT_HEADING in card and f"{recorded['relative_logits_difference']:.4f}" in card


def test_an_init_directory_trains_in_4bit(sft, tmp_path, input_ids):
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--mode", "pissa", "--out", str(init_dir),
                       "--qpissa_iterations", "2"]) == 0
    assert json.loads((init_dir / "milora_init" / "milora.json").read_text())["quantization"]["iterations"] == 2
    out = tmp_path / "run"
    trainer = sft.train([str(RECIPES / "tiny_pissa.yaml"), "--output_dir", str(out),
                         "--milora_init_dir", str(init_dir), *FAST, "--merge", "false"])
    base = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert base.weight.dtype == torch.uint8
    # the same 4-bit model as a run that refits and quantizes at start-up
    direct = apply_milora(tiny_model("llama"), TARGETS, 8, method="pissa", quantization=FourBitSettings(),
                          quantization_iterations=2, show_progress=False).unload()
    trained = PeftModel.from_pretrained(direct, str(out / "residual_adapter"))
    torch.testing.assert_close(logits(trained, input_ids), logits(trainer.model, input_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--method", "milora", "--qpissa_iterations", "3"], "qpissa_iterations refits PiSSA"),
    (["--method", "pissa", "--qpissa_iterations", "3", "--load_in_4bit", "false"], "load_in_4bit: true"),
    (["--bnb_4bit_quant_type", "int4"], "bnb_4bit_quant_type 'int4'"),
])
def test_bad_4bit_keys_are_refused(extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe([str(RECIPES / "tiny_milora.yaml"), "--load_in_4bit", "true", *extra])


def test_llava_recipe_quantizes_the_language_tower_only(sft, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "llava"
    trainer = sft.train([str(RECIPES / "tiny_llava_milora.yaml"), "--output_dir", str(out), *FAST, "--merge", "false"])
    quantized = {n for n, m in trainer.model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert quantized and all(".language_model." in n for n in quantized)
    assert json.loads((out / "milora_run.json").read_text())["standard_lora_difference"] is None  # rows need images
    merge_adapter(trainer.model, out / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(out / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def run_command(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_zero3_with_a_4bit_base_is_refused_before_training(tmp_path):
    result = run_command([sys.executable, "recipes/sft.py", "recipes/tiny_milora.yaml", "--load_in_4bit", "true",
                          "--deepspeed", "deepspeed_configs/ds_zero3.json", "--output_dir", str(tmp_path / "out")])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ZeRO-3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "milora_init_adapter").exists()


def test_milora_init_refuses_a_quantized_checkpoint_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=FourBitSettings().bnb_config(["lm_head"]))
    quantized.save_pretrained(tmp_path / "nf4")  # a 4-bit checkpoint: loads quantized again
    result = run_command([sys.executable, "-m", "milora.cli", "init", "--model", str(tmp_path / "nf4"), "--r", "4",
                          "--out", str(tmp_path / "init")])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "already quantized" in result.stderr and "full-precision checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "init").exists()
