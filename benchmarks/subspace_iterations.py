"""How many iterations and latency-bound operations MiLoRA's minor-component solver needs, on CPU.

At LLaMA-2-70B shapes on a GPU the subspace iteration (`milora/decomposition.py`) is latency-bound: its time
goes to Cholesky solves with few right-hand sides, small `eigh` calls and host synchronisations, not to
FLOPs. What decides its GPU time is therefore the number of iterations times the latency-bound operations
per iteration, which this script counts on CPU, on random bf16 matrices with the aspect ratios of the 70B
shapes (q 8192 x 8192, k/v 1024 x 8192, up 28672 x 8192, down 8192 x 28672) scaled down to a Gram matrix
of size `n`, with `r = 64 n / 8192` (the 70B ratio r / min(shape)) or a given `--r`.

Per shape and solver variant it prints: iterations (applications of the shifted Gram matrix's inverse),
factorisations of the n x n Gram matrix, `eigh` calls (Rayleigh-Ritz, size = block), small Cholesky factorisations and
triangular solves (CholeskyQR of the n x block basis: two passes before a Rayleigh-Ritz step, one otherwise), host
synchronisations (`float`, `int`, `.tolist()`, `.item()` on tensors, and each `eigh`, which checks its status on
the host) and 1 - overlap of the found minor subspace with the float64 `eigh` of the Gram matrix ("fallback": the
solver gave up). Counting wraps the torch functions the solver calls; the solver itself carries no instrumentation.
Variants: `before` (the solver before issue 25: shift 0.9 x the lowest Ritz value once, Rayleigh-Ritz every
second iteration from the fourth) and the current solver with a block of `k x r` (`bk`, options below);
`b8-l0` is the current solver without its Lanczos first shift, `b8` the default. The Lanczos steps (60
matrix-vector products, at most n / 4) are not in the counts; their tridiagonal `eigh` is.

    python benchmarks/subspace_iterations.py --n 1024 2048          # r scaled with n
    python benchmarks/subspace_iterations.py --n 2048 --r 64        # the 70B rank on a smaller Gram
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import torch

from milora import decomposition as dec
from milora.io import atomic_write_text

# (out, in) of the 70B shapes in units of the hidden size 8192
ASPECTS = {"q_proj": (1, 1), "k/v_proj": (1 / 8, 1), "up_proj": (3.5, 1), "down_proj": (1, 3.5)}


def solver_before(w, gram, wide, r):
    """The solver as it was before issue 25 (for comparison): shift 0.9 x the lowest Ritz value once, at the
    third iteration; Rayleigh-Ritz and the convergence check every second iteration from the fourth."""
    n = gram.shape[0]
    block = min(n, 4 * r)

    def shifted_cholesky(shift):
        for _ in range(6):
            shifted = gram.clone()
            shifted.diagonal().sub_(shift)
            factor, info = torch.linalg.cholesky_ex(shifted)
            if int(info) == 0:
                return factor
            shift *= 0.8
        factor, info = torch.linalg.cholesky_ex(gram)
        return factor if int(info) == 0 else None

    factor = shifted_cholesky(0.0)
    if factor is None:
        return None
    generator = torch.Generator(device=w.device).manual_seed(0)
    basis = dec._orthonormal(torch.randn(n, block, dtype=gram.dtype, device=w.device, generator=generator))
    mean_eigenvalue = float(torch.diagonal(gram).mean())
    for iteration in range(1, 41):
        basis = dec._orthonormal(torch.cholesky_solve(basis, factor))
        if iteration == 3:
            values, basis = dec._rayleigh_ritz(gram, basis)
            factor = shifted_cholesky(0.9 * float(values[0]))
            if factor is None:
                return None
        if iteration >= 4 and iteration % 2 == 0:
            values, basis = dec._rayleigh_ritz(gram, basis)
            wanted_values, wanted_vectors = values[:r], basis[:, :r]
            residual = (gram @ wanted_vectors - wanted_vectors * wanted_values).norm(dim=0).max()
            if float(residual) <= dec.SUBSPACE_TOLERANCE * mean_eigenvalue:
                order = torch.arange(r - 1, -1, -1, device=w.device)
                return dec._components_from_gram_eigenpairs(
                    w, wide, wanted_values[order], wanted_vectors[:, order], torch.arange(n - r, n))
    return None


@contextlib.contextmanager
def counting():
    """Count the solver's latency-bound calls (by wrapping the torch functions it calls) into a Counter."""
    counts = Counter()
    originals = {}
    paused = []

    def wrap(owner, name, key):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            if paused:
                return original(*args, **kwargs)
            counts.update((key(*args, **kwargs) if callable(key) else key).split())
            if name == "lower_triangular_inverse":  # its own small solves are not the basis's
                paused.append(name)
                try:
                    return original(*args, **kwargs)
                finally:
                    paused.pop()
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    # CholeskyQR factors x^T x as upper, the shifted Gram matrix is factored as lower
    wrap(torch.linalg, "cholesky_ex", lambda a, upper=False, **_: "small_cholesky" if upper else "factorisations")
    wrap(torch, "cholesky_solve", "solves")  # the `before` variant
    wrap(dec, "_apply_shifted_inverse", "solves")
    wrap(dec, "lower_triangular_inverse", "inverses")
    wrap(torch.linalg, "eigh", "eigh syncs")  # on CUDA, eigh reads its status on the host
    wrap(torch.linalg, "solve_triangular", "triangular_solves")
    wrap(torch.linalg, "qr", "qr")
    for name in ("__float__", "__int__", "__bool__", "tolist", "item"):
        wrap(torch.Tensor, name, "syncs")
    try:
        yield counts
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def parse_variant(name):
    """`b8` = block 8 r; optional `-m0.1` (shift margin), `-l0` (no Lanczos first shift, `-l100`: 100 steps)
    and `-p0` (no predicted skipping of Rayleigh-Ritz steps): the solver's keyword arguments."""
    keys = {"b": ("block_factor", int), "m": ("shift_margin", float), "p": ("predict", lambda v: v == "1"),
            "l": ("lanczos_steps", int)}
    options = {}
    for part in name.split("-"):
        key, convert = keys[part[0]]
        options[key] = convert(part[1:])
    return lambda w, gram, wide, r: dec._minor_components_by_subspace_iteration(w, gram, wide, r, **options)


