"""`milora.analysis.metrics` against float64 hand computations (numpy) and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from milora.analysis import metrics


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def test_subspace_similarity_matches_definition():
    A, B = orthonormal(20, 6, 0), orthonormal(20, 5, 1)
    for i, j in [(1, 1), (3, 5), (6, 2), (6, 5)]:
        expected = np.sum((A[:, :i].T @ B[:, :j]) ** 2) / min(i, j)
        assert metrics.subspace_similarity(torch.from_numpy(A), torch.from_numpy(B), i, j) == pytest.approx(
            expected, rel=1e-12, abs=1e-15)


def test_subspace_similarity_known_answers():
    basis = orthonormal(30, 10, 2)
    same = torch.from_numpy(basis)
    assert metrics.subspace_similarity(same, same, 10, 10) == pytest.approx(1.0, abs=1e-12)
    # Orthogonal spans: 0. A span inside a larger one: 1 (normalized by the smaller dimension).
    assert metrics.subspace_similarity(same[:, :4], same[:, 4:], 4, 6) == pytest.approx(0.0, abs=1e-14)
    assert metrics.subspace_similarity(same[:, :3], same, 3, 10) == pytest.approx(1.0, abs=1e-12)
    # Half of a 2-dim span shared: phi = 1/2.
    assert metrics.subspace_similarity(same[:, [0, 1]], same[:, [1, 2]], 2, 2) == pytest.approx(0.5, abs=1e-12)


def test_subspace_similarity_rejects_out_of_range_counts():
    basis = torch.from_numpy(orthonormal(8, 3, 3))
    with pytest.raises(ValueError):
        metrics.subspace_similarity(basis, basis, 4, 1)


def test_similarity_grid_equals_scalar_function_everywhere():
    A = torch.from_numpy(orthonormal(16, 5, 4))
    B = torch.from_numpy(orthonormal(16, 7, 5))
    grid = metrics.subspace_similarity_grid(A, B)
    assert grid.shape == (5, 7) and grid.dtype == torch.float64
    for i in range(1, 6):
        for j in range(1, 8):
            assert grid[i - 1, j - 1].item() == pytest.approx(metrics.subspace_similarity(A, B, i, j), rel=1e-12)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 1.0 + 1e-12


def test_singular_value_decomposition_is_float64_and_reconstructs():
    matrix = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    U, S, V = metrics.singular_value_decomposition(matrix)
    assert U.dtype == S.dtype == V.dtype == torch.float64
    assert U.shape == (7, 4) and V.shape == (4, 4)
    assert torch.all(S[:-1] >= S[1:])
    np.testing.assert_allclose((U * S) @ V.T, matrix.double(), atol=1e-12)
    np.testing.assert_allclose(S, np.linalg.svd(matrix.double().numpy(), compute_uv=False), rtol=1e-12)


@pytest.mark.parametrize("subset,expected", [("top", [0, 1, 2]), ("bottom", [9, 8, 7])])
def test_subset_indices_top_and_bottom(subset, expected):
    assert metrics.subset_indices(10, 3, subset).tolist() == expected


def test_subset_indices_random_is_seeded_and_distinct():
    first = metrics.subset_indices(50, 8, "random", torch.Generator().manual_seed(3))
    again = metrics.subset_indices(50, 8, "random", torch.Generator().manual_seed(3))
    other = metrics.subset_indices(50, 8, "random", torch.Generator().manual_seed(4))
    assert first.tolist() == again.tolist() != other.tolist()
    assert len(set(first.tolist())) == 8 and all(0 <= i < 50 for i in first.tolist())
    with pytest.raises(ValueError):
        metrics.subset_indices(5, 6, "top")
    with pytest.raises(ValueError):
        metrics.subset_indices(5, 2, "middle")


def test_random_orthonormal_basis():
    basis = metrics.random_orthonormal_basis(12, 5, torch.Generator().manual_seed(0))
    assert basis.shape == (12, 5) and basis.dtype == torch.float64
    np.testing.assert_allclose(basis.T @ basis, np.eye(5), atol=1e-12)
    again = metrics.random_orthonormal_basis(12, 5, torch.Generator().manual_seed(0))
    assert torch.equal(basis, again)


def test_projection_and_amplification_match_hand_computation():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((9, 6))
    U, V = orthonormal(9, 2, 7), orthonormal(6, 2, 8)
    expected = np.sqrt(np.sum((U.T @ W @ V) ** 2))
    got = metrics.projection_frobenius_norm(torch.from_numpy(W), torch.from_numpy(U), torch.from_numpy(V))
    assert got == pytest.approx(expected, rel=1e-12)
    assert metrics.frobenius_norm(torch.from_numpy(W)) == pytest.approx(np.linalg.norm(W), rel=1e-12)
    assert metrics.amplification_factor(3.0, 1.5) == 2.0
    assert metrics.amplification_factor(1.0, 0.0) == math.inf
    assert math.isnan(metrics.amplification_factor(0.0, 0.0))


def test_amplification_of_update_along_top_singular_direction():
    """dW = c u1 v1^T: the projection of W on (u1, v1) is sigma_1, so the factor is c / sigma_1."""
    W = torch.from_numpy(np.random.default_rng(9).standard_normal((8, 5)))
    U, S, V = metrics.singular_value_decomposition(W)
    update = 0.3 * torch.outer(U[:, 0], V[:, 0])
    Ud, _, Vd = metrics.singular_value_decomposition(update)
    projection = metrics.projection_frobenius_norm(W, Ud[:, :1], Vd[:, :1])
    assert projection == pytest.approx(S[0].item(), rel=1e-12)
    factor = metrics.amplification_factor(metrics.frobenius_norm(update), projection)
    assert factor == pytest.approx(0.3 / S[0].item(), rel=1e-12)


def test_spectrum_summary():
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    summary = metrics.spectrum_summary(s, 2)
    total = 25 + 16 + 9 + 4 + 1
    assert summary["principal_energy_fraction"] == pytest.approx(41 / total)
    assert summary["minor_energy_fraction"] == pytest.approx(5 / total)
    assert (summary["sigma_max"], summary["sigma_r"], summary["sigma_minor_max"], summary["sigma_min"]) == (5, 4, 2, 1)
    assert metrics.spectrum_summary(s, 9)["r"] == 5  # r is clamped to the rank


def hand_divergences(base_logits: np.ndarray, tuned_logits: np.ndarray):
    """Per-row H(p), CE(p, q), KL(p||q) in float64 by the textbook formulas."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(base_logits), log_softmax(tuned_logits)
    p = np.exp(log_p)
    return -(p * log_p).sum(-1), -(p * log_q).sum(-1), (p * (log_p - log_q)).sum(-1)


