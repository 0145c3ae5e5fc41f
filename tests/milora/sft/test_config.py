"""`milora.sft.config`: each dataclass resolves its own defaults as it is built; `effective_batch_size` sets
`gradient_accumulation_steps` once, from the process count, before DeepSpeed's "auto" values are filled."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from milora.io import read_json, write_json
from milora.sft import parsing
from milora.sft.config import DataArguments, MiloraSFTConfig, ModelArguments, RecipeError, accumulation_steps

REPO_ROOT = Path(__file__).resolve().parents[3]
TINY = str(REPO_ROOT / "recipes" / "tiny_milora.yaml")  # per_device_train_batch_size 8, effective_batch_size 16


def config(tmp_path, **values) -> MiloraSFTConfig:
    return MiloraSFTConfig(output_dir=str(tmp_path), report_to="none", **values)


@pytest.mark.parametrize("processes,steps", [(1, 4), (2, 2), (4, 1)])
def test_accumulation_follows_the_process_count(tmp_path, monkeypatch, processes, steps):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    training = config(tmp_path, effective_batch_size=16, per_device_train_batch_size=4)
    assert training.gradient_accumulation_steps == steps
    assert training.per_device_train_batch_size * steps * processes == 16


def test_explicit_accumulation_is_kept_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    explicit = config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert explicit.gradient_accumulation_steps == 3
    assert config(tmp_path).gradient_accumulation_steps == 1
    training = config(tmp_path, effective_batch_size=16, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert training.gradient_accumulation_steps == 2
    with pytest.raises(RecipeError, match="gradient_accumulation_steps 4 contradicts effective_batch_size 16 "
                                          r"\(which needs 2 .* on 2 process"):
        config(tmp_path, effective_batch_size=16, per_device_train_batch_size=4, gradient_accumulation_steps=4)


def test_effective_batch_size_must_be_a_multiple(monkeypatch):
    with pytest.raises(RecipeError, match="effective_batch_size 16 is not a multiple of per_device_train_batch_size "
                                          "4 x 3 process"):
        accumulation_steps(16, 4, None, 3)
    with pytest.raises(RecipeError, match="effective_batch_size 2 is not a multiple"):
        accumulation_steps(2, 4, None, 1)


def test_the_recipe_is_parsed_once(monkeypatch):
    built = []
    original = MiloraSFTConfig.__post_init__

    def counting(self):
        built.append(self.gradient_accumulation_steps)
        original(self)

    monkeypatch.setattr(MiloraSFTConfig, "__post_init__", counting)
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = parsing.parse_recipe([TINY, "--output_dir", "/tmp/unused"])
    assert built == [None] and recipe.training.gradient_accumulation_steps == 1


@pytest.mark.end_to_end
def test_deepspeed_auto_values_use_the_derived_accumulation():
    """TrainingArguments fills DeepSpeed's "auto" batch sizes while it is built: they must already see the
    accumulation derived from effective_batch_size (own process: DeepSpeed's state is global)."""
    code = (
        "from milora.sft.parsing import parse_recipe\n"
        "t = parse_recipe(['recipes/tiny_milora.yaml', '--deepspeed', 'deepspeed_configs/ds_zero2.json',"
        " '--output_dir', '/tmp/unused']).training\n"
        "c = t.hf_deepspeed_config.config\n"
        "print(c['gradient_accumulation_steps'], c['train_micro_batch_size_per_gpu'], c['train_batch_size'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["2", "8", "16"]


@pytest.mark.parametrize("method,alpha", [("LoRA", 16), ("PiSSA", 8), ("milora", 8), ("mid", 8), ("random", 8)])
def test_model_defaults(method, alpha):
    model = ModelArguments(model_name_or_path="tiny:llama", method=method, lora_r=8)
    assert model.method == method.lower() and model.lora_alpha == alpha
    assert model.dtype == "float32"  # no GPU here; bfloat16 where a GPU supports it
    plain = ModelArguments()
    assert (plain.method, plain.lora_r, plain.lora_alpha) == ("milora", 16, 16)


def test_bad_values_are_refused_where_declared():
    with pytest.raises(RecipeError, match="unknown method 'qlora'.*milora, pissa, lora, mid, random"):
        ModelArguments(method="qlora")
    with pytest.raises(RecipeError, match="lora_r must be a positive integer"):
        ModelArguments(lora_r=0)
    with pytest.raises(RecipeError, match="unknown dataset_format 'sharegpt'"):
        DataArguments(dataset_format="sharegpt")


def test_fp8_base_is_parsed_and_refused_with_a_4bit_base(tmp_path):
    recipe = parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), "--fp8_base", "true"])
    assert recipe.model.fp8_base is True and ModelArguments().fp8_base is False
    with pytest.raises(RecipeError, match="fp8_base and load_in_4bit"):
        parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), "--fp8_base", "true", "--load_in_4bit", "true"])


