"""What `--base` / `--tuned` / `--adapter` stand for, checked on real checkpoints, PEFT adapters and a
`milora init` directory built by hand (residual W - B0 A0 + milora_init/ adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from milora.analysis import loading


def weight_of(model, module_name: str) -> torch.Tensor:
    return model.get_submodule(module_name).weight.detach().double()


def test_detects_init_and_adapter_dirs(init_dirs, base_dir):
    assert loading.is_milora_init_dir(init_dirs["init_dir"])
    assert not loading.is_milora_init_dir(base_dir)
    assert not loading.is_milora_init_dir(init_dirs["trained_adapter"])
    assert loading.is_adapter_dir(init_dirs["trained_adapter"])
    assert loading.is_adapter_dir(init_dirs["init_dir"] / "milora_init")
    assert not loading.is_adapter_dir(init_dirs["init_dir"]) and not loading.is_adapter_dir(base_dir)
    assert loading.adapter_rank(init_dirs["trained_adapter"]) == 4


def test_resolve_sources_rules(init_dirs, base_dir, minor_tuned_dir):
    init_dir, adapter = str(init_dirs["init_dir"]), str(init_dirs["trained_adapter"])
    init_adapter = str(init_dirs["init_dir"] / "milora_init")

    base, tuned = loading.resolve_sources(init_dir, adapter)
    assert (base.model, base.adapter, base.kind) == (init_dir, init_adapter, "milora_init_dir")
    assert (tuned.model, tuned.adapter) == (init_dir, adapter)  # the adapter goes onto the residual

    base, tuned = loading.resolve_sources(str(base_dir), str(minor_tuned_dir))
    assert (base.model, base.adapter) == (str(base_dir), None)
    assert (tuned.model, tuned.adapter, tuned.kind) == (str(minor_tuned_dir), None, "checkpoint")

    _, tuned = loading.resolve_sources(str(base_dir), None, adapter)
    assert (tuned.model, tuned.adapter) == (str(base_dir), adapter)
    _, tuned = loading.resolve_sources(str(base_dir), str(minor_tuned_dir), adapter)
    assert (tuned.model, tuned.adapter) == (str(minor_tuned_dir), adapter)
    _, tuned = loading.resolve_sources(str(base_dir), init_dir)
    assert (tuned.model, tuned.adapter) == (init_dir, init_adapter)

    with pytest.raises(ValueError, match="adapter directory"):
        loading.resolve_sources(adapter, str(base_dir))
    with pytest.raises(ValueError, match="--tuned"):
        loading.resolve_sources(str(base_dir))
    with pytest.raises(ValueError, match="adapter_config.json"):
        loading.resolve_sources(str(base_dir), None, str(minor_tuned_dir))


def test_default_rank(init_dirs, base_dir, minor_tuned_dir):
    base, tuned = loading.resolve_sources(str(init_dirs["init_dir"]), str(minor_tuned_dir))
    assert loading.default_rank(base, tuned)[0] == 4
    base, tuned = loading.resolve_sources(str(base_dir), str(init_dirs["trained_adapter"]))
    assert loading.default_rank(base, tuned)[0] == 4
    base, tuned = loading.resolve_sources(str(base_dir), str(minor_tuned_dir))
    assert loading.default_rank(base, tuned) == (8, "default")


def test_init_dir_as_base_stands_for_the_original_weights(init_dirs):
    base, _ = loading.resolve_sources(str(init_dirs["init_dir"]), str(init_dirs["trained_adapter"]))
    model = loading.load_source(base)
    for name, original in init_dirs["original"].items():
        np.testing.assert_allclose(weight_of(model, name), original, atol=1e-6)
    from peft import PeftModel  # merged and unloaded: an ordinary transformers model again

    assert not isinstance(model, PeftModel)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_adapter_trained_from_init_dir_is_merged_onto_the_residual(init_dirs):
    base_source, tuned_source = loading.resolve_sources(str(init_dirs["init_dir"]), str(init_dirs["trained_adapter"]))
    base_model, tuned_model = loading.load_source(base_source), loading.load_source(tuned_source)
    for name, original in init_dirs["original"].items():
        residual = original - init_dirs["initial_delta"][name]
        np.testing.assert_allclose(weight_of(tuned_model, name), residual + init_dirs["trained_delta"][name], atol=1e-6)
        update = weight_of(tuned_model, name) - weight_of(base_model, name)
        expected = init_dirs["trained_delta"][name] - init_dirs["initial_delta"][name]  # B A - B0 A0
        np.testing.assert_allclose(update, expected, atol=1e-6)
        assert float(torch.linalg.matrix_norm(expected)) > 1e-2  # the check above is not vacuous
    # Weights without an adapter are the residual checkpoint's on both sides, bit for bit.
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(weight_of(base_model, name), weight_of(tuned_model, name))


def test_merge_in_memory_does_not_rerun_an_svd_init(tmp_path, init_dirs, base_dir):
    """An adapter config saying init_lora_weights="pissa" must not make PEFT re-initialise (and so change) the
    base weights while loading: the merge adds exactly the saved B A."""
    import shutil

    adapter = Path(shutil.copytree(init_dirs["trained_adapter"], tmp_path / "pissa_labelled"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    from milora.loading import load_model

    merged = loading.merge_adapter_in_memory(load_model(str(base_dir), dtype="float32"), str(adapter))
    plain = load_model(str(base_dir), dtype="float32")
    for name, delta in init_dirs["trained_delta"].items():
        np.testing.assert_allclose(weight_of(merged, name), weight_of(plain, name) + delta, atol=1e-6)


def test_load_tokenizer_skips_candidates_without_one(init_dirs, base_dir):
    from milora.tiny import tiny_tokenizer

    tokenizer = loading.load_tokenizer(None, str(init_dirs["trained_adapter"]), str(base_dir))
    text = "Forgetting, measured."
    expected = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.bos_token_id == 1
    with pytest.raises((OSError, ValueError)):  # the loader's own error for the last candidate
        loading.load_tokenizer(str(init_dirs["trained_adapter"]))


def test_init_dir_written_by_milora_core(tmp_path):
    """A `milora init` directory from `apply_milora` + `save_init_dir` (scaling 2): as --base it stands for the
    original weights; an adapter trained from it whose B moved gives dW = s dB A0, whose row space is A0's,
    i.e. W's minor right singular vectors (right similarity to bottom = 1, to top = 0)."""
    from milora import apply_milora, save_init_dir
    from milora.analysis.report import analyze
    from milora.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    names = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")
    original = {name: weight_of(model, name) for name in names}
    peft_model = apply_milora(model, ["q_proj", "v_proj"], r=4, method="milora", lora_alpha=8, show_progress=False)
    save_init_dir(peft_model, tmp_path / "init", tiny_tokenizer())
    generator = torch.Generator().manual_seed(3)
    expected_update = {}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                delta_B = 0.05 * torch.randn(module.lora_B["default"].weight.shape, generator=generator)
                module.lora_B["default"].weight.add_(delta_B)
                expected_update[name] = 2.0 * delta_B.double() @ module.lora_A["default"].weight.double()
    peft_model.save_pretrained(tmp_path / "trained")

    base_source, _ = loading.resolve_sources(str(tmp_path / "init"), str(tmp_path / "trained"))
    base_model = loading.load_source(base_source)
    for name, weight in original.items():
        np.testing.assert_allclose(weight_of(base_model, name), weight, atol=1e-5)

    report = analyze(str(tmp_path / "init"), str(tmp_path / "trained"), tmp_path / "out",
                     forgetting_data="none", show_progress=False)
    assert report["warnings"] == []
    assert report["r"] == 4
    assert report["base"]["kind"] == "milora_init_dir" and isinstance(report["base"]["init_metadata"], dict)
    assert {record["name"] for record in report["weights"]} == set(expected_update)
    for record in report["weights"]:
        assert record["similarity"]["bottom"]["right"] > 0.999
        assert record["similarity"]["top"]["right"] < 1e-3
        assert record["update_frobenius"] == pytest.approx(
            float(torch.linalg.matrix_norm(expected_update[record["name"]])), rel=1e-4)


def test_warns_when_an_init_dir_adapter_is_merged_onto_the_original_model(tmp_path, init_dirs, base_dir):
    """The adapter config names the init directory it was trained from (as `milora init` writes it)."""
    import shutil

    trained = Path(shutil.copytree(init_dirs["trained_adapter"], tmp_path / "trained"))
    config = json.loads((trained / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(init_dirs["init_dir"])
    (trained / "adapter_config.json").write_text(json.dumps(config))
    _, tuned = loading.resolve_sources(str(base_dir), str(trained))
    [warning] = loading.source_warnings(tuned)
    assert str(init_dirs["init_dir"]) in warning and "--base" in warning
    _, tuned = loading.resolve_sources(str(init_dirs["init_dir"]), str(trained))
    assert loading.source_warnings(tuned) == []
    _, tuned = loading.resolve_sources(str(base_dir), None, str(init_dirs["init_dir"] / "milora_init"))
    assert loading.source_warnings(tuned) == []
