"""Weight analyses on real tiny transformers models with constructed updates whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from milora.analysis import weights
from milora.tiny import tiny_model

RANK = 4


def tuned_copy(helpers, subset: str, targets=("q_proj", "v_proj")):
    """A tiny Llama whose `targets` weights carry a rank-4 update inside W's `subset` ("top"/"bottom") subspace."""
    model = tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                update = helpers.subspace_update(module.weight, RANK, subset, helpers.update_magnitudes(RANK))
                module.weight.add_(update.to(module.weight.dtype))
    return model


def analysed(base, tuned, **selection):
    pairs, notes = weights.select_weight_pairs(base, tuned, **selection)
    return [weights.analyze_weight_pair(pair, RANK, seed=0) for pair in pairs], notes


def test_only_changed_weights_are_selected_by_default(helpers):
    base, tuned = tiny_model("llama"), tuned_copy(helpers, "bottom")
    pairs, notes = weights.select_weight_pairs(base, tuned)
    assert sorted(pair.name for pair in pairs) == [
        f"model.layers.{i}.self_attn.{t}" for i in (0, 1) for t in ("q_proj", "v_proj")]
    assert notes["selected"] == 4 and notes["unchanged_skipped"] == 11  # 2 x 5 other linears + lm_head
    expected = {(t, i) for t in ("q_proj", "v_proj") for i in (0, 1)}
    assert {(pair.layer_type, pair.layer_index) for pair in pairs} == expected


def test_update_in_minor_subspace_is_similar_to_bottom_not_top(helpers):
    records, _ = analysed(tiny_model("llama"), tuned_copy(helpers, "bottom"))
    for record in records:
        for side in ("left", "right"):
            assert record["similarity"]["bottom"][side] > 0.999
            assert record["similarity"]["top"][side] < 1e-3
        assert record["update_spectrum"]["top_r_energy_fraction"] == pytest.approx(1.0, abs=1e-9)
        assert not record["unchanged"]


def test_update_in_principal_subspace_is_similar_to_top_not_bottom(helpers):
    records, _ = analysed(tiny_model("llama"), tuned_copy(helpers, "top"))
    for record in records:
        for side in ("left", "right"):
            assert record["similarity"]["top"][side] > 0.999
            assert record["similarity"]["bottom"][side] < 1e-3


def test_weight_metrics_equal_float64_hand_computation(helpers):
    base, tuned = tiny_model("llama"), tuned_copy(helpers, "bottom")
    records, _ = analysed(base, tuned)
    base_weights = dict(base.named_parameters())
    tuned_weights = dict(tuned.named_parameters())
    for record in records:
        W = base_weights[record["name"] + ".weight"].detach().double().numpy()
        dW = tuned_weights[record["name"] + ".weight"].detach().double().numpy() - W
        U_w, S_w, Vt_w = np.linalg.svd(W, full_matrices=False)
        U_d, S_d, Vt_d = np.linalg.svd(dW, full_matrices=False)
        top_left, top_right = U_d[:, :RANK], Vt_d[:RANK].T

        def phi(a, b):
            return np.sum((a.T @ b) ** 2) / min(a.shape[1], b.shape[1])

        assert record["similarity"]["top"]["left"] == pytest.approx(phi(top_left, U_w[:, :RANK]), abs=1e-10)
        assert record["similarity"]["bottom"]["right"] == pytest.approx(phi(top_right, Vt_w[-RANK:].T), abs=1e-10)
        positions = record["similarity"]["random_positions"]
        assert record["similarity"]["random"]["left"] == pytest.approx(phi(top_left, U_w[:, positions]), abs=1e-10)
        assert record["update_frobenius"] == pytest.approx(np.linalg.norm(dW), rel=1e-10)
        assert record["base_frobenius"] == pytest.approx(np.linalg.norm(W), rel=1e-12)
        projection = np.linalg.norm(top_left.T @ W @ top_right)
        assert record["amplification"]["factor"] == pytest.approx(np.linalg.norm(dW) / projection, rel=1e-8)
        # Known answer: dW lives in W's bottom-r singular pairs, so U^T W V holds W's r smallest singular values.
        assert projection == pytest.approx(np.sqrt(np.sum(S_w[-RANK:] ** 2)), rel=1e-6)
        assert record["amplification"]["projection_on_top_of_base"] == pytest.approx(
            np.sqrt(np.sum(S_w[:RANK] ** 2)), rel=1e-12)
        assert record["base_spectrum"]["minor_energy_fraction"] == pytest.approx(
            np.sum(S_w[-RANK:] ** 2) / np.sum(S_w ** 2), rel=1e-10)
        np.testing.assert_allclose(record["_spectra"]["base"].numpy(), S_w, rtol=1e-10)
        np.testing.assert_allclose(record["_spectra"]["update"].numpy()[:RANK], S_d[:RANK], rtol=1e-8)
        # The update was built with magnitudes 0.08 ... 0.04 (stored in float32).
        np.testing.assert_allclose(S_d[:RANK], helpers.update_magnitudes(RANK).numpy(), rtol=1e-5)


