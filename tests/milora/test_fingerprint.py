"""Base records and fingerprints: the same weights match in any of float32/bfloat16/float16, the residual and the
original model never match each other, and `milora merge` / `milora convert` refuse a wrong base in one line
before writing anything."""

import json

import pytest
import torch

from milora import apply_milora
from milora.cli import main as milora_cli
from milora.fingerprint import (
    BaseMismatchError,
    check_base,
    fingerprint_dtype,
    model_fingerprint,
    same_base,
    write_record,
)
from milora.model import resolve_target_modules
from milora.tiny import tiny_model

from .conftest import LLAMA_TARGETS


def error_line(err: str) -> str:
    """The one error line (loading progress bars may share stderr)."""
    lines = [line for line in err.strip().splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def names(model) -> list[str]:
    return resolve_target_modules(model, LLAMA_TARGETS)


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_the_same_weights_match_in_any_dtype(source):
    model = tiny_model("llama").to(source)
    expected = model_fingerprint(model, names(model))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cast = tiny_model("llama").to(source).to(dtype)
        found = model_fingerprint(cast, names(cast))
        assert same_base(expected, found, fingerprint_dtype(cast, names(cast))), dtype


def test_residual_original_and_another_model_do_not_match():
    original = tiny_model("llama")
    expected = model_fingerprint(original, names(original))
    residual = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, show_progress=False)
    found = model_fingerprint(residual, names(original))  # the PEFT model's base layers: the residual
    assert not same_base(expected, found, "float32")
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one weight in one layer
    assert not same_base(expected, model_fingerprint(other, names(other)), "float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An init directory and an adapter trained from it (a few steps), with its records as a run writes them."""
    tmp = tmp_path_factory.mktemp("trained")
    assert milora_cli(["init", "--model", "tiny:llama", "--targets", ",".join(LLAMA_TARGETS), "--r", "4",
                       "--out", str(tmp / "init")]) == 0
    from milora import load_init_dir

    model = load_init_dir(tmp / "init")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp / "adapter")
    record = json.loads((tmp / "init" / "milora_init" / "milora_adapter.json").read_text())
    write_record(tmp / "adapter", **{k: record[k] for k in ("applies_to", "base_model", "fingerprint", "method", "r",
                                                           "lora_alpha", "original_model", "original_fingerprint")})
    return tmp


def test_init_directory_records_its_residual_and_original(trained):
    record = json.loads((trained / "init" / "milora_init" / "milora_adapter.json").read_text())
    assert record["applies_to"] == "residual" and record["base_model"] == str((trained / "init").resolve())
    original = tiny_model("llama")
    assert same_base(record["original_fingerprint"], model_fingerprint(original, names(original)), "float32")


def test_check_base_refuses_the_original_for_a_residual_adapter(trained):
    with pytest.raises(BaseMismatchError, match="that is the original model: load the standard LoRA"):
        check_base(tiny_model("llama"), trained / "adapter", "tiny:llama")
    from transformers import AutoModelForCausalLM

    assert "matches" in check_base(AutoModelForCausalLM.from_pretrained(trained / "init"), trained / "adapter", "init")


def test_an_adapter_without_record_is_loaded_unchecked(tmp_path):
    apply_milora(tiny_model("llama"), ["q_proj"], 2, show_progress=False).save_pretrained(tmp_path / "peft")
    assert "base not checked" in check_base(tiny_model("llama"), tmp_path / "peft", "tiny:llama")


def test_cli_merge_and_convert_refuse_a_wrong_base_in_one_line(trained, capsys):
    adapter, init = str(trained / "adapter"), str(trained / "init")
    assert milora_cli(["merge", "--base", "tiny:llama", "--adapter", adapter, "--out", str(trained / "m")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "applies to the residual base" in err and "that is the original model" in err
    assert not (trained / "m").exists()

    convert = ["convert", "--adapter", adapter, "--initial_adapter", f"{init}/milora_init", "--out", str(trained / "c")]
    assert milora_cli([*convert, "--base", init]) == 2
    err = error_line(capsys.readouterr().err)
    assert "it is the residual base the adapter was trained on" in err
    assert not (trained / "c").exists()
    assert milora_cli([*convert, "--base", "tiny:qwen2"]) == 2
    assert "is not the original model" in capsys.readouterr().err and not (trained / "c").exists()

    assert milora_cli([*convert, "--base", "tiny:llama"]) == 0
    assert json.loads((trained / "c" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny:llama"
    assert json.loads((trained / "c" / "milora_adapter.json").read_text())["applies_to"] == "original"
    # the converted adapter's own record now guards merges onto the original model
    assert milora_cli(["merge", "--base", init, "--adapter", str(trained / "c"), "--out", str(trained / "m2")]) == 2
    assert "give tiny:llama" in capsys.readouterr().err
    assert milora_cli(["merge", "--base", "tiny:llama", "--adapter", str(trained / "c"),
                       "--out", str(trained / "m2")]) == 0


def test_truncated_adapter_file_is_one_line(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (["merge", "--base", str(trained / "init"), "--adapter", str(broken), "--out", str(tmp_path / "m")],
                 ["convert", "--adapter", str(broken), "--initial_adapter", str(trained / "init" / "milora_init"),
                  "--out", str(tmp_path / "c")]):
        assert milora_cli(argv) == 2
        assert "adapter_model.safetensors is damaged" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_an_old_layout_root_adapter_is_refused_with_the_folder_to_use(trained, tmp_path, capsys):
    """Output directories of older versions kept the residual adapter at the root (and lora_adapter/ beside it)."""
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(trained / "adapter", old)
    (old / "milora_adapter.json").unlink()
    (old / "milora_run.json").write_text(json.dumps({"adapter_base": "residual", "method": "milora"}))
    assert milora_cli(["merge", "--base", "tiny:llama", "--adapter", str(old), "--out", str(tmp_path / "m")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "written by an older milora" in err and str(old / "lora_adapter") in err
