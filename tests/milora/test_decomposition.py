"""The decomposition math against float64 `torch.linalg.svd` references."""

import pytest
import torch

from milora.decomposition import (
    auto_solver,
    component_indices,
    lora_factors,
    residual_weight,
    singular_components,
    subspace_overlap,
)


def random_weight(out_features, in_features, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)


def reference(weight, indices):
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return U[:, indices], S[indices], Vh[indices]


@pytest.mark.parametrize("shape", [(48, 48), (96, 40), (40, 96)])
@pytest.mark.parametrize("mode", ["minor", "principal", "mid", "random"])
@pytest.mark.parametrize("solver", ["gram", "svd"])
def test_components_equal_float64_svd_parts(shape, mode, solver):
    weight = random_weight(*shape, seed=len(mode))
    r = 6
    found = singular_components(weight, r, mode, solver=solver, generator=torch.Generator().manual_seed(1))
    U, S, Vh = reference(weight, found.indices)
    torch.testing.assert_close(found.S, S, rtol=1e-9, atol=1e-12)
    # the triplet product is unique (no sign ambiguity): U_r S_r V_r^T
    torch.testing.assert_close(found.product(), (U * S) @ Vh, rtol=0, atol=1e-10 * float(S.max()))
    assert subspace_overlap(found.U, U) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(found.Vh.T, Vh.T) == pytest.approx(1.0, abs=1e-9)
    # orthonormal singular vectors
    torch.testing.assert_close(found.U.T @ found.U, torch.eye(r, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(320, 320), (700, 256), (256, 700)])
def test_subspace_iteration_matches_svd_minor_subspace(shape):
    weight = random_weight(*shape, seed=3)
    r = 8  # block 4r = 32 << min(shape): the iterative path, not the eigh fallback
    found = singular_components(weight, r, "minor", solver="subspace")
    U, S, Vh = reference(weight, torch.arange(min(shape) - r, min(shape)))
    torch.testing.assert_close(found.S, S, rtol=1e-8, atol=0)
    assert subspace_overlap(found.U, U) > 1 - 1e-10
    assert subspace_overlap(found.Vh.T, Vh.T) > 1 - 1e-10


def test_subspace_iteration_falls_back_on_singular_gram():
    weight = random_weight(200, 8, seed=4) @ random_weight(8, 200, seed=5)  # rank 8: singular Gram
    found = singular_components(weight, 4, "minor", solver="subspace")
    assert float(found.S.max()) < 1e-6 * float(torch.linalg.svdvals(weight.double())[0])
    assert found.U.shape == (200, 4)


def test_minor_and_principal_select_opposite_ends():
    weight = random_weight(30, 20)
    S_all = torch.linalg.svdvals(weight.double())
    minor = singular_components(weight, 5, "minor")
    principal = singular_components(weight, 5, "principal")
    torch.testing.assert_close(minor.S, S_all[-5:])
    torch.testing.assert_close(principal.S, S_all[:5])
    assert component_indices(20, 4, "mid").tolist() == [8, 9, 10, 11]


def test_random_mode_is_seeded():
    a = component_indices(50, 5, "random", torch.Generator().manual_seed(7))
    b = component_indices(50, 5, "random", torch.Generator().manual_seed(7))
    c = component_indices(50, 5, "random", torch.Generator().manual_seed(8))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 5


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_factors_reconstruct_weight_for_any_scaling(scaling):
    weight = random_weight(24, 16)
    components = singular_components(weight, 4, "minor")
    B, A = lora_factors(components, scaling)
    torch.testing.assert_close(scaling * B @ A, components.product())
    # balanced factors: B^T B = A A^T = diag(S / scaling)
    torch.testing.assert_close(B.T @ B, torch.diag(components.S / scaling), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(A @ A.T, torch.diag(components.S / scaling), atol=1e-12, rtol=1e-9)
    residual = residual_weight(weight, B, A, scaling)
    torch.testing.assert_close(residual + scaling * B @ A, weight.double())
    # the residual holds exactly the other singular values
    S_all = torch.linalg.svdvals(weight.double())
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:12], S_all[:12], rtol=1e-9, atol=1e-12)


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="between 1 and 16"):
        singular_components(random_weight(24, 16), 17, "minor")
    with pytest.raises(ValueError, match="unknown mode"):
        singular_components(random_weight(24, 16), 2, "smallest")


