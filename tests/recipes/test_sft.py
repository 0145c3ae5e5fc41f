"""`recipes/sft.py` end to end on CPU: the tiny recipes train LoRA, PiSSA and MiLoRA through TRL's SFTTrainer on
the bundled data, and everything they save loads back and describes the same model.

Each run is a few seconds: the tiny Llama, 4 examples a step, 12 steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from milora import apply_milora
from milora.fingerprint import adapter_module_names, model_fingerprint
from milora.tiny import tiny_model, tiny_tokenizer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
FAST = [
    "--max_steps", "12", "--warmup_steps", "2", "--logging_steps", "2", "--save_strategy", "no",
    "--per_device_train_batch_size", "4", "--effective_batch_size", "4", "--dataset_max_samples", "96",
    "--disable_tqdm", "true",
]
RECIPE = {"lora": "tiny_lora.yaml", "pissa": "tiny_pissa.yaml", "milora": "tiny_milora.yaml"}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def residual_base(method: str):
    """The frozen base a pissa/milora adapter applies to, rebuilt the way the run built it."""
    return apply_milora(tiny_model("llama"), TARGETS, 8, method=method, show_progress=False).unload()


@pytest.fixture(scope="module", params=["lora", "pissa", "milora"])
def run(request, sft, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method)
    trainer = sft.train([str(RECIPES / RECIPE[method]), "--output_dir", str(out), *FAST])
    return method, out, trainer


@pytest.fixture(scope="module")
def input_ids():
    text = "Below is an instruction that describes a task.\n\n### Instruction:\nTom has 3 apples."
    return tiny_tokenizer()(text, return_tensors="pt").input_ids


def test_loss_falls(run):
    _, _, trainer = run
    values = losses(trainer)
    assert trainer.state.global_step == 12 and len(values) == 6
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2 - 0.05, values


def test_outputs_are_written(run):
    method, out, _ = run
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs (report_to: tensorboard)"
    info = json.loads((out / "milora_run.json").read_text())
    assert info["method"] == method and info["lora_r"] == 8 and info["global_step"] == 12
    assert info["lora_alpha"] == (16 if method == "lora" else 8)  # the paper's defaults, set in the recipes
    assert (out / "milora_init_adapter").is_dir() == (method != "lora")
    assert (out / "residual_adapter").is_dir() == (method != "lora")
    assert not (out / "lora_adapter").exists()
    assert info["step0_check"]["logit_relative_error"] <= 1e-5 and info["step0_check"]["threshold"] == 1e-4
    assert info["final_loss"] == losses(run[2])[-1]
    assert not list(out.glob(".*tmp*")), "no temporary directories left behind"


def test_adapter_reloads_and_matches_the_merged_checkpoint(run, input_ids):
    """The output folder on the original base, as plain PEFT loads it, is the trained model (= merged/)."""
    method, out, _ = run
    adapted = PeftModel.from_pretrained(tiny_model("llama"), str(out))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    expected = logits(adapted, input_ids)
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)
    # training moved the model away from its start (the adapter is not a no-op)
    assert (expected - logits(tiny_model("llama"), input_ids)).abs().max() > 1e-3


def test_merged_checkpoint_is_ready_for_lm_eval(run):
    _, out, _ = run
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.chat_template and tokenizer.eos_token == "</s>"
    assert (out / "merged" / "config.json").is_file()


def test_root_is_the_standard_lora_and_residual_adapter_needs_the_residual(run, input_ids):
    """Root: rank 2r for the original model, named in its config. residual_adapter/: rank r, right on the residual
    base only, which its config and record name; milora merge refuses it on the original model."""
    method, out, _ = run
    config = json.loads((out / "adapter_config.json").read_text())
    record = json.loads((out / "milora_adapter.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:llama" and record["applies_to"] == "original"
    assert config["r"] == (8 if method == "lora" else 16) and record["lora_alpha"] == config["lora_alpha"]
    original = tiny_model("llama")
    assert record["fingerprint"] == model_fingerprint(original, adapter_module_names(out))  # the original model's
    if method == "lora":
        return
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    residual = PeftModel.from_pretrained(residual_base(method), str(out / "residual_adapter"))
    torch.testing.assert_close(logits(residual, input_ids), logits(merged, input_ids), atol=1e-4, rtol=1e-4)
    residual_record = json.loads((out / "residual_adapter" / "milora_adapter.json").read_text())
    assert residual_record["applies_to"] == "residual" and residual_record["base_model"] is None
    assert residual_record["original_fingerprint"] == record["fingerprint"]
    assert json.loads((out / "residual_adapter" / "adapter_config.json").read_text())["r"] == 8
    from milora.cli import main as milora_cli

    assert milora_cli(["merge", "--base", "tiny:llama", "--adapter", str(out / "residual_adapter"),
                       "--out", str(out / "wrong")]) == 2
    assert not (out / "wrong").exists()


def test_model_card(run):
    method, out, _ = run
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: tiny:llama" in front and "library_name: peft" in front and f"- {method}" in front
    info = json.loads((out / "milora_run.json").read_text())
    for text in ("| rank r / lora_alpha | 8 /", "q_proj, k_proj", "tiny_math.jsonl", "| optimizer steps | 12 |",
                 f"{info['final_loss']:.4f}", "step-0 check | relative logit error", "PeftModel.from_pretrained",
                 "LoRARequest", "merged"):
        assert text in card, text
    assert ("Why the adapter here has rank 2r" in card) == (method != "lora")


def test_initial_adapter_holds_the_chosen_singular_components(run):
    """B0 A0 (scaling 1) is the rank-r part of W from the minor (MiLoRA) or principal (PiSSA) end of the
    spectrum, checked against a float64 SVD of the original weights."""
    method, out, _ = run
    if method == "lora":
        pytest.skip("LoRA starts from B = 0")
    saved = load_file(str(out / "milora_init_adapter" / "adapter_model.safetensors"))
    original = tiny_model("llama")
    keys = sorted(k for k in saved if ".lora_A." in k)
    assert len(keys) == 2 * len(TARGETS)
    for key in keys:
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        W = original.get_submodule(name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        pick = slice(-8, None) if method == "milora" else slice(0, 8)
        expected = U[:, pick] @ torch.diag(S[pick]) @ Vh[pick]
        product = saved[key.replace(".lora_A.", ".lora_B.")].double() @ saved[key].double()
        assert float((product - expected).norm() / expected.norm()) < 1e-4, name


def test_resume_continues_from_the_checkpoint(sft, tmp_path):
    """A run stopped after its step-4 checkpoint and resumed ends where the uninterrupted run ends."""
    args = [
        str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path), *FAST,
        "--max_steps", "8", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
        "--merge", "false", "--report_to", "none",
    ]
    full = sft.train(args)
    expected_losses = losses(full)
    expected_adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    shutil.rmtree(tmp_path / "checkpoint-8")  # as if the job died after saving checkpoint-4

    resumed = sft.train([*args, "--resume_from_checkpoint", "true", "--milora_cache_dir", str(tmp_path / "cache")])
    assert resumed.state.global_step == 8
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == list(range(1, 9))
    assert losses(resumed)[4:] == pytest.approx(expected_losses[4:], abs=1e-5)
    adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
    for key, value in expected_adapter.items():
        torch.testing.assert_close(adapter[key], value, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "residual_adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "cache").glob("*/factors.safetensors")), "milora_cache_dir stores the SVD factors"


def test_resume_refuses_a_different_initialisation(sft, tmp_path):
    args = [
        str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(tmp_path), *FAST,
        "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--merge", "false",
        "--report_to", "none",
    ]
    sft.train(args)
    from milora.sft.config import RecipeError

    with pytest.raises(RecipeError, match="cannot resume: the initial adapter rebuilt now differs"):
        sft.train([*args, "--resume_from_checkpoint", "true", "--method", "pissa"])


def test_trains_from_a_milora_init_directory(sft, tmp_path, input_ids):
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--method", "milora", "--out", str(init_dir)]) == 0
    out = tmp_path / "run"
    trainer = sft.train([
        str(RECIPES / "tiny_milora.yaml"), "--output_dir", str(out), "--milora_init_dir", str(init_dir), *FAST,
        "--max_steps", "4", "--report_to", "none",
    ])
    assert trainer.state.global_step == 4
    # the initial adapter is the init directory's, byte for byte, and the dropout is the recipe's
    assert (out / "milora_init_adapter" / "adapter_model.safetensors").read_bytes() == (
        init_dir / "milora_init" / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    converted = PeftModel.from_pretrained(tiny_model("llama"), str(out))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(converted, input_ids), logits(merged, input_ids), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "milora_run.json").read_text())["base_model"] == "tiny:llama"
    # the residual adapter names the init directory, whose residual it applies to
    residual_config = json.loads((out / "residual_adapter" / "adapter_config.json").read_text())
    assert residual_config["base_model_name_or_path"] == str(init_dir.resolve())
    from milora.conversion import merge_checkpoint

    merge_checkpoint(str(init_dir), out / "residual_adapter", tmp_path / "merged_again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_again")
    torch.testing.assert_close(logits(again, input_ids), logits(merged, input_ids), atol=1e-5, rtol=1e-5)


def test_chat_data_trains_on_assistant_turns_only(sft, tmp_path):
    trainer = sft.train([
        str(RECIPES / "tiny_lora.yaml"), "--output_dir", str(tmp_path), *FAST, "--max_steps", "2",
        "--dataset_name", "data/tiny_chat.jsonl", "--dataset_format", "chat", "--dataset_messages_field", "chosen",
        "--merge", "false", "--report_to", "none",
    ])
    assert trainer.args.assistant_only_loss is True
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    text = tokenizer.decode(row["input_ids"])
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    assert text.startswith("<s>### User:\nWrite one short sentence")
    assert trained == "Eva collected 3 books.</s>"


def test_commonsense_data_trains_on_the_output_only(sft, tmp_path):
    trainer = sft.train([
        str(RECIPES / "tiny_lora.yaml"), "--output_dir", str(tmp_path), *FAST, "--max_steps", "2",
        "--dataset_name", "data/tiny_commonsense.json", "--dataset_format", "commonsense", "--max_length", "384",
        "--merge", "false", "--report_to", "none",
    ])
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    text = tokenizer.decode(row["input_ids"])
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
    assert "### Instruction:\nPlease choose the correct answer" in text and text.endswith("### Response:\n" + trained)
    assert trained == "the correct answer is answer1</s>"


def test_padding_free_gives_the_padded_loss(sft, tmp_path):
    """The paper recipes train padding-free (no pad tokens); with sdpa that must give the padded batches' loss."""
    common = [
        str(RECIPES / "tiny_lora.yaml"), *FAST, "--max_steps", "1", "--logging_steps", "1", "--lora_dropout", "0",
        "--merge", "false", "--report_to", "none",
    ]
    padded = sft.train([*common, "--output_dir", str(tmp_path / "padded")])
    free = sft.train([*common, "--output_dir", str(tmp_path / "free"), "--padding_free", "true",
                      "--max_length", "none"])
    assert free.args.padding_free and not padded.args.padding_free
    assert losses(free)[0] == pytest.approx(losses(padded)[0], rel=1e-5)


