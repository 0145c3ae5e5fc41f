"""`milora.streaming`: many matrices decomposed and replaced by their residual, staged through host buffers or in
place, on the CPU (the same steps a GPU runs, without streams), checked against float64 SVD."""

import pytest
import torch

from milora import decomposition, streaming
from milora.errors import MiLoRAError
from milora.streaming import Matrix, TransferStats, decompose_matrices

SHAPES = [(48, 32), (32, 48), (40, 40)]


def weights(dtype):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator).to(dtype) for shape in SHAPES]


def matrices(tensors, r=4, scaling=0.5):
    return [Matrix(f"m{i}", w, r, scaling) for i, w in enumerate(tensors)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("staged", [False, True])
def test_factors_are_the_float64_minor_slice_and_weights_the_residual(dtype, staged):
    originals = weights(dtype)
    tensors = [w.clone() for w in originals]
    stats = TransferStats()
    factors = decompose_matrices(matrices(tensors), "minor", device="cpu", solver="gram", staged=staged, stats=stats)
    for original, residual, (B, A) in zip(originals, tensors, factors, strict=True):
        W = original.double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        expected = (U[:, -4:] * S[-4:]) @ Vh[-4:]
        assert B.dtype == A.dtype == torch.float64
        torch.testing.assert_close(0.5 * B @ A, expected, atol=1e-10 * float(S[0]), rtol=0)
        assert residual.dtype == dtype
        # the residual is W - s B A computed in float64 and rounded once to the weight's dtype
        torch.testing.assert_close(residual, (W - 0.5 * B @ A).to(dtype), atol=0, rtol=0)
    nbytes = sum(w.numel() * w.element_size() for w in originals)
    assert (stats.bytes_to_device, stats.bytes_to_host) == ((nbytes, nbytes) if staged else (0, 0))


def test_staged_and_in_place_agree_including_transposed_views():
    # a transposed view is how GPT-2's Conv1D weights reach the decomposition
    base = [w.T.contiguous() for w in weights(torch.float32)]
    direct, staged = [w.clone() for w in base], [w.clone() for w in base]
    f_direct = decompose_matrices(matrices([w.T for w in direct]), "minor", device="cpu", staged=False)
    f_staged = decompose_matrices(matrices([w.T for w in staged]), "minor", device="cpu", staged=True)
    for a, b, original in zip(direct, staged, base, strict=True):
        assert not torch.equal(a, original)  # written back through the view
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for (Ba, Aa), (Bb, Ab) in zip(f_direct, f_staged, strict=True):
        # the staged copy is contiguous where the view is transposed: GEMMs may round differently
        torch.testing.assert_close(Ba @ Aa, Bb @ Ab, atol=1e-12, rtol=0)


def test_chunked_gram_partner_and_residual_equal_the_whole_matrix_computation(monkeypatch):
    originals = weights(torch.float32)
    whole = [w.clone() for w in originals]
    f_whole = decompose_matrices(matrices(whole), "minor", device="cpu")
    monkeypatch.setattr(decomposition, "CHUNK_ELEMENTS", 7 * 40)  # a handful of rows per chunk
    assert len(decomposition._row_chunks(48, 40)) > 5
    chunked = [w.clone() for w in originals]
    f_chunked = decompose_matrices(matrices(chunked), "minor", device="cpu")
    for (Bw, Aw), (Bc, Ac) in zip(f_whole, f_chunked, strict=True):
        torch.testing.assert_close(Bc @ Ac, Bw @ Aw, atol=1e-12, rtol=0)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_given_factors_only_form_the_residual(monkeypatch):
    originals = weights(torch.float32)
    first = [w.clone() for w in originals]
    factors = decompose_matrices(matrices(first), "principal", device="cpu")

    def must_not_run(*args, **kwargs):
        raise AssertionError("decomposition ran with the factors given")

    monkeypatch.setattr(streaming, "singular_components", must_not_run)
    again = [w.clone() for w in originals]
    given = [Matrix(m.name, m.weight, m.r, m.scaling, factors=f) for m, f in zip(matrices(again), factors, strict=True)]
    decompose_matrices(given, "principal", device="cpu", staged=True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_on_done_is_called_in_order():
    seen = []
    found = decompose_matrices(matrices(weights(torch.float32)), "minor", device="cpu",
                               on_done=lambda index, B, A: seen.append((index, B.shape, A.shape)))
    assert found == []  # handed over, not kept
    assert seen == [(i, (shape[0], 4), (4, shape[1])) for i, shape in enumerate(SHAPES)]


def test_nan_weight_is_refused_on_the_decomposition_device_before_it_is_written():
    tensors = weights(torch.float32)
    tensors[1][3, 5] = float("nan")
    before = tensors[1].clone()
    with pytest.raises(MiLoRAError, match="m1: the weight holds NaN or inf"):
        decompose_matrices(matrices(tensors), "minor", device="cpu", staged=True, check_values=True)
    assert torch.equal(tensors[1].nan_to_num(), before.nan_to_num())
