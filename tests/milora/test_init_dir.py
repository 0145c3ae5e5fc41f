"""`milora init` directories: the `InitRecord` written beside the initial adapter, and read back."""

import json

import pytest

from milora import apply_milora, load_init_dir, save_init_dir
from milora.init_dir import InitRecord, read_init_record
from milora.model import MiLoRAError, method_of_model
from milora.tiny import tiny_model, tiny_tokenizer

from .conftest import LLAMA_TARGETS


@pytest.mark.parametrize("method", ["pissa", "milora", "mid", "random"])
def test_saved_without_arguments_reads_back_its_method(tmp_path, method):
    """`save_init_dir(model, out)`, the documented call, records the method the model was initialised with."""
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method=method, show_progress=False)
    save_init_dir(peft_model, tmp_path / "init")
    record = read_init_record(tmp_path / "init")
    assert record.method == method
    assert (record.r, record.lora_alpha, record.target_modules) == (4, 4, sorted(LLAMA_TARGETS))
    assert method_of_model(load_init_dir(tmp_path / "init")) == method


def test_the_record_holds_what_it_was_given(tmp_path):
    peft_model = apply_milora(tiny_model("llama"), "q_proj,v_proj", 4, method="pissa", lora_alpha=8,
                              show_progress=False)
    save_init_dir(peft_model, tmp_path / "init", tiny_tokenizer(), source_model="tiny:llama",
                  targets="q_proj,v_proj", solver="gram", seed=3)
    assert read_init_record(tmp_path / "init") == InitRecord(
        method="pissa", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], targets="q_proj,v_proj",
        source_model="tiny:llama", solver="gram", seed=3,
    )


def test_a_model_of_unknown_method_needs_one(tmp_path):
    """A PEFT model apply_milora did not make: refused without `method=`, recorded as given with it."""
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with pytest.raises(MiLoRAError, match="the model's method is unknown .* pass method="):
        save_init_dir(plain, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    with pytest.raises(MiLoRAError, match="unknown method 'principal'"):
        save_init_dir(plain, tmp_path / "plain", method="principal")
    save_init_dir(plain, tmp_path / "plain", method="PiSSA")
    assert read_init_record(tmp_path / "plain").method == "pissa"


@pytest.mark.parametrize("metadata,method", [
    ({"mode": "principal", "r": 4, "source_model": "tiny:llama"}, "pissa"),  # written before `method`
    ({"mode": "minor"}, "milora"),
    ({}, None),  # no metadata named the method
])
def test_older_init_directories_still_load(tmp_path, metadata, method):
    peft_model = apply_milora(tiny_model("llama"), LLAMA_TARGETS, 4, method="pissa", show_progress=False)
    save_init_dir(peft_model, tmp_path / "init")
    (tmp_path / "init" / "milora_init" / "milora.json").write_text(json.dumps(metadata))
    record = read_init_record(tmp_path / "init")
    assert record.method == method and record.r == 4
    assert record.source_model == metadata.get("source_model")
    assert load_init_dir(tmp_path / "init") is not None


def test_plain_base_keys_of_a_peft_state_dict():
    from milora.init_dir import plain_base_key

    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    head = "base_model.model.lm_head"
    assert plain_base_key(f"{layer}.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert plain_base_key(f"{layer}.lora_A.default.weight") is None
    # a modules_to_save module: the residual base keeps the untouched copy, a merged model the trained one
    assert plain_base_key(f"{head}.original_module.weight") == "lm_head.weight"
    assert plain_base_key(f"{head}.modules_to_save.default.weight") is None
    assert plain_base_key(f"{head}.modules_to_save.default.weight", modules_to_save="trained") == "lm_head.weight"
    assert plain_base_key(f"{head}.original_module.weight", modules_to_save="trained") is None
    assert plain_base_key("model.norm.weight") == "model.norm.weight"  # a base model's own key