@pytest.mark.end_to_end
def test_command_line_run_and_resume_in_new_processes(tmp_path):
    """`python recipes/sft.py RECIPE` as a user runs it; the resumed run is a new process (another hash seed,
    so Python sets iterate in another order) and still converts its adapter against the first run's init."""
    import os
    import subprocess
    import sys

    command = [
        sys.executable, "recipes/sft.py", "recipes/tiny_milora.yaml", "--output_dir", str(tmp_path), *FAST,
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--merge", "false", "--report_to", "none",
    ]

    def run(*extra, seed):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": seed}
        result = subprocess.run([*command, *extra], check=False, cwd=RECIPES.parent, capture_output=True,
                                text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "sft.py: done" in result.stdout

    run(seed="0")
    shutil.rmtree(tmp_path / "checkpoint-4")
    run("--resume_from_checkpoint", "true", seed="1")
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 4
    assert (tmp_path / "residual_adapter" / "adapter_model.safetensors").is_file()


def test_saved_residual_base_is_named_by_the_residual_adapter(sft, tmp_path, input_ids):
    """save_residual_base: true writes residual_base/; residual_adapter/ names it, so PEFT's AutoPeftModel loads
    the trained model from that folder alone, and milora merge accepts it as the base."""
    from peft import AutoPeftModelForCausalLM

    from milora.cli import main as milora_cli

    out = tmp_path / "out"
    sft.train([str(RECIPES / "tiny_pissa.yaml"), "--output_dir", str(out), *FAST, "--max_steps", "2",
               "--save_residual_base", "true", "--report_to", "none"])
    config = json.loads((out / "residual_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "residual_base").resolve())
    merged = logits(AutoModelForCausalLM.from_pretrained(out / "merged"), input_ids)
    auto = AutoPeftModelForCausalLM.from_pretrained(out / "residual_adapter")
    torch.testing.assert_close(logits(auto, input_ids), merged, atol=1e-5, rtol=1e-5)
    assert milora_cli(["merge", "--base", str(out / "residual_base"), "--adapter", str(out / "residual_adapter"),
                       "--out", str(tmp_path / "again")]) == 0
    assert "residual_base/" in (out / "README.md").read_text()
