"""Singular components of one weight matrix: the math behind MiLoRA, PiSSA and their ablations.

Everything here is a pure function of tensors. For `W = U S V^T` (out x in, singular values in
descending order) a *mode* picks `r` singular triplets:

- ``minor``     the last `r` (MiLoRA),
- ``principal`` the first `r` (PiSSA),
- ``mid``       `r` from the middle of the spectrum (paper, Table 6),
- ``random``    `r` chosen uniformly at random, seeded (paper, Table 6).

The chosen triplets become LoRA factors `B = U_r (S_r/s)^{1/2}`, `A = (S_r/s)^{1/2} V_r^T` with `s` the
LoRA scaling, so that `s * B A = U_r S_r V_r^T`, and the frozen base becomes `W - s * B A`.

A *solver* computes the triplets, always in float64 (the family names milora/pissa/lora are
`milora.model.METHODS`; a solver is only the algorithm):

- ``gram``: eigendecomposition of the smaller Gram matrix (`W^T W` or `W W^T`, size
  min(out, in)), then the other singular vectors by one matrix product. Cheaper than a full SVD and
  exact in float64 for the spectra of trained weights (the squared condition number stays far above
  float64 round-off).
- ``svd``: `torch.linalg.svd`, the reference (and what the paper's code runs per matrix).
- ``subspace``: for the minor mode only, block inverse iteration on the Gram matrix (a block of 4 r vectors;
  each iteration two GEMMs with the explicit inverse of the shifted Gram matrix's Cholesky factor, work which
  GPUs run far faster than the tridiagonalisation inside `eigh` or triangular solves). The first shift is a
  Lanczos estimate of the smallest eigenvalue (matrix-vector products only); each Rayleigh-Ritz step moves the
  shift up to the lowest Ritz value less its residual (and a margin), refactorising when that speeds
  convergence noticeably; a failed factorisation (shift above the smallest eigenvalue) bisects the shift back
  down. Once the shift stays, the residuals' decay rate predicts when to check again, and the Rayleigh-Ritz
  steps in between are skipped. It stops when every wanted Ritz pair's residual `||G v - theta v||` is below
  `1e-7` of the mean eigenvalue, and falls back to the `gram` solver when that does not happen within its
  iteration budget or no shift gives a factorisation, so the result is always the exact minor subspace up to
  float64 round-off.

``auto`` (the default) picks ``subspace`` for the minor mode on a GPU when r is small against the matrix
(the case of real models), and ``gram`` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("minor", "principal", "mid", "random")
SOLVERS = ("auto", "gram", "svd", "subspace")
DEFAULT_SOLVER = "auto"


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


def auto_solver(shape: tuple[int, int], r: int, mode: str, on_gpu: bool) -> str:
    """The solver `auto` stands for: `subspace` for a minor slice on a GPU with r small against the matrix
    (`SUBSPACE_MAX_RANK_FRACTION`), else `gram`."""
    small_rank = SUBSPACE_MAX_RANK_FRACTION * r <= min(shape)
    return "subspace" if mode == "minor" and on_gpu and small_rank else "gram"


def singular_components(
    weight: torch.Tensor,
    r: int,
    mode: str = "minor",
    *,
    solver: str = DEFAULT_SOLVER,
    generator: torch.Generator | None = None,
) -> SingularComponents:
    """The `r` singular triplets of `weight` (out x in) that `mode` selects, in float64 on `weight`'s device."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    indices = component_indices(min(weight.shape), r, mode, generator)
    if solver == "auto":
        solver = auto_solver(tuple(weight.shape), r, mode, weight.is_cuda)
    if solver == "svd":
        U, S, Vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        idx = indices.to(weight.device)
        return SingularComponents(U[:, idx], S[idx], Vh[idx], indices)
    gram, wide = smaller_gram(weight)
    if solver == "subspace":
        if mode != "minor":
            raise ValueError("the subspace solver computes minor components only; use solver='gram'")
        found = _minor_components_by_subspace_iteration(weight, gram, wide, r)
        if found is not None:
            return found
    return _gram_components(weight, gram, wide, indices)


