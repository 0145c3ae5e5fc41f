"""Bad recipe inputs stop `recipes/sft.py` before any model loads, with exit code 2 and a message that says what
is wrong and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "recipes" / "tiny_milora.yaml"


def run_main(sft, capsys, *argv) -> str:
    assert sft.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def write_recipe(tmp_path: Path, **changes) -> Path:
    recipe = yaml.safe_load(TINY.read_text())
    recipe["dataset_name"] = str(REPO_ROOT / "recipes" / recipe["dataset_name"])
    recipe["output_dir"] = str(tmp_path / "out")
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_unknown_recipe_key_lists_the_valid_keys(sft, capsys, tmp_path):
    err = run_main(sft, capsys, write_recipe(tmp_path, lora_rank=8))
    assert "unknown recipe key 'lora_rank' (did you mean " in err and "recipe.yaml" in err
    assert "lora_r" in err.split("did you mean", 1)[1].split("?", 1)[0]
    for valid in ("dataset_name", "method", "lora_alpha", "milora_init_dir", "learning_rate", "merge"):
        assert valid in err


def test_unknown_command_line_key(sft, capsys):
    err = run_main(sft, capsys, TINY, "--learning_rat", "1e-3")
    assert "unknown recipe key 'learning_rat' (did you mean learning_rate?) in the command line" in err


def test_bad_value_type(sft, capsys):
    err = run_main(sft, capsys, TINY, "--lora_r", "eight")
    assert "lora_r" in err and "eight" in err


def test_unknown_method(sft, capsys):
    err = run_main(sft, capsys, TINY, "--method", "qlora")
    assert "unknown method 'qlora'" in err and "milora, pissa, lora, mid, random" in err


def test_missing_dataset_field_names_field_file_and_fields_present(sft, capsys, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"query": "1+1?", "answer": "2"}) + "\n")
    err = run_main(sft, capsys, TINY, "--dataset_name", data, "--dataset_format", "metamath")
    assert f"dataset {data} has no field 'response'" in err and "fields present: query, answer" in err


def test_unrecognised_dataset_fields(sft, capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    err = run_main(sft, capsys, TINY, "--dataset_name", data, "--dataset_format", "auto")
    assert "cannot tell the dataset format from its fields (question, answer)" in err


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("empty.json", "[]\n")])
def test_empty_dataset(sft, capsys, tmp_path, name, content):
    data = tmp_path / name
    data.write_text(content)
    err = run_main(sft, capsys, TINY, "--dataset_name", data)
    assert f"dataset {data} is empty" in err


def test_empty_dataset_after_filtering_rows(sft, capsys, tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"query": "1+1?", "response": ""}) + "\n")
    err = run_main(sft, capsys, TINY, "--dataset_name", data)
    assert "row 0: field 'response' is empty" in err


def test_missing_dataset_file(sft, capsys):
    err = run_main(sft, capsys, TINY, "--dataset_name", "data/no_such_file.jsonl")
    assert "dataset file not found: data/no_such_file.jsonl" in err
    assert str(REPO_ROOT / "recipes" / "data" / "no_such_file.jsonl") in err  # where it looked


def test_missing_model_directory(sft, capsys, tmp_path):
    err = run_main(sft, capsys, TINY, "--model_name_or_path", tmp_path / "no_model")
    assert "no_model: no such directory" in err


def test_model_directory_without_config(sft, capsys, tmp_path):
    err = run_main(sft, capsys, TINY, "--model_name_or_path", tmp_path)
    assert "has no config.json" in err


def test_unknown_tiny_model(sft, capsys):
    err = run_main(sft, capsys, TINY, "--model_name_or_path", "tiny:bert")
    assert "'tiny:bert' is not a tiny causal LM" in err


def test_bad_init_dir(sft, capsys, tmp_path):
    err = run_main(sft, capsys, TINY, "--milora_init_dir", tmp_path)
    assert "is not a `milora init` directory" in err and "milora init --model" in err


def test_target_modules_that_match_nothing(sft, capsys):
    err = run_main(sft, capsys, TINY, "--lora_target_modules", "qproj")
    assert "target modules ['qproj'] matched no module" in err and "q_proj" in err


def test_rank_larger_than_a_layer(sft, capsys):
    err = run_main(sft, capsys, TINY, "--lora_r", "128")
    assert "rank r=128 is larger than the layer's smaller dimension" in err


def test_missing_recipe_file(sft, capsys, tmp_path):
    err = run_main(sft, capsys, tmp_path / "nope.yaml")
    assert "recipe file not found" in err


def test_resume_without_checkpoint(sft, capsys, tmp_path):
    err = run_main(sft, capsys, TINY, "--output_dir", tmp_path, "--resume_from_checkpoint", "true")
    assert "holds no complete checkpoint-N directory to resume from" in err
    err = run_main(sft, capsys, TINY, "--resume_from_checkpoint", tmp_path / "checkpoint-7")
    assert "no such checkpoint directory" in err


def test_effective_batch_size_must_divide(sft, capsys):
    err = run_main(sft, capsys, TINY, "--effective_batch_size", "12", "--per_device_train_batch_size", "8")
    assert "effective_batch_size 12 is not a multiple" in err
    err = run_main(sft, capsys, TINY, "--gradient_accumulation_steps", "3")
    assert "contradicts effective_batch_size 16" in err


def test_modules_to_save_with_an_init_dir_is_refused(sft, capsys, tmp_path):
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--out", str(init_dir)]) == 0
    err = run_main(sft, capsys, TINY, "--milora_init_dir", init_dir, "--lora_modules_to_save", "lm_head")
    assert "lora_modules_to_save ['lm_head'] is not applied to a milora_init_dir run" in err


def test_targets_other_than_the_init_dirs_are_refused(sft, capsys, tmp_path):
    """tiny_milora.yaml names five target modules; an init directory built on two would silently train those two."""
    from milora.cli import main as milora_cli

    init_dir = tmp_path / "init"
    assert milora_cli(["init", "--model", "tiny:llama", "--r", "8", "--targets", "q_proj,v_proj",
                       "--out", str(init_dir)]) == 0
    err = run_main(sft, capsys, TINY, "--milora_init_dir", init_dir, "--output_dir", tmp_path / "out")
    assert "lora_target_modules: q_proj,k_proj,v_proj,up_proj,down_proj (selects 10 modules) contradicts " in err
    assert "built with targets q_proj,v_proj (4 modules)" in err and "drop lora_target_modules" in err
    assert not (tmp_path / "out").exists()