def test_orthonormal_basis_falls_back_to_qr_when_cholesky_qr_fails():
    from milora.decomposition import _orthonormal

    x = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = _orthonormal(x)
    torch.testing.assert_close(q.T @ q, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q @ (q.T @ x), x, atol=1e-12, rtol=0)  # the same column space
    x[:, 5] = 0  # rank deficient: the Cholesky factorisation of x^T x fails (a zero pivot)
    assert int(torch.linalg.cholesky_ex(x.T @ x, upper=True)[1]) != 0
    q = _orthonormal(x)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q @ (q.T @ x), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(896, 256), (256, 896), (32, 256)])
def test_subspace_iteration_converges_itself_on_a_dense_minor_spectrum(shape):
    """Random bf16 weights of the 70B benchmark's aspect ratios (up/down 3.5:1, k/v 1:8): the bottom of the
    Gram spectrum is dense (Marchenko-Pastur), the hard case for the iteration. It must converge by itself
    (no eigh fallback) to the float64 SVD's minor subspace."""
    from milora.decomposition import _minor_components_by_subspace_iteration, smaller_gram

    weight = random_weight(*shape, seed=6, dtype=torch.bfloat16)
    r = min(shape) // 16
    found = _minor_components_by_subspace_iteration(weight, *smaller_gram(weight), r)
    assert found is not None
    U, S, Vh = reference(weight, torch.arange(min(shape) - r, min(shape)))
    torch.testing.assert_close(found.S, S, rtol=1e-9, atol=0)
    assert subspace_overlap(found.U, U) > 1 - 1e-10
    assert subspace_overlap(found.Vh.T, Vh.T) > 1 - 1e-10
    torch.testing.assert_close(found.product(), (U * S) @ Vh, rtol=0, atol=1e-8 * float(S.max()))


def test_a_cholesky_qr_failure_between_checks_restarts_from_the_last_checked_basis(monkeypatch):
    """The iteration reads CholeskyQR's status only at its Rayleigh-Ritz steps. A failure in between (forced here
    on the third orthonormalisation, whose result is then garbage) sends it back to the last checked basis,
    reading every status from then on; it still converges to the float64 SVD's minor subspace."""
    import milora.decomposition as decomposition

    weight = random_weight(896, 256, seed=6, dtype=torch.bfloat16)
    r = 16
    calls = {"unchecked": 0, "checked": 0}
    unchecked, checked = decomposition._cholesky_qr, decomposition._orthonormal

    def failing_third(x, passes=2):
        calls["unchecked"] += 1
        q, inputs, infos = unchecked(x, passes)
        if calls["unchecked"] == 3:
            return torch.full_like(q, float("nan")), inputs, [infos[0] + 1, *infos[1:]]
        return q, inputs, infos

    def counted(x):
        calls["checked"] += 1
        return checked(x)

    monkeypatch.setattr(decomposition, "_cholesky_qr", failing_third)
    monkeypatch.setattr(decomposition, "_orthonormal", counted)
    found = decomposition._minor_components_by_subspace_iteration(weight, *decomposition.smaller_gram(weight), r)
    assert found is not None and calls["checked"] > 0
    U, S, Vh = reference(weight, torch.arange(256 - r, 256))
    assert subspace_overlap(found.U, U) > 1 - 1e-10
    assert subspace_overlap(found.Vh.T, Vh.T) > 1 - 1e-10