def test_fp8_base_is_refused_under_zero3_before_anything_loads(tmp_path):
    with pytest.raises(RecipeError, match="fp8_base: true does not run under DeepSpeed ZeRO-3"):
        parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), "--fp8_base", "true",
                              "--deepspeed", str(REPO_ROOT / "deepspeed_configs" / "ds_zero3.json")])


def test_liger_is_off_without_cuda(tmp_path):
    with pytest.warns(UserWarning, match="use_liger_kernel"):
        training = config(tmp_path, use_liger_kernel=True)
    assert training.use_liger_kernel is False and training.bf16 is False


def test_steps_do_not_wait_for_the_gpu_unless_asked(tmp_path):
    """The settings that would make each step wait for the GPU are off by default, and a recipe can turn them on."""
    training = parsing.parse_recipe([TINY, "--output_dir", str(tmp_path)]).training
    assert training.logging_nan_inf_filter is False
    assert training.dataloader_pin_memory and training.accelerator_config.non_blocking is True
    training = parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), "--logging_nan_inf_filter", "true",
                                     "--dataloader_pin_memory", "false"]).training
    assert training.logging_nan_inf_filter is True and training.accelerator_config.non_blocking is False


def test_cuda_graphs_without_bucketed_lengths_are_warned_about(tmp_path):
    graphs = ["--torch_compile", "true", "--torch_compile_mode", "reduce-overhead"]
    with pytest.warns(UserWarning, match="set pad_to_multiple_of"):
        recipe = parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), *graphs])
    assert recipe.training.decoder_layer_compile == {"backend": "inductor", "mode": "reduce-overhead"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        parsing.parse_recipe([TINY, "--output_dir", str(tmp_path), *graphs, "--pad_to_multiple_of", "512"])


@pytest.mark.end_to_end
def test_zero3_merge_without_gathered_weights_is_refused_before_training(tmp_path):
    """merge: true under ZeRO-3 needs the 16-bit weights gathered on save; without it the recipe stops at once."""
    config = read_json(REPO_ROOT / "deepspeed_configs" / "ds_zero3.json")
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    write_json(tmp_path / "ds.json", config)
    command = [sys.executable, "recipes/sft.py", "recipes/tiny_milora.yaml", "--deepspeed", str(tmp_path / "ds.json"),
               "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stage3_gather_16bit_weights_on_model_save" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "milora_init_adapter").exists()


@pytest.mark.parametrize("processes,per_device", [(1, 16), (2, 8), (4, 4), (8, 2)])
def test_a_one_gpu_recipe_runs_on_n_processes(monkeypatch, processes, per_device):
    """The 7B recipes put all 16 rows of a step in one micro-batch on one GPU; on N GPUs each takes 16 / N."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    recipe = parsing.parse_recipe([str(REPO_ROOT / "recipes" / "llama2-7b_math_milora.yaml"), "--output_dir", "/tmp/x"])
    training = recipe.training
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (per_device, 1)


def test_per_device_cap_keeps_a_batch_that_fits_and_refuses_too_many_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert config(tmp_path, effective_batch_size=16, per_device_train_batch_size=4).per_device_train_batch_size == 4
    monkeypatch.setenv("WORLD_SIZE", "32")
    with pytest.raises(RecipeError, match="effective_batch_size 16 is not a multiple"):
        config(tmp_path, effective_batch_size=16, per_device_train_batch_size=16)