def test_random_baselines_are_seeded_and_plausible(helpers):
    base, tuned = tiny_model("llama"), tuned_copy(helpers, "bottom")
    pair = weights.select_weight_pairs(base, tuned)[0][0]
    first = weights.analyze_weight_pair(pair, RANK, seed=0)
    again = weights.analyze_weight_pair(pair, RANK, seed=0)
    other = weights.analyze_weight_pair(pair, RANK, seed=1)
    assert first["amplification"]["random_factor"] == again["amplification"]["random_factor"]
    assert first["similarity"]["random_positions"] == again["similarity"]["random_positions"]
    assert first["amplification"]["random_factor"] != other["amplification"]["random_factor"]
    # Random directions of W hold about r/n of its energy in each side: ||Ur^T W Vr||_F^2 ~ (r/m)(r/n)||W||_F^2,
    # far from the top-r projection.
    random_projection = first["amplification"]["projection_on_random_directions"]
    assert 0 < random_projection < first["amplification"]["projection_on_top_of_base"]


def test_targets_and_layers_filters_keep_unchanged_matches(helpers):
    base, tuned = tiny_model("llama"), tuned_copy(helpers, "bottom", targets=("q_proj",))
    pairs, _ = weights.select_weight_pairs(base, tuned, targets=["q_proj", "mlp.up_proj"], layers={1})
    assert [pair.name for pair in pairs] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    records = [weights.analyze_weight_pair(pair, RANK) for pair in pairs]
    assert records[0]["unchanged"] is False
    assert records[1]["unchanged"] is True and records[1]["similarity"] is None
    assert records[1]["update_frobenius"] == 0.0


def test_gpt2_conv1d_weights_are_oriented_out_by_in(helpers):
    from transformers.pytorch_utils import Conv1D

    base, tuned = tiny_model("gpt2"), tiny_model("gpt2")
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
    pairs, _ = weights.select_weight_pairs(base, tuned)
    assert [pair.name for pair in pairs] == ["transformer.h.0.attn.c_attn"]
    module = base.transformer.h[0].attn.c_attn
    assert isinstance(module, Conv1D)
    assert tuple(pairs[0].base.shape) == (module.nf, module.weight.shape[0])  # out x in
    assert torch.equal(pairs[0].base, module.weight.T)


def test_summary_by_layer_type_averages_records(helpers):
    records, _ = analysed(tiny_model("llama"), tuned_copy(helpers, "bottom"))
    summary = weights.summarize_by_layer_type(records)
    assert set(summary) == {"q_proj", "v_proj"}
    q_records = [rec for rec in records if rec["layer_type"] == "q_proj"]
    entry = summary["q_proj"]
    assert entry["weights"] == entry["changed"] == 2
    assert entry["similarity"]["bottom"]["left"] == pytest.approx(
        np.mean([rec["similarity"]["bottom"]["left"] for rec in q_records]), rel=1e-12)
    assert entry["amplification"]["factor"] == pytest.approx(
        np.mean([rec["amplification"]["factor"] for rec in q_records]), rel=1e-12)
    expected_grid = np.mean([rec["_grids"]["random"]["right"].numpy() for rec in q_records], axis=0)
    np.testing.assert_allclose(entry["similarity_grid"]["random"]["right"], expected_grid, rtol=1e-12)
    assert np.asarray(entry["similarity_grid"]["top"]["left"]).shape == (RANK, RANK)


def test_parse_specs():
    assert weights.parse_layer_spec("0,3,10-12") == {0, 3, 10, 11, 12}
    assert weights.parse_layer_spec(None) is None
    with pytest.raises(ValueError):
        weights.parse_layer_spec("5-2")
    assert weights.parse_target_spec(" q_proj, v_proj ,") == ["q_proj", "v_proj"]
    assert weights.parse_target_spec("") is None
    assert weights.matches_target("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not weights.matches_target("model.layers.0.self_attn.q_proj", ["proj"])
    assert weights.layer_index_of("model.layers.12.mlp.up_proj") == 12
    assert weights.layer_index_of("lm_head") is None
    assert weights.layer_type_of("model.language_model.layers.0.self_attn.q_proj") == "q_proj"
    assert weights.layer_type_of("model.vision_tower.encoder.layers.0.self_attn.q_proj") == "vision.q_proj"
