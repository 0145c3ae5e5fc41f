"""After training: standard-LoRA conversion for the original base, merged checkpoints, init dirs, CLI."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from milora import apply_milora, convert_to_lora, load_init_dir, merge_adapter, save_init_dir
from milora.cli import main as milora_cli
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS, relative_error


def train_a_few_steps(peft_model, input_ids, steps=5):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    return losses


@pytest.mark.parametrize("method,use_rslora", [("milora", False), ("pissa", False), ("milora", True)])
def test_converted_lora_on_original_base_matches_trained_model(tmp_path, input_ids, method, use_rslora):
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method=method, lora_alpha=8,
                              use_rslora=use_rslora, show_progress=False)
    peft_model.save_pretrained(tmp_path / "initial")
    losses = train_a_few_steps(peft_model, input_ids)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained_logits = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path / "trained")

    convert_to_lora(tmp_path / "trained", tmp_path / "initial", tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8

    original = tiny_model("llama").eval()  # same seed: the original, untouched base weights
    standard = PeftModel.from_pretrained(original, tmp_path / "converted")
    with torch.no_grad():
        converted_logits = standard(input_ids).logits
    assert relative_error(converted_logits, trained_logits) <= 1e-4


def test_convert_refuses_mismatched_initial_adapter(tmp_path):
    apply_milora(tiny_model("llama"), ["q_proj"], 4, show_progress=False).save_pretrained(tmp_path / "a")
    apply_milora(tiny_model("llama"), ["q_proj"], 2, show_progress=False).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="disagree on r"):
        convert_to_lora(tmp_path / "a", tmp_path / "b", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        convert_to_lora(tmp_path / "missing", tmp_path / "b", tmp_path / "out")


def test_merged_checkpoint_gives_the_same_logits(tmp_path, input_ids, tokenizer):
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, show_progress=False)
    train_a_few_steps(peft_model, input_ids)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    merge_adapter(peft_model, tmp_path / "merged", tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert relative_error(merged(input_ids).logits, expected) <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".merged.tmp") for p in tmp_path.iterdir())  # written atomically


def test_init_dir_reloads_identically_and_trains(tmp_path, input_ids, tokenizer):
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, show_progress=False)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    save_init_dir(peft_model, tmp_path / "init", tokenizer)
    loaded = load_init_dir(tmp_path / "init", dtype=torch.float32)
    with torch.no_grad():
        assert relative_error(loaded(input_ids).logits, expected) <= 1e-6
    assert any(p.requires_grad for p in loaded.parameters())
    losses = train_a_few_steps(loaded, input_ids)
    assert losses[-1] < losses[0]
    # original weights = residual + initial adapter
    original = tiny_model("llama")
    base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "init"), tmp_path / "init" / "milora_init"
    ).merge_and_unload()
    torch.testing.assert_close(
        base.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight, atol=1e-6, rtol=0
    )


def test_cli_init_merge_convert(tmp_path, input_ids, capsys):
    assert milora_cli(["init", "--model", "tiny:llama", "--targets", "q_proj,v_proj", "--r", "4",
                       "--out", str(tmp_path / "init")]) == 0
    metadata = json.loads((tmp_path / "init" / "milora_init" / "milora.json").read_text())
    assert metadata["method"] == "milora" and metadata["r"] == 4 and metadata["source_model"] == "tiny:llama"
    model = load_init_dir(tmp_path / "init")
    train_a_few_steps(model, input_ids)
    model.save_pretrained(tmp_path / "trained")
    with torch.no_grad():
        expected = model(input_ids).logits

    assert milora_cli(["merge", "--base", str(tmp_path / "init"), "--adapter", str(tmp_path / "trained"),
                       "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert relative_error(merged(input_ids).logits, expected) <= 1e-5

    assert milora_cli(["convert", "--adapter", str(tmp_path / "trained"), "--initial_adapter",
                       str(tmp_path / "init" / "milora_init"), "--out", str(tmp_path / "lora")]) == 0
    standard = PeftModel.from_pretrained(tiny_model("llama").eval(), tmp_path / "lora")
    with torch.no_grad():
        assert relative_error(standard(input_ids).logits, expected) <= 1e-4
    out = capsys.readouterr().out
    assert "milora init" in out and "milora merge" in out


def test_cli_help_and_unknown_command(capsys):
    assert milora_cli(["--help"]) == 0
    assert "init" in capsys.readouterr().out
    assert milora_cli(["frobnicate"]) == 2
    for command in ("init", "merge", "convert"):
        with pytest.raises(SystemExit) as exit_info:
            milora_cli([command, "--help"])
        assert exit_info.value.code == 0