def test_divergence_sums_match_hand_computation_with_mask():
    rng = np.random.default_rng(10)
    base = rng.standard_normal((2, 5, 11)) * 3
    tuned = base + rng.standard_normal((2, 5, 11))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = mask.astype(bool)
    got = metrics.next_token_divergence_sums(
        torch.from_numpy(base).float(), torch.from_numpy(tuned).float(), torch.from_numpy(mask))
    # float32 logits are upcast: compare with the hand computation on the same float32 values.
    entropy, cross_entropy, kl = hand_divergences(base.astype(np.float32).astype(np.float64),
                                                  tuned.astype(np.float32).astype(np.float64))
    assert got["token_count"] == 8
    assert got["base_entropy_sum"] == pytest.approx(entropy[keep].sum(), rel=1e-12)
    assert got["cross_entropy_sum"] == pytest.approx(cross_entropy[keep].sum(), rel=1e-12)
    assert got["kl_sum"] == pytest.approx(kl[keep].sum(), rel=1e-10)
    assert got["kl_sum"] > 0
    assert got["cross_entropy_sum"] - got["base_entropy_sum"] == pytest.approx(got["kl_sum"], rel=1e-9)


def test_divergence_chunking_does_not_change_the_sums():
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(3, 7, 13, generator=generator)
    tuned = torch.randn(3, 7, 13, generator=generator)
    whole = metrics.next_token_divergence_sums(base, tuned)
    chunked = metrics.next_token_divergence_sums(base, tuned, max_elements_per_chunk=13 * 2)
    for key in ("base_entropy_sum", "cross_entropy_sum", "kl_sum"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)


def test_identical_distributions_give_zero_kl_and_entropy_as_cross_entropy():
    logits = torch.randn(4, 6, 17, generator=torch.Generator().manual_seed(12)) * 4
    sums = metrics.next_token_divergence_sums(logits, logits.clone())
    assert sums["kl_sum"] == 0.0
    assert sums["cross_entropy_sum"] == pytest.approx(sums["base_entropy_sum"], rel=1e-14)
    entropy, _, _ = hand_divergences(logits.double().numpy(), logits.double().numpy())
    assert sums["base_entropy_sum"] == pytest.approx(entropy.sum(), rel=1e-12)


def test_divergence_handles_underflowing_probabilities():
    """A one-hot base distribution (-inf logits, as models that mask vocabulary entries produce) gives finite
    sums: 0 log 0 counts as 0, not nan."""
    base = torch.tensor([[0.0, -math.inf, -math.inf]])
    tuned = torch.tensor([[0.0, 1.0, 2.0]])
    sums = metrics.next_token_divergence_sums(base, tuned)
    expected_ce = -math.log(math.exp(0) / (1 + math.e + math.e ** 2))
    assert sums["base_entropy_sum"] == 0.0
    assert sums["cross_entropy_sum"] == pytest.approx(expected_ce, rel=1e-12)
    assert sums["kl_sum"] == pytest.approx(expected_ce, rel=1e-12)


def test_next_token_nll_sum_matches_hand_computation():
    rng = np.random.default_rng(13)
    logits = rng.standard_normal((2, 4, 6))
    input_ids = np.array([[1, 2, 3, 4], [5, 0, 2, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    got = metrics.next_token_nll_sum(torch.from_numpy(logits), torch.from_numpy(input_ids), torch.from_numpy(mask))
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected, count = 0.0, 0
    for row in range(2):
        for t in range(3):
            if mask[row, t] and mask[row, t + 1]:
                expected -= log_q[row, t, input_ids[row, t + 1]]
                count += 1
    assert got["token_count"] == count == 5
    assert got["nll_sum"] == pytest.approx(expected, rel=1e-12)