def test_one_cholesky_qr_pass_between_checks_keeps_the_iteration_count(monkeypatch):
    """Between Rayleigh-Ritz steps the basis gets one CholeskyQR pass (its column space is all inverse iteration
    uses), before each step two. The iteration needs as many steps as with two passes throughout and finds the
    float64 SVD's minor subspace."""
    import milora.decomposition as decomposition

    weight = random_weight(896, 256, seed=6, dtype=torch.bfloat16)
    r = 16
    original = decomposition._cholesky_qr

    def run(passes_between_checks):
        passes = []

        def recorded(x, passes_asked=2):
            passes.append(passes_asked)
            return original(x, passes_asked)

        monkeypatch.setattr(decomposition, "_cholesky_qr", recorded)
        monkeypatch.setattr(decomposition, "ORTHONORMAL_PASSES_BETWEEN_CHECKS", passes_between_checks)
        found = decomposition._minor_components_by_subspace_iteration(weight, *decomposition.smaller_gram(weight), r)
        return found, passes

    found, passes = run(1)
    _, passes_two = run(2)
    assert found is not None and 1 in passes and 2 in passes
    assert len(passes) == len(passes_two) and set(passes_two) == {2}
    U, S, Vh = reference(weight, torch.arange(256 - r, 256))
    assert subspace_overlap(found.U, U) > 1 - 1e-10
    assert subspace_overlap(found.Vh.T, Vh.T) > 1 - 1e-10


def test_shift_is_lowered_until_the_factorisation_succeeds():
    from milora.decomposition import _factor_below

    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=generator))
    gram = (q * torch.linspace(1.0, 2.0, 40, dtype=torch.float64)) @ q.T  # smallest eigenvalue 1
    factor, shift = _factor_below(gram, 1.5, 0.0)  # 1.5 fails: bisected towards the safe shift 0
    assert shift < 1.0
    torch.testing.assert_close(factor @ factor.T, gram - shift * torch.eye(40, dtype=torch.float64))
    assert _factor_below(gram, 0.9, 0.0)[1] == 0.9  # a shift below the spectrum is kept as asked


def test_subspace_iteration_on_a_singular_gram_goes_below_zero():
    """A rank-deficient weight: the Gram matrix is singular up to round-off, its Cholesky factorisation at
    shift 0 fails, the shift goes below zero, and the iteration returns vectors of the null space."""
    from milora.decomposition import _factor_below, _minor_components_by_subspace_iteration, smaller_gram

    weight = random_weight(300, 90, seed=7).double() @ random_weight(90, 120, seed=8).double()  # rank 90 < 120
    gram, wide = smaller_gram(weight)
    assert float(torch.linalg.eigvalsh(gram)[0]) < 1e-12 * float(torch.linalg.eigvalsh(gram)[-1])
    assert _factor_below(gram, 0.0, None)[1] < 0
    found = _minor_components_by_subspace_iteration(weight, gram, wide, 6)
    assert found is not None
    scale = float(torch.linalg.matrix_norm(weight, 2))
    assert float(found.S.max()) < 1e-7 * scale
    assert float((weight @ found.Vh.T).norm()) < 1e-7 * scale  # right vectors in the null space
    torch.testing.assert_close(found.Vh @ found.Vh.T, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)


def test_lanczos_estimate_bounds_the_smallest_eigenvalue():
    from milora.decomposition import _lowest_eigenvalue_estimate, smaller_gram

    gram, _ = smaller_gram(random_weight(700, 200, seed=9, dtype=torch.bfloat16))
    eigenvalues = torch.linalg.eigvalsh(gram)
    lowest, residual = _lowest_eigenvalue_estimate(gram, 40, torch.Generator().manual_seed(0))
    assert lowest >= float(eigenvalues[0]) * (1 - 1e-12)  # a Ritz value: not below the spectrum
    assert float((eigenvalues - lowest).abs().min()) <= residual * (1 + 1e-9)  # an eigenvalue within the residual
    assert lowest - residual < float(eigenvalues[0]) < float(eigenvalues[8])  # a first shift below the spectrum


@pytest.mark.parametrize("n", [7, 512, 513, 1300])
def test_lower_triangular_inverse_matches_float64_solve(n):
    from milora.decomposition import lower_triangular_inverse

    generator = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=generator, dtype=torch.float64).tril()
    lower.diagonal().copy_(lower.diagonal().abs() + n ** 0.5)  # well conditioned, as a Cholesky factor here is
    inverse = lower_triangular_inverse(lower)
    assert torch.equal(inverse, inverse.tril())
    identity = torch.eye(n, dtype=torch.float64)
    assert (inverse @ lower - identity).abs().max() < 1e-12
    expected = torch.linalg.solve_triangular(lower, identity, upper=False)
    assert torch.allclose(inverse, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [5, 64, 300])