# Work on at most this many elements of a weight in float64 at a time (256 MB): a 70B model's MLP weight in
# float64 would be 1.9 GB, held once per decomposition in flight.
CHUNK_ELEMENTS = 1 << 25

# The Gram matrix is symmetric: it is summed in column blocks of this width, its lower triangle of blocks only
# (10 of 16 block products at n = 8192), the upper one mirrored. Blocks this wide keep each float64 GEMM
# large enough to run at the tensor cores' peak.
GRAM_BLOCK = 2048
# ... and each diagonal block by the lower triangle of its sub-blocks of this width (3 of 4 products), which
# leaves 36 of the 64 (1024-wide) parts of the product at n = 8192 instead of 40.
GRAM_DIAGONAL_BLOCK = 1024


def _block_slices(n: int, width: int) -> list[slice]:
    return [slice(start, min(start + width, n)) for start in range(0, n, width)]


def _lower_block_pairs(n: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of the `GRAM_BLOCK`-wide blocks on and below the diagonal of an n x n matrix."""
    blocks = _block_slices(n, GRAM_BLOCK)
    return [(block_i, block_j) for i, block_i in enumerate(blocks) for block_j in blocks[: i + 1]]


def _gram_block_pairs(n: int) -> list[tuple[slice, slice]]:
    """(rows, columns) of the blocks of an n x n Gram matrix that are summed: the `GRAM_BLOCK`-wide ones below
    the diagonal, and those of `GRAM_DIAGONAL_BLOCK` width on and below the diagonal of each diagonal block."""
    pairs = []
    blocks = _block_slices(n, GRAM_BLOCK)
    for i, block in enumerate(blocks):
        pairs += [(block, left) for left in blocks[:i]]
        parts = [slice(block.start + part.start, block.start + part.stop)
                 for part in _block_slices(block.stop - block.start, GRAM_DIAGONAL_BLOCK)]
        pairs += [(part, left) for k, part in enumerate(parts) for left in parts[: k + 1]]
    return pairs


def _row_chunks(rows: int, cols: int) -> list[slice]:
    return _block_slices(rows, max(1, CHUNK_ELEMENTS // max(1, cols)))


def smaller_gram(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of `weight` in float64 (`W W^T` if the weight is wide, else `W^T W`) and
    whether it is wide; summed over row chunks, so that no float64 copy of the whole weight exists, and over
    the lower triangle of column blocks only (`_gram_block_pairs`)."""
    wide = weight.shape[0] < weight.shape[1]
    tall = weight.T if wide else weight  # the Gram is tall^T tall
    n = tall.shape[1]
    pairs = _gram_block_pairs(n)
    gram = None
    for rows in _row_chunks(*tall.shape):
        chunk = tall[rows].to(torch.float64)
        if gram is None:  # `new_zeros`: DeepSpeed's zero.Init casts what `torch.zeros` makes to its dtype
            gram = chunk.new_zeros(n, n)
        for block_i, block_j in pairs:
            gram[block_i, block_j].addmm_(chunk[:, block_i].T, chunk[:, block_j])
    for block_i, block_j in pairs:
        if block_i != block_j:
            gram[block_j, block_i] = gram[block_i, block_j].T
    return gram, wide


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` (ascending), retried with the CPU's LAPACK where cuSOLVER reports no convergence: its
    `syevd` fails on some ill-conditioned inputs that LAPACK handles (pytorch/pytorch#94772), e.g. Gram matrices of
    a 4-bit quantization error."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        if matrix.device.type == "cpu":
            raise
    values, vectors = torch.linalg.eigh(matrix.cpu())
    return values.to(matrix.device), vectors.to(matrix.device)


def _gram_components(weight, gram, wide, indices: torch.Tensor) -> SingularComponents:
    eigenvalues, eigenvectors = symmetric_eigh(gram)  # ascending
    rank = gram.shape[0]
    # singular position i (descending) is eigen position rank-1-i (ascending)
    eig_idx = (rank - 1 - indices).to(weight.device)
    return _components_from_gram_eigenpairs(weight, wide, eigenvalues[eig_idx], eigenvectors[:, eig_idx], indices)


def _times_weight(vectors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight @ vectors` (weight tall, vectors in x k) in float64, over row chunks of the weight."""
    return torch.cat([weight[rows].to(torch.float64) @ vectors for rows in _row_chunks(*weight.shape)])


def _components_from_gram_eigenpairs(weight, wide, eigenvalues, vectors, indices) -> SingularComponents:
    """Singular triplets from eigenpairs of the smaller Gram matrix; the partner vectors by one GEMM."""
    sigma = eigenvalues.clamp_min(0).sqrt()
    # Guard exact zeros: the partner vector is then arbitrary and contributes nothing (sigma = 0).
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    if wide:
        U = vectors
        Vh = _times_weight(U, weight.T).T / safe_sigma[:, None]  # U^T W
        Vh = torch.where(sigma[:, None] > 0, Vh, torch.zeros_like(Vh))
    else:
        Vh = vectors.T
        U = _times_weight(vectors, weight) / safe_sigma[None, :]
        U = torch.where(sigma[None, :] > 0, U, torch.zeros_like(U))
    return SingularComponents(U, sigma, Vh, indices)


# `auto` takes the subspace solver when r <= min(shape) / SUBSPACE_MAX_RANK_FRACTION (r = 64 from 2048 rows up).
# Below that the block of SUBSPACE_BLOCK * r vectors is a large part of the Gram matrix, and one `eigh` of it is
# faster: LLaMA-2-70B's 1024-row k/v projections (r = 64) took 34 ms by subspace iteration, and the 70B init
# went from ~38 to ~34 s from CPU memory (docs/benchmarks.md).
SUBSPACE_MAX_RANK_FRACTION = 32
# Block size of the subspace iteration is SUBSPACE_BLOCK * r: the extra directions speed convergence
# where the minor end of the spectrum is dense (as it is for trained and random weights alike): per
# iteration, the residual of the r-th wanted pair shrinks by (lambda_r - s) / (lambda_block+1 - s).
# Since the solves became GEMMs (`_apply_shifted_inverse`) an iteration costs in proportion to the block, and
# so do the Rayleigh-Ritz `eigh` calls: 4 r takes a few more iterations than 8 r (13 against 9 on the scaled
# up_proj of benchmarks/subspace_iterations.py) but less work in all; one 70B up_proj decomposition held
# 106 ms of GPU kernels with 4 r, 113 with 6 r, 124 with 8 r (docs/benchmarks.md).
SUBSPACE_BLOCK = 4
# ... and at least this many vectors: a block of a few vectors (small r) converges slowly, and on a GPU costs
# no less per iteration than 64.
SUBSPACE_MIN_BLOCK = 64
SUBSPACE_MAX_ITERATIONS = 40
# Stop when every wanted Ritz pair has ||G v - theta v|| <= tolerance * mean eigenvalue. The subspace angle is
# at most residual / gap, which keeps the overlap with the exact minor subspace within ~1e-10 of 1 for
# the spectra we measured (random and trained weights); the tests check it against float64 SVD.
SUBSPACE_TOLERANCE = 1e-7
# The shift sits SHIFT_MARGIN x (spread of the wanted Ritz values) below the lowest Ritz value less its residual,
# and moves when it would gain RESHIFT of the distance to the next Ritz value. A refactorisation (the Cholesky
# factor and its inverse) costs about ten iterations at n = 8192 (19 ms against 1.8 ms on an H200): after the
# Lanczos first shift, the small moves that 0.1 allowed cost more than they saved (70B up_proj 125 -> 103 ms, one
# factorisation instead of two, the same iteration count; docs/benchmarks.md).
SHIFT_MARGIN = 0.05
RESHIFT = 0.6
SHIFT_ATTEMPTS = 4
# Lanczos steps (matrix-vector products with the Gram matrix) for the first shift's estimate; at most n / 4.
LANCZOS_STEPS = 60
# The Lanczos estimate runs on a float32 copy of the Gram matrix: each step reads the whole matrix (memory-bound),
# and half the bytes halve its time. Its error (~1e-7 of the largest eigenvalue) only moves the first shift, which
# the Cholesky factorisation then checks (a shift above the smallest eigenvalue fails and is lowered).
LANCZOS_IN_FLOAT32 = True
# At most this many iterations between convergence checks once the shift has settled.
MAX_SKIPPED = 8
# CholeskyQR passes on the iterations that no Rayleigh-Ritz step follows: inverse iteration depends on the basis's
# column space only, which one pass keeps (a failed pass is caught like any other). With two throughout, the 70B
# up/down projections took 3-7% longer, q_proj as long (docs/benchmarks.md).
ORTHONORMAL_PASSES_BETWEEN_CHECKS = 1


def _cholesky_qr(x: torch.Tensor, passes: int = 2) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """CholeskyQR of the columns of `x` in `passes` GEMM-shaped passes (2: CholeskyQR2, orthonormal to round-off;
    1: the same column space, orthonormal to about cond(x)^2 x round-off), without reading its status: the result,
    each pass's input and each pass's `cholesky_ex` status (a device tensor; nonzero where `x` was too
    ill-conditioned and the result is not orthonormal)."""
    inputs, infos = [], []
    for _ in range(passes):
        inputs.append(x)
        factor, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
        infos.append(info)
        x = torch.linalg.solve_triangular(factor, x, upper=True, left=False)
    return x, inputs, infos


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of `x`: CholeskyQR2, Householder QR of the last good input when `x` is
    too ill-conditioned for it. Both passes' status is read at once: one device synchronisation instead of two."""
    x, inputs, infos = _cholesky_qr(x)
    for failed, x_in in zip(torch.stack(infos).ne(0).tolist(), inputs, strict=True):
        if failed:  # as if the passes had stopped at the first failure
            return torch.linalg.qr(x_in)[0]
    return x


def _rayleigh_ritz(gram: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) and vectors of `gram` on the column space of the orthonormal `basis`."""
    projected = basis.T @ gram @ basis
    values, coefficients = symmetric_eigh((projected + projected.T) / 2)
    return values, basis @ coefficients


def _factor_below(gram: torch.Tensor, shift: float, safe_shift: float | None) -> tuple[torch.Tensor | None, float]:
    """Cholesky factor of `gram - s I` and `s`, for `s = shift` or, where that fails, shifts bisected down
    towards `safe_shift` (one whose factorisation succeeded; None: below `shift` by growing steps).

    A factorisation succeeds exactly when the shift is below the smallest eigenvalue (up to round-off), so a
    failure only says the shift was too high."""
    step = None
    for _ in range(SHIFT_ATTEMPTS):
        shifted = gram.clone()
        shifted.diagonal().sub_(shift)
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0:
            return factor, shift
        if safe_shift is not None:
            shift = (shift + safe_shift) / 2
            continue
        if step is None:  # a singular Gram matrix: go below zero by more than the factorisation's round-off
            step = float(gram.diagonal().max()) * gram.shape[0] * torch.finfo(gram.dtype).eps
        shift, step = shift - step, 64 * step
    return None, shift


# Triangular inverses are formed by recursive halving down to blocks of this size (solved directly): all but
# those small solves are GEMMs.
TRIANGULAR_INVERSE_BLOCK = 512
# Products with a triangular matrix skip its zero half by recursive halving down to blocks of this size, which are
# multiplied as full GEMMs: a little over half the multiply-adds of one full GEMM, in GEMMs still large enough to
# run near the float64 peak. (torch has no triangular matrix product, cuBLAS's `trmm`.)
TRIANGULAR_PRODUCT_BLOCK = 1024


def lower_times(lower: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`lower @ x` for a lower-triangular `lower` (the zero blocks above its diagonal blocks are not read)."""
    n = lower.shape[0]
    if n <= TRIANGULAR_PRODUCT_BLOCK:
        return lower @ x
    half = n // 2
    out = x.new_empty(n, x.shape[1])
    out[:half] = lower_times(lower[:half, :half], x[:half])
    out[half:] = lower_times(lower[half:, half:], x[half:])
    out[half:].addmm_(lower[half:, :half], x[:half])
    return out


def times_lower(x: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """`x @ lower` for a lower-triangular `lower` (the zero blocks above its diagonal blocks are not read)."""
    n = lower.shape[0]
    if n <= TRIANGULAR_PRODUCT_BLOCK:
        return x @ lower
    half = n // 2
    out = x.new_empty(x.shape[0], n)
    out[:, :half] = times_lower(x[:, :half], lower[:half, :half])
    out[:, :half].addmm_(x[:, half:], lower[half:, :half])
    out[:, half:] = times_lower(x[:, half:], lower[half:, half:])
    return out


def lower_triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """The inverse of a lower-triangular matrix, by halves: inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]]. About 0.22 n^3 multiply-adds at n = 8192 (0.33 n^3 with full GEMMs: the products with the
    triangular halves skip most of their zeros), nearly all in GEMMs: on a GPU, a triangular solve with many
    right-hand sides is latency-bound (one small kernel per panel) where a GEMM is not."""
    n = lower.shape[0]
    if n <= TRIANGULAR_INVERSE_BLOCK:
        identity = lower.new_zeros(n, n)  # not `torch.eye`: zero.Init casts what it makes to its dtype
        identity.diagonal().fill_(1)
        return torch.linalg.solve_triangular(lower, identity, upper=False)
    half = n // 2
    inverse = torch.zeros_like(lower)
    inverse[:half, :half] = lower_triangular_inverse(lower[:half, :half])
    inverse[half:, half:] = lower_triangular_inverse(lower[half:, half:])
    inverse[half:, :half] = lower_times(inverse[half:, half:], times_lower(lower[half:, :half], inverse[:half, :half]))
    inverse[half:, :half].neg_()
    return inverse


def _apply_shifted_inverse(inverse_factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`(G - s I)^-1 basis = L^-T L^-1 basis` for the Cholesky factor `L` of `G - s I`: GEMMs over the lower
    triangle of `GRAM_BLOCK`-wide blocks of `L^-1` (10 of 16 at n = 8192), where `cholesky_solve`'s two
    triangular solves are latency-bound on a GPU (one small kernel per panel)."""
    pairs = _lower_block_pairs(inverse_factor.shape[0])
    if len(pairs) == 1:
        return inverse_factor.T @ (inverse_factor @ basis)
    half = torch.zeros_like(basis)  # L^-1 basis
    for block_i, block_j in pairs:
        half[block_i].addmm_(inverse_factor[block_i, block_j], basis[block_j])
    out = torch.zeros_like(basis)  # L^-T (L^-1 basis)
    for block_i, block_j in pairs:
        out[block_j].addmm_(inverse_factor[block_i, block_j].T, half[block_i])
    return out


def _lowest_eigenvalue_estimate(gram: torch.Tensor, steps: int, generator: torch.Generator) -> tuple[float, float]:
    """The lowest Ritz value of `gram` on a Krylov space of `steps` dimensions (Lanczos from a random vector;
    one matrix-vector product a step, no solve) and its residual: an eigenvalue lies within the residual of it.

    Without reorthogonalisation Lanczos repeats converged Ritz values but its extreme one stays an upper bound
    of the smallest eigenvalue, which is all the first shift needs (a failed factorisation would lower it).
    Runs in `gram`'s dtype (see `LANCZOS_IN_FLOAT32`)."""
    q = torch.randn(gram.shape[0], dtype=gram.dtype, device=gram.device, generator=generator)
    q, previous, beta = q / q.norm(), torch.zeros_like(q), gram.new_zeros(())
    alphas, betas = [], []
    for _ in range(steps):
        v = gram @ q - beta * previous
        alpha = q @ v
        v -= alpha * q
        beta = v.norm()
        alphas.append(alpha)
        betas.append(beta)
        previous, q = q, v / beta.clamp_min(torch.finfo(gram.dtype).tiny)
    # one synchronisation; the eigenproblem of the small tridiagonal matrix is solved on the host
    alphas, betas = torch.stack(alphas + betas).to("cpu", torch.float64).split(steps)
    tridiagonal = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    lowest, residual = torch.stack([values[0], (betas[-1] * vectors[-1, 0]).abs()]).tolist()
    return lowest, residual


def _minor_components_by_subspace_iteration(
    w, gram, wide, r: int, *, block_factor: int | None = None, shift_margin: float | None = None,
    predict: bool = True, lanczos_steps: int | None = None,
) -> SingularComponents | None:
    """The last `r` singular triplets of `w` by shifted block inverse iteration on its smaller Gram matrix
    (`gram`, `wide` as `smaller_gram` returns them).

    The first shift is a Lanczos estimate of the smallest eigenvalue less its residual (matrix-vector
    products only), which saves the several refactorisations of starting from shift 0. Each Rayleigh-Ritz
    step moves the shift up towards the smallest eigenvalue (the lowest Ritz value less its residual and a
    margin); once the shift stays, the residuals' decay rate predicts how many iterations
    remain, and the Rayleigh-Ritz steps (a small `eigh` and a host synchronisation each) in between are
    skipped. Returns None (caller falls back to `eigh`) when no shift gives a Cholesky factorisation or the
    Ritz residuals do not reach the tolerance within the iteration budget. `block_factor`, `shift_margin`,
    `predict` (skip the Rayleigh-Ritz steps) and `lanczos_steps` (0: first shift 0) override the defaults,
    for benchmarks/subspace_iterations.py.
    """
    block_factor = SUBSPACE_BLOCK if block_factor is None else block_factor
    lanczos_steps = LANCZOS_STEPS if lanczos_steps is None else lanczos_steps
    shift_margin = SHIFT_MARGIN if shift_margin is None else shift_margin
    n = gram.shape[0]
    block = min(n, max(block_factor * r, SUBSPACE_MIN_BLOCK))
    tolerance = SUBSPACE_TOLERANCE * float(torch.diagonal(gram).mean())
    generator = torch.Generator(device=w.device).manual_seed(0)
    factor = None
    steps = min(lanczos_steps, n // 4)
    if steps > 1:
        lanczos_gram = gram.to(torch.float32) if LANCZOS_IN_FLOAT32 else gram
        lowest, residual = _lowest_eigenvalue_estimate(lanczos_gram, steps, generator)
        if LANCZOS_IN_FLOAT32:  # the float32 copy's eigenvalues are within eps * ||G||_F <= eps * trace of G's
            residual += torch.finfo(torch.float32).eps * float(torch.diagonal(gram).sum())
        del lanczos_gram
        if lowest - residual > 0:
            factor, shift = _factor_below(gram, lowest - residual, 0.0)
    if factor is None:
        factor, shift = _factor_below(gram, 0.0, None)
    if factor is None:
        return None
    inverse_factor = lower_triangular_inverse(factor)
    del factor
    basis = torch.randn(n, block, dtype=gram.dtype, device=w.device, generator=generator)
    next_check, last_worst, last_check = 1, None, 0
    # CholeskyQR's status is not read after each iteration (a read waits for the GPU) but with the next
    # Rayleigh-Ritz step's values. Where it failed since the last step, that step runs on the last step's basis
    # instead (chosen on the device), and the iteration goes on from there reading every status (Householder QR
    # where CholeskyQR fails).
    checked_basis, failures, read_each = basis, [], False
    for iteration in range(1, SUBSPACE_MAX_ITERATIONS + 1):
        basis = _apply_shifted_inverse(inverse_factor, basis)
        # unit columns first: they scale by 1 / (lambda - s), which CholeskyQR would see as ill-conditioning
        basis = basis / basis.norm(dim=0).clamp_min(torch.finfo(basis.dtype).tiny)
        if read_each:
            basis = _orthonormal(basis)
        else:  # one pass keeps the column space, all the iteration needs; two before a Rayleigh-Ritz step
            basis, _, infos = _cholesky_qr(basis, 2 if iteration >= next_check else ORTHONORMAL_PASSES_BETWEEN_CHECKS)
            failures += infos
        if iteration < next_check:
            continue
        failed = torch.stack(failures).ne(0).any() if failures else torch.zeros((), dtype=torch.bool, device=w.device)
        basis = torch.where(failed, checked_basis, basis)
        failures = []
        values, basis = _rayleigh_ritz(gram, basis)
        checked_basis = basis
        wanted_values, wanted_vectors = values[:r], basis[:, :r]
        residuals = (gram @ wanted_vectors - wanted_vectors * wanted_values).norm(dim=0)
        worst, lowest, lowest_residual, highest_wanted, next_value, went_back = torch.stack(
            [residuals.max(), values[0], residuals[0], values[r - 1], values[min(r, block - 1)], failed.to(values)]
        ).tolist()
        if went_back:
            read_each, next_check = True, iteration + 1
            continue
        if worst <= tolerance:
            # descending singular order: the last of the r minor triplets first
            order = torch.arange(r - 1, -1, -1, device=w.device)
            indices = torch.arange(n - r, n)
            return _components_from_gram_eigenpairs(w, wide, wanted_values[order], wanted_vectors[:, order], indices)
        # The lowest Ritz value is within its residual of an eigenvalue (the smallest one, unless the basis
        # missed it: then the factorisation fails and the shift is lowered). Convergence goes as
        # (lambda_r - s) / (lambda_block+1 - s): worth a new factorisation when that drops noticeably.
        target = lowest - lowest_residual - shift_margin * (highest_wanted - lowest)
        next_check = iteration + 1
        if target > shift + RESHIFT * (next_value - shift):
            new_factor, new_shift = _factor_below(gram, target, shift)
            if new_factor is not None:
                inverse_factor, shift = lower_triangular_inverse(new_factor), new_shift
                del new_factor
        elif predict and last_worst is not None and worst < last_worst:
            rate = (worst / last_worst) ** (1 / (iteration - last_check))
            next_check += max(0, min(math.ceil(math.log(tolerance / worst) / math.log(rate)) - 1, MAX_SKIPPED))
        last_worst, last_check = worst, iteration
    return None


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


@torch.no_grad()
def subtract_low_rank_(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Overwrite `weight` with `residual_weight(weight, B, A, scaling)` rounded to its dtype, over row chunks
    (no float64 copy of the whole weight). Returns `weight`."""
    B, A = B.to(weight.device, torch.float64), A.to(weight.device, torch.float64)
    for rows in _row_chunks(*weight.shape):
        weight[rows] = weight[rows].to(torch.float64) - scaling * (B[rows] @ A)
    return weight


def subspace_overlap(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two column spaces: ||Qa^T Qb||_F^2 / r (1 = same)."""
    qa, _ = torch.linalg.qr(basis_a.to(torch.float64))
    qb, _ = torch.linalg.qr(basis_b.to(torch.float64))
    r = min(qa.shape[1], qb.shape[1])
    return float((qa.T @ qb).pow(2).sum() / r)
