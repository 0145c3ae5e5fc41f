"""The math of `milora analyze`: small pure functions of tensors, all computed in float64.

Nothing here loads a model, reads a file or draws a plot; `weights.py` and `forgetting.py` feed these
functions, `plots.py` draws their results. Conventions:

- A weight is an `out x in` matrix `W = U S V^T` (reduced SVD, singular values descending). Its update
  is `dW = W_tuned - W_base`.
- A *basis* is a matrix whose columns are orthonormal (singular vectors as columns).
- Normalized subspace similarity (Hu et al. 2021, section 7; MiLoRA paper, Appendix A.1), a Grassmann
  measure between the span of the first `i` columns of basis `A` and the first `j` columns of basis `B`:

      phi(A, B, i, j) = ||A[:, :i]^T B[:, :j]||_F^2 / min(i, j)          in [0, 1]

  1 when one span contains the other, 0 when they are orthogonal.
- Amplification factor (Hu et al. 2021, section 7.3; MiLoRA paper, Table 7): with `U`, `V` the top-`r`
  left / right singular vectors of `dW`,

      amplification = ||dW||_F / ||U^T W V||_F

  i.e. how much the update amplifies the directions of `W` that it shares. The baseline uses random
  orthonormal `U`, `V` of the same size in place of the singular vectors of `dW`.
- Forgetting (Kalajdzievski 2024; MiLoRA paper, section 5.4): per token position, with `p` the base
  model's and `q` the tuned model's next-token distribution,

      H(p)     = -sum_v p_v log p_v                      base entropy
      CE(p, q) = -sum_v p_v log q_v                      cross-entropy of the tuned model against the base
      KL(p||q) =  sum_v p_v (log p_v - log q_v) = CE(p, q) - H(p)

  The *forgetting loss* reported is the mean KL(p||q): 0 for identical models, > 0 otherwise. The mean
  CE(p, q), the quantity of Kalajdzievski 2024, is reported beside it; for identical models it equals
  the base entropy H(p).
"""

from __future__ import annotations

import math

import torch

SUBSETS = ("top", "bottom", "random")