def test_triangular_products_equal_full_products_and_never_read_the_upper_triangle(n, monkeypatch):
    """`lower_times` / `times_lower` split by halves down to 16-wide blocks here: the same product as a float64
    GEMM with the full lower-triangular matrix, and NaN in its upper right quarter is never read."""
    import milora.decomposition as decomposition

    monkeypatch.setattr(decomposition, "TRIANGULAR_PRODUCT_BLOCK", 16)
    generator = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=generator, dtype=torch.float64).tril()
    poisoned = lower.clone()
    if n > 16:
        poisoned[: n // 2, n // 2 :] = float("nan")
    right = torch.randn(n, 7, generator=generator, dtype=torch.float64)
    left = torch.randn(9, n, generator=generator, dtype=torch.float64)
    assert torch.allclose(decomposition.lower_times(poisoned, right), lower @ right, rtol=0, atol=1e-12)
    assert torch.allclose(decomposition.times_lower(left, poisoned), left @ lower, rtol=0, atol=1e-12)


@pytest.mark.parametrize("diagonal_block", [1000, 400])
@pytest.mark.parametrize("shape", [(2300, 5000), (4500, 2100)])
def test_gram_over_column_blocks_equals_the_full_product(shape, diagonal_block, monkeypatch):
    """Summed over the lower triangle of column blocks (here 3 blocks of at most 1000 columns, the diagonal ones
    whole or by sub-blocks of 400) and row chunks, mirrored: the same Gram matrix as the one float64 product."""
    import milora.decomposition as decomposition

    monkeypatch.setattr(decomposition, "GRAM_BLOCK", 1000)
    monkeypatch.setattr(decomposition, "GRAM_DIAGONAL_BLOCK", diagonal_block)
    monkeypatch.setattr(decomposition, "CHUNK_ELEMENTS", 1 << 20)
    weight = random_weight(*shape, seed=3, dtype=torch.bfloat16)
    gram, wide = decomposition.smaller_gram(weight)
    w = weight.to(torch.float64)
    expected = w @ w.T if wide else w.T @ w
    assert wide == (shape[0] < shape[1])
    assert torch.equal(gram, gram.T)
    assert torch.allclose(gram, expected, rtol=1e-13, atol=0)


def test_shifted_inverse_over_blocks_equals_the_dense_product(monkeypatch):
    import milora.decomposition as decomposition

    monkeypatch.setattr(decomposition, "GRAM_BLOCK", 300)
    generator = torch.Generator().manual_seed(5)
    inverse_factor = torch.randn(1000, 1000, generator=generator, dtype=torch.float64).tril()
    basis = torch.randn(1000, 40, generator=generator, dtype=torch.float64)
    expected = inverse_factor.T @ (inverse_factor @ basis)
    assert torch.allclose(decomposition._apply_shifted_inverse(inverse_factor, basis), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(("shape", "r", "mode", "on_gpu", "expected"), [
    ((4096, 4096), 64, "minor", True, "subspace"),     # LLaMA-2-7B's projections
    ((11008, 4096), 128, "minor", True, "subspace"),
    ((4096, 4096), 256, "minor", True, "gram"),        # a block of 8 r = 2048 vectors: half the Gram matrix
    ((1024, 8192), 64, "minor", True, "gram"),         # LLaMA-2-70B's k/v projections (docs/benchmarks.md)
    ((8192, 28672), 64, "minor", True, "subspace"),
    ((4096, 4096), 64, "principal", True, "gram"),     # the subspace iteration finds the minor end only
    ((4096, 4096), 64, "minor", False, "gram"),        # on the CPU, always the Gram matrix's eigh
])
def test_auto_takes_the_subspace_solver_only_for_a_small_minor_slice_on_a_gpu(shape, r, mode, on_gpu, expected):
    assert auto_solver(shape, r, mode, on_gpu) == expected
