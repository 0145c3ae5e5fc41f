"""Singular components of one weight matrix: the math behind MiLoRA, PiSSA and their ablations.

Everything here is a pure function of tensors. For `W = U S V^T` (out x in, singular values in
descending order) a *mode* picks `r` singular triplets:

- ``minor``     the last `r` (MiLoRA),
- ``principal`` the first `r` (PiSSA),
- ``mid``       `r` from the middle of the spectrum (paper, Table 6),
- ``random``    `r` chosen uniformly at random, seeded (paper, Table 6).

The chosen triplets become LoRA factors `B = U_r (S_r/s)^{1/2}`, `A = (S_r/s)^{1/2} V_r^T` with `s` the
LoRA scaling, so that `s * B A = U_r S_r V_r^T`, and the frozen base becomes `W - s * B A`.

Two exact methods compute the triplets, both in float64:

- ``gram`` (default): eigendecomposition of the smaller Gram matrix (`W^T W` or `W W^T`, size
  min(out, in)), then the other singular vectors by one matrix product. Cheaper than a full SVD and
  exact in float64 for the spectra of trained weights (the squared condition number stays far above
  float64 round-off).
- ``svd``: `torch.linalg.svd`, the reference (and what the paper's code runs per matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("minor", "principal", "mid", "random")
METHODS = ("gram", "svd")


@dataclass
class SingularComponents:
    """`r` singular triplets of a matrix: `U` (out x r), `S` (r,), `Vh` (r x in), and their positions in
    the descending spectrum (`indices`, 0 = largest)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    indices: torch.Tensor

    def product(self) -> torch.Tensor:
        return (self.U * self.S) @ self.Vh


def component_indices(rank: int, r: int, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions (0 = largest singular value) of the `r` triplets that `mode` selects among `rank`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if not 0 < r <= rank:
        raise ValueError(f"rank r={r} must be between 1 and {rank} (the matrix's smaller dimension)")
    if mode == "principal":
        return torch.arange(r)
    if mode == "minor":
        return torch.arange(rank - r, rank)
    if mode == "mid":
        start = (rank - r) // 2
        return torch.arange(start, start + r)
    return torch.randperm(rank, generator=generator)[:r].sort().values


def singular_components(
    weight: torch.Tensor,
    r: int,
    mode: str = "minor",
    *,
    method: str = "gram",
    generator: torch.Generator | None = None,
) -> SingularComponents:
    """The `r` singular triplets of `weight` (out x in) that `mode` selects, in float64 on `weight`'s device."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; expected one of {', '.join(METHODS)}")
    w = weight.to(torch.float64)
    indices = component_indices(min(w.shape), r, mode, generator)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        idx = indices.to(w.device)
        return SingularComponents(U[:, idx], S[idx], Vh[idx], indices)
    return _gram_components(w, indices)


def _gram_components(w: torch.Tensor, indices: torch.Tensor) -> SingularComponents:
    out_features, in_features = w.shape
    wide = out_features < in_features  # decompose the smaller Gram matrix
    gram = w @ w.T if wide else w.T @ w
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    rank = gram.shape[0]
    # singular position i (descending) is eigen position rank-1-i (ascending)
    eig_idx = (rank - 1 - indices).to(w.device)
    sigma = eigenvalues[eig_idx].clamp_min(0).sqrt()
    vectors = eigenvectors[:, eig_idx]
    # Guard exact zeros: the partner vector is then arbitrary and contributes nothing (sigma = 0).
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    if wide:
        U = vectors
        Vh = (U.T @ w) / safe_sigma[:, None]
        Vh = torch.where(sigma[:, None] > 0, Vh, torch.zeros_like(Vh))
    else:
        Vh = vectors.T
        U = (w @ vectors) / safe_sigma[None, :]
        U = torch.where(sigma[None, :] > 0, U, torch.zeros_like(U))
    return SingularComponents(U, sigma, Vh, indices)


def lora_factors(components: SingularComponents, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors `(B, A)` with `scaling * B @ A == U S Vh` and balanced norms (`B^T B = A A^T = S/scaling`).

    Dividing S by the scaling (as the paper's and PEFT's PiSSA code do) keeps the model output unchanged
    for any `lora_alpha`, not only `lora_alpha == r`.
    """
    root = (components.S / scaling).sqrt()
    B = components.U * root[None, :]
    A = root[:, None] * components.Vh
    return B, A


def residual_weight(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The frozen base that remains once the adapter holds `scaling * B A`: `W - scaling * B A` (float64)."""
    return weight.to(torch.float64) - scaling * (B.to(torch.float64) @ A.to(torch.float64))


def subspace_overlap(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two column spaces: ||Qa^T Qb||_F^2 / r (1 = same)."""
    qa, _ = torch.linalg.qr(basis_a.to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.to(torch.float64))
    r = min(qa.shape[1], qb.shape[1])
    return float((qa.T @ qb).pow(2).sum() / r)
