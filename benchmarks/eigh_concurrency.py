"""Exploration: does float64 `eigh` of 4096x4096 Gram matrices go faster batched or on several streams?

Prints seconds per matrix for: one at a time, a batched call, and N Python threads each on its own CUDA
stream. (cuSOLVER's syevd is partly latency-bound, so independent matrices can overlap.)

    python benchmarks/eigh_concurrency.py
"""

import threading
import time

import torch


def per_matrix(fn, count):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def threaded(grams, workers):
    streams = [torch.cuda.Stream() for _ in range(workers)]

    def work(index):
        with torch.cuda.stream(streams[index]):
            for g in grams[index::workers]:
                torch.linalg.eigh(g)
        streams[index].synchronize()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def report(dtype, n, count):
    """Print the three timings for `count` random n x n Gram matrices of `dtype`."""
    w = torch.randn(count, n, n, device="cuda", dtype=dtype)
    grams = w.transpose(1, 2) @ w
    del w
    sequential = per_matrix(lambda: [torch.linalg.eigh(g) for g in grams], count)
    print(f"{dtype}: sequential      {sequential:.4f} s/matrix", flush=True)
    batched = per_matrix(lambda: torch.linalg.eigh(grams), count)
    print(f"{dtype}: batched x{count}     {batched:.4f} s/matrix", flush=True)
    for workers in (2, 4, 8):
        streamed = per_matrix(lambda workers=workers: threaded(list(grams), workers), count)
        print(f"{dtype}: {workers} streams       {streamed:.4f} s/matrix", flush=True)


def main():
    for dtype in (torch.float64, torch.float32):
        report(dtype, n=4096, count=16)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