def variants(names):
    return {name: solver_before if name == "before" else parse_variant(name) for name in names}


def shape_rows(n, r, names, seed, shapes):
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for shape, (out_units, in_units) in ASPECTS.items():
        if shape not in shapes:
            continue
        out_f, in_f = round(out_units * n), round(in_units * n)
        weight = (torch.randn(out_f, in_f, generator=generator) * 0.02).to(torch.bfloat16)
        gram, wide = dec.smaller_gram(weight)
        size = gram.shape[0]
        reference = torch.linalg.eigh(gram)[1][:, :r]
        for name, solver in variants(names).items():
            start = time.perf_counter()
            with counting() as counts:
                found = solver(weight, gram, wide, r)
            seconds = time.perf_counter() - start
            row = {"shape": f"{shape} {out_f}x{in_f}", "gram": size, "r": r, "variant": name,
                   "converged": found is not None, "cpu_s": seconds, **{k: counts[k] for k in COUNTS}}
            if found is not None:
                vectors = found.U if wide else found.Vh.T
                row["one_minus_overlap"] = 1 - dec.subspace_overlap(vectors, reference)
            rows.append(row)
            print_row(row)
    return rows


COUNTS = ("solves", "factorisations", "eigh", "small_cholesky", "triangular_solves", "qr", "syncs")
HEADER = ("| shape | r | variant | iterations | factorisations | eigh | small chol | trsm | syncs | 1 - overlap "
          "| CPU s |")


def print_row(row):
    overlap = f"{row['one_minus_overlap']:.1e}" if row["converged"] else "fallback"
    print(f"| {row['shape']} | {row['r']} | {row['variant']} | {row['solves']} | {row['factorisations']} | "
          f"{row['eigh']} | {row['small_cholesky']} | {row['triangular_solves']} | {row['syncs']} | {overlap} | "
          f"{row['cpu_s']:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 2048], help="hidden size of the scaled shapes")
    parser.add_argument("--r", type=int, default=None, help="rank (default 64 n / 8192, the 70B ratio)")
    parser.add_argument("--variants", nargs="+", default=["before", "b4-l0", "b8-l0", "b8"])
    parser.add_argument("--shapes", nargs="+", default=list(ASPECTS), choices=list(ASPECTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for subspace_iterations.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(HEADER)
    print("|" + " --- |" * 3 + " ---: |" * 8)
    rows = []
    for n in args.n:
        rows += shape_rows(n, args.r or max(1, 64 * n // 8192), args.variants, args.seed, args.shapes)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "subspace_iterations.json", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
