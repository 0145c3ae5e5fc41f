"""The step-0 check of `recipes/sft.py`: measured on the first batch before the first step, written to the log,
TensorBoard and `milora_run.json`, and a one-line stop (naming the worst layer) above the dtype's threshold.
Also: a truncated init directory and a truncated init cache file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from milora.sft.step0 import relative_error, threshold_for

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICK = [
    "--max_steps", "1", "--per_device_train_batch_size", "4", "--effective_batch_size", "4",
    "--dataset_max_samples", "8", "--save_strategy", "no", "--merge", "false", "--disable_tqdm", "true",
]


def test_relative_error_and_thresholds():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref + torch.tensor([0.0, 0.5]), ref) == pytest.approx(0.1)
    assert threshold_for(torch.float32, None) == 1e-4 and threshold_for(torch.bfloat16, None) == 5e-2
    assert threshold_for(torch.bfloat16, 1e-3) == 1e-3


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in out.glob("runs/*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return scalars


@pytest.mark.parametrize("method,dtype,limit", [("milora", "float32", 1e-5), ("pissa", "bfloat16", 5e-2),
                                                ("lora", "float32", 0.0)])
def test_step0_values_go_to_the_log_tensorboard_and_the_run_summary(sft, tmp_path, capsys, method, dtype, limit):
    out = tmp_path / "out"
    sft.train([str(RECIPES / f"tiny_{method}.yaml"), "--output_dir", str(out), *QUICK, "--dtype", dtype,
               "--report_to", "tensorboard"])
    check = json.loads((out / "milora_run.json").read_text())["step0_check"]
    print(f"step-0 {method} {dtype}: {check}")
    assert check["dtype"] == dtype and check["rows"] == 4 and check["skipped"] is None
    assert check["logit_relative_error"] <= limit
    assert check["loss_difference"] == pytest.approx(check["loss_initialised"] - check["loss_base"])
    assert "step-0 check: relative logit error" in capsys.readouterr().out
    scalars = tensorboard_scalars(out)
    assert scalars["train/step0/logit_relative_error"] == [(0, pytest.approx(check["logit_relative_error"], abs=1e-9))]
    assert "train/train_loss" in scalars  # the run's own scalars went to the same folder


def test_step0_check_stops_a_run_whose_init_is_wrong_naming_the_worst_layer(sft, tmp_path, capsys):
    """An init directory whose residual was damaged in one layer (weights changed after `milora init`; the record
    is removed, so that only the step-0 check can notice) stops before the first step."""
    from safetensors.torch import load_file, save_file

    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--out", str(init_dir)]) == 0
    (init_dir / "milora_init" / "milora_adapter.json").unlink()
    weights = load_file(str(init_dir / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key] = weights[key] * 1.5
    save_file(weights, str(init_dir / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert sft.main([str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path / "out"), *QUICK,
                     "--milora_init_dir", str(init_dir), "--report_to", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sft.py: error: step-0 check failed") and "worst layer model.layers.1.mlp.down_proj" in err
    assert not (tmp_path / "out" / "milora_run.json").exists()


def test_the_init_directory_record_catches_a_replaced_residual(sft, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--out", str(init_dir)]) == 0
    weights = load_file(str(init_dir / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1.0
    save_file(weights, str(init_dir / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert sft.main([str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path / "out"), *QUICK,
                     "--milora_init_dir", str(init_dir), "--report_to", "none"]) == 2
    assert "its residual model is not the one its adapter" in capsys.readouterr().err


@pytest.mark.parametrize("damaged", ["model.safetensors", "milora_init/adapter_model.safetensors"])
def test_truncated_init_directory_is_one_line(sft, tmp_path, capsys, damaged):
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--out", str(init_dir)]) == 0
    path = init_dir / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    capsys.readouterr()
    assert sft.main([str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path / "out"), *QUICK,
                     "--milora_init_dir", str(init_dir), "--report_to", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sft.py: error: milora_init_dir") and "is damaged" in err and "milora init" in err


def test_truncated_init_cache_file_is_computed_again(sft, tmp_path):
    cache = tmp_path / "cache"
    args = [str(RECIPES / "tiny_milora.yaml"), *QUICK, "--milora_cache_dir", str(cache), "--report_to", "none"]
    sft.train([*args, "--output_dir", str(tmp_path / "first")])
    (factors,) = cache.glob("*/factors.safetensors")
    whole = factors.read_bytes()
    factors.write_bytes(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match="factors.safetensors is damaged.*computing the factors again"):
        sft.train([*args, "--output_dir", str(tmp_path / "second")])
    assert factors.read_bytes() == whole  # rewritten whole, with the same factors
    first = (tmp_path / "first" / "milora_init_adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "second" / "milora_init_adapter" / "adapter_model.safetensors").read_bytes() == first


def test_truncated_initial_adapter_is_written_again_on_resume(sft, tmp_path):
    """A run that died while writing milora_init_adapter/ resumes: the rebuilt init is written again, and the
    output root is still the trained model on the original base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from milora.tiny import tiny_model

    out = tmp_path / "out"
    args = [str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(out), *QUICK, "--max_steps", "2",
            "--save_strategy", "steps", "--save_steps", "1", "--merge", "true", "--report_to", "none"]
    sft.train(args)
    initial = out / "milora_init_adapter" / "adapter_model.safetensors"
    whole = initial.read_bytes()
    initial.write_bytes(whole[:100])
    (out / "milora_run.json").unlink()
    sft.train([*args, "--resume_from_checkpoint", "true"])
    assert initial.read_bytes() == whole
    ids = torch.randint(5, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        root = PeftModel.from_pretrained(tiny_model("llama"), out).eval()(ids).logits
    assert relative_error(root, merged) <= 1e-5