def as_float64(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` as float64 (on its device; MPS has no float64, so such tensors move to the CPU)."""
    if matrix.device.type == "mps":
        matrix = matrix.cpu()
    return matrix.detach().to(torch.float64)


def singular_value_decomposition(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD in float64: `U` (m x k), `S` (k,, descending), `V` (n x k) with k = min(m, n).

    Returns `V` (right singular vectors as columns), not `V^T`, so that both sides are bases.
    """
    U, S, Vh = torch.linalg.svd(as_float64(matrix), full_matrices=False)
    return U, S, Vh.mT


def subspace_similarity(basis_a: torch.Tensor, basis_b: torch.Tensor, i: int, j: int) -> float:
    """phi(A, B, i, j) = ||A[:, :i]^T B[:, :j]||_F^2 / min(i, j)."""
    if not (1 <= i <= basis_a.shape[1] and 1 <= j <= basis_b.shape[1]):
        raise ValueError(f"i={i}, j={j} out of range for bases with {basis_a.shape[1]} and {basis_b.shape[1]} columns")
    overlap = as_float64(basis_a[:, :i]).mT @ as_float64(basis_b[:, :j])
    return float(overlap.pow(2).sum() / min(i, j))


def subspace_similarity_grid(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """All phi(A, B, i, j) at once: entry `[i - 1, j - 1]` is phi(A, B, i, j), for every column count.

    One product `A^T B`, then 2-D cumulative sums of its squared entries.
    """
    squared = (as_float64(basis_a).mT @ as_float64(basis_b)).pow(2)
    cumulative = squared.cumsum(0).cumsum(1)
    i = torch.arange(1, squared.shape[0] + 1, dtype=torch.float64, device=squared.device)
    j = torch.arange(1, squared.shape[1] + 1, dtype=torch.float64, device=squared.device)
    return cumulative / torch.minimum(i[:, None], j[None, :])


def subset_indices(rank: int, count: int, subset: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions (0 = largest singular value) of `count` singular vectors among `rank`, in the order the
    similarity grid adds them:

    - ``top``    0, 1, ..., count-1 (largest first),
    - ``bottom`` rank-1, rank-2, ..., rank-count (smallest first),
    - ``random`` `count` distinct positions drawn uniformly (seeded by `generator`), in drawn order.
    """
    if not 1 <= count <= rank:
        raise ValueError(f"count={count} must be between 1 and rank={rank}")
    if subset == "top":
        return torch.arange(count)
    if subset == "bottom":
        return torch.arange(rank - 1, rank - count - 1, -1)
    if subset == "random":
        return torch.randperm(rank, generator=generator)[:count]
    raise ValueError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")


def random_orthonormal_basis(rows: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` orthonormal columns spanning a uniformly random subspace of R^rows (QR of a Gaussian)."""
    if not 1 <= count <= rows:
        raise ValueError(f"count={count} must be between 1 and rows={rows}")
    gaussian = torch.randn(rows, count, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed, deterministic given the draw


def projection_frobenius_norm(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """||left^T W right||_F: the part of `W` inside the span of `left` (output side) and `right` (input side)."""
    return float(torch.linalg.matrix_norm(as_float64(left).mT @ as_float64(weight) @ as_float64(right)))


def frobenius_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(as_float64(matrix)))


def amplification_factor(update_frobenius: float, projection_frobenius: float) -> float:
    """||dW||_F / ||U^T W V||_F (inf when `W` has nothing in that subspace, nan when both are 0)."""
    if projection_frobenius == 0.0:
        return math.nan if update_frobenius == 0.0 else math.inf
    return update_frobenius / projection_frobenius


def spectrum_summary(singular_values: torch.Tensor, r: int) -> dict:
    """Where the energy of a spectrum sits relative to the principal (first r) / minor (last r) split."""
    s = as_float64(singular_values)
    rank = s.numel()
    r = min(r, rank)
    energy = s.pow(2)
    total = float(energy.sum())
    return {
        "rank": rank,
        "r": r,
        "sigma_max": float(s[0]),
        "sigma_r": float(s[r - 1]),
        "sigma_minor_max": float(s[rank - r]),
        "sigma_min": float(s[-1]),
        "principal_energy_fraction": float(energy[:r].sum()) / total if total else math.nan,
        "minor_energy_fraction": float(energy[rank - r:].sum()) / total if total else math.nan,
    }


def next_token_divergence_sums(
    base_logits: torch.Tensor,
    tuned_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_elements_per_chunk: int = 1 << 24,
) -> dict:
    """Sums over the (unmasked) positions of H(p), CE(p, q) and KL(p||q), with p = softmax(base_logits),
    q = softmax(tuned_logits) over the last axis, in float64. Sums (not means) so batches add up;
    divide by `token_count`.

    `base_logits`, `tuned_logits`: (..., vocab). `mask`: (...), true/1 where a position counts.
    Rows are processed in chunks of at most `max_elements_per_chunk` float64 values, so a large vocabulary
    does not need the whole batch in float64 at once.
    """
    if base_logits.shape != tuned_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(tuned_logits.shape)}")
    vocab = base_logits.shape[-1]
    base_rows = base_logits.reshape(-1, vocab)
    tuned_rows = tuned_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).to(torch.bool).to(base_rows.device)
        base_rows, tuned_rows = base_rows[keep], tuned_rows[keep]
    entropy = cross_entropy = kl = 0.0
    rows_per_chunk = max(1, max_elements_per_chunk // vocab)
    for start in range(0, base_rows.shape[0], rows_per_chunk):
        log_p = torch.log_softmax(as_float64(base_rows[start:start + rows_per_chunk]), dim=-1)
        log_q = torch.log_softmax(as_float64(tuned_rows[start:start + rows_per_chunk]), dim=-1)
        p = log_p.exp()
        # p * log p is 0 where p underflows to 0 (log p = -inf would give nan): xlogy-style masking.
        plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
        plogq = torch.where(p > 0, p * log_q, torch.zeros_like(p))
        entropy -= float(plogp.sum())
        cross_entropy -= float(plogq.sum())
        kl += float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())
    return {
        "base_entropy_sum": entropy,
        "cross_entropy_sum": cross_entropy,
        "kl_sum": kl,
        "token_count": int(base_rows.shape[0]),
    }


def next_token_nll_sum(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None, first_target=None
) -> dict:
    """Sum of -log q(x_{t+1} | x_<=t) over positions whose own and next token are unmasked (float64):
    the ordinary language-modelling loss of a model on the text itself. `logits`: (batch, seq, vocab).

    `first_target` (one int per row, e.g. prompt lengths) counts only the predictions of tokens at that index
    or later: the loss of a completion given its prompt. Default: every token after the first."""
    predicted = logits[:, :-1]
    targets = input_ids[:, 1:].to(logits.device)
    keep = torch.ones_like(targets, dtype=torch.bool)
    if mask is not None:
        mask = mask.to(torch.bool).to(logits.device)
        keep = mask[:, :-1] & mask[:, 1:]
    if first_target is not None:
        target_index = torch.arange(1, input_ids.shape[1], device=logits.device)
        keep = keep & (target_index[None, :] >= torch.as_tensor(first_target, device=logits.device)[:, None])
    total = 0.0
    for row in range(predicted.shape[0]):
        log_q = torch.log_softmax(as_float64(predicted[row][keep[row]]), dim=-1)
        total -= float(log_q.gather(-1, targets[row][keep[row]][:, None]).sum())
    return {"nll_sum": total, "token_count": int(keep.sum())}
