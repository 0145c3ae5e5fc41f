"""`milora analyze` end to end: argument handling, report.json contents, PNG plots, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from milora.cli import main as milora_main

PLOTS = ("summary.png", "similarity_heatmaps.png", "similarity_by_layer.png", "spectra.png", "amplification.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args) -> int:
    """`milora analyze ARGS` through the dispatcher, which turns bad input into status 2."""
    return milora_main(["analyze", *map(str, args), "--no_progress"])


def read_report(out_dir) -> dict:
    return json.loads((out_dir / "report.json").read_text())


def assert_complete_output(out_dir):
    for name in PLOTS:
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        from matplotlib.image import imread

        image = imread(out_dir / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    assert (out_dir / "spectra.json").is_file()
    assert not [p.name for p in out_dir.iterdir() if ".tmp-" in p.name]  # no leftovers of atomic writes


def test_merged_checkpoint_with_minor_update(tmp_path, base_dir, minor_tuned_dir, text_file):
    out = tmp_path / "out"
    assert run("--base", base_dir, "--tuned", minor_tuned_dir, "--out", out, "--r", 4,
               "--forgetting_data", text_file, "--max_samples", 3, "--seq_len", 32, "--batch_size", 2) == 0
    report = read_report(out)
    assert_complete_output(out)
    assert report["r"] == 4 and report["r_source"] == "--r"
    assert report["selection"]["selected"] == 4
    for layer_type in ("q_proj", "v_proj"):
        similarity = report["by_layer_type"][layer_type]["similarity"]
        assert similarity["bottom"]["left"] > 0.999 and similarity["bottom"]["right"] > 0.999
        assert similarity["top"]["left"] < 1e-3 and similarity["top"]["right"] < 1e-3
        assert np.asarray(report["by_layer_type"][layer_type]["similarity_grid"]["bottom"]["left"]).shape == (4, 4)
    forgetting = report["forgetting"]
    assert forgetting["num_sequences"] == 3 and forgetting["num_tokens"] == 3 * 32
    assert forgetting["forgetting_loss"] > 0
    kl = forgetting["cross_entropy"] - forgetting["base_entropy"]
    assert kl == pytest.approx(forgetting["forgetting_loss"], rel=1e-6)
    spectra = json.loads((out / "spectra.json").read_text())
    assert set(spectra) == {record["name"] for record in report["weights"]}
    assert len(spectra["model.layers.0.self_attn.q_proj"]["base"]) == 64


def test_init_dir_and_trained_adapter(tmp_path, init_dirs, text_file):
    """--base DIR (milora init) --tuned ADAPTER: dW = B A - B0 A0, r from the adapter."""
    out = tmp_path / "out"
    assert run("--base", init_dirs["init_dir"], "--tuned", init_dirs["trained_adapter"], "--out", out,
               "--forgetting_data", text_file, "--max_samples", 2, "--seq_len", 16) == 0
    report = read_report(out)
    assert report["r"] == 4 and "milora_init" in report["r_source"]
    assert report["base"]["kind"] == "milora_init_dir"
    assert report["tuned"]["adapter"] == str(init_dirs["trained_adapter"])
    records = {record["name"]: record for record in report["weights"]}
    assert set(records) == set(init_dirs["original"])
    for name, record in records.items():
        expected = init_dirs["trained_delta"][name] - init_dirs["initial_delta"][name]
        assert record["update_frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(expected)), rel=1e-5)
        W = init_dirs["original"][name]
        assert record["base_frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(W)), rel=1e-6)


def test_identical_models_report_zero_forgetting_and_no_changed_weights(tmp_path, base_dir, text_file):
    out = tmp_path / "out"
    assert run("--base", base_dir, "--tuned", base_dir, "--out", out, "--forgetting_data", text_file,
               "--max_samples", 2, "--seq_len", 16) == 0
    report = read_report(out)
    assert report["forgetting"]["forgetting_loss"] == 0.0
    assert report["forgetting"]["cross_entropy"] == pytest.approx(report["forgetting"]["base_entropy"], rel=1e-12)
    assert report["selection"]["selected"] == 0 and report["weights"] == []
    assert_complete_output(out)


def test_targets_and_layers_select_weights(tmp_path, base_dir, minor_tuned_dir):
    out = tmp_path / "out"
    assert run("--base", base_dir, "--tuned", minor_tuned_dir, "--out", out, "--targets", "q_proj,up_proj",
               "--layers", "1", "--forgetting_data", "none") == 0
    report = read_report(out)
    names = [record["name"] for record in report["weights"]]
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    assert [record["unchanged"] for record in report["weights"]] == [False, True]
    assert report["r"] == 8 and report["r_source"] == "default"
    assert report["forgetting"] == {"skipped": "no --forgetting_data"}
    assert_complete_output(out)


def test_unreachable_default_corpus_is_skipped_with_a_reason(tmp_path, base_dir, minor_tuned_dir, capsys):
    """Tests run offline (HF_HUB_OFFLINE=1), so the WikiText default cannot load: the run still succeeds."""
    from milora.analysis.report import analyze

    out = tmp_path / "out"
    analyze(str(base_dir), str(minor_tuned_dir), out, targets="q_proj", show_progress=False, plot_names=())
    report = read_report(out)
    assert report["files"] == {"spectra": "spectra.json"} and not list(out.glob("*.png"))
    assert "wikitext" in report["forgetting"]["skipped"]
    assert "warning" in capsys.readouterr().err


def test_errors_return_status_2(tmp_path, base_dir, init_dirs, capsys):
    assert run("--base", base_dir, "--out", tmp_path / "a") == 2  # no --tuned / --adapter
    assert run("--base", base_dir, "--tuned", base_dir, "--out", tmp_path / "b", "--r", 0) == 2
    assert run("--base", base_dir, "--tuned", base_dir, "--out", tmp_path / "c",
               "--forgetting_data", tmp_path / "missing.txt") == 2
    assert run("--base", init_dirs["trained_adapter"], "--tuned", base_dir, "--out", tmp_path / "d") == 2
    assert run("--base", base_dir, "--tuned", base_dir, "--out", tmp_path / "e", "--layers", "3-1") == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "adapter directory" in err and "--layers" in err
    assert not (tmp_path / "c" / "report.json").exists()


def test_help_through_the_milora_dispatcher(capsys):
    assert milora_main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--base", "--tuned", "--adapter", "--out", "--r", "--targets", "--layers", "--forgetting_data",
                   "--max_samples", "--batch_size", "--device"):
        assert option in out


def test_readme_example_is_reproducible(tmp_path):
    """`python -m milora.analysis.example` (the README figure): MiLoRA-like update, small PNG."""
    from milora.analysis import example

    png = tmp_path / "analysis_example.png"
    assert example.main([str(tmp_path / "report"), "--png", str(png), "--summary_only"]) == 0
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size < 150_000
    report = read_report(tmp_path / "report")
    assert report["base"]["model"] == "tiny:llama"
    assert len(report["by_layer_type"]) == len(example.EXAMPLE_TARGETS)
    for entry in report["by_layer_type"].values():
        assert entry["similarity"]["bottom"]["left"] > 0.9 > 0.05 > entry["similarity"]["top"]["left"]
