"""Exploration: time the building blocks of the decomposition on one GPU, to choose the method.

For a 4096x4096 and an 11008x4096 matrix: float32/float64 full SVD, float64/float32 Gram eigh with the
cusolver and magma backends, Gram GEMM and Cholesky. Prints one line per variant (median seconds).

    python benchmarks/decomposition_variants.py
"""

import statistics
import time

import torch


def timed(fn, repeats=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(w, device):
    """The timed variants for one weight matrix `w`: name -> function."""
    in_f = w.shape[1]
    w64 = w.double()
    g64 = w64.T @ w64
    g32 = g64.float()
    rows = {
        "svd fp32 full": lambda: torch.linalg.svd(w, full_matrices=False),
        "svd fp64 full": lambda: torch.linalg.svd(w64, full_matrices=False),
        "gram fp64 GEMM": lambda: w64.T @ w64,
        "cholesky fp64 (gram)": lambda: torch.linalg.cholesky(
            g64 + 1e-12 * torch.eye(in_f, device=device, dtype=torch.float64)),
    }
    for backend in ("cusolver", "magma"):
        def run(g, backend=backend):
            torch.backends.cuda.preferred_linalg_library(backend)
            return torch.linalg.eigh(g)
        rows[f"eigh fp64 {backend}"] = lambda run=run: run(g64)
        rows[f"eigh fp32 {backend}"] = lambda run=run: run(g32)
    return rows


def main():
    device = "cuda"
    for out_f, in_f in [(4096, 4096), (11008, 4096)]:
        rows = variants(torch.randn(out_f, in_f, device=device) * 0.02, device)
        torch.backends.cuda.preferred_linalg_library("default")
        for name, fn in rows.items():
            try:
                print(f"{out_f}x{in_f}  {name:<24} {timed(fn):9.4f} s", flush=True)
            except Exception as error:  # a backend may be missing
                print(f"{out_f}x{in_f}  {name:<24} failed: {error}", flush=True)


if __name__ == "__main__":
    main()
