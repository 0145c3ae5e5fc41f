"""Decompose many weight matrices and replace each by its residual, with bounded memory on the decomposition
device, wherever the weights live.

Each matrix goes through one step, `decompose_in_place`: on the decomposition device, its LoRA factors
(float64) and the residual `W - s B A` rounded to the weight's dtype, written over the device copy of the
weight. Around that step:

- weights on the decomposition device: the step runs on the weight itself;
- weights elsewhere (a model in CPU memory, `device="cuda"`): the weight is staged through one pinned host
  buffer per worker, copied to the GPU, decomposed there, and the residual comes back in the weight's dtype
  through the same buffer. Nothing is computed in float64 on the host;
- on a GPU, `workers` threads each run one matrix at a time on their own CUDA stream, so one matrix's copies
  and host-side memcpy overlap the others' decompositions, and the device holds at most `workers` matrices
  (their low-precision copy, one float64 Gram matrix and its Cholesky factor each; see
  `milora.decomposition.CHUNK_ELEMENTS`).

On the CPU the same step runs one matrix at a time, with no streams; `staged=True` sends the weights through
the staging buffer there too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from milora.decomposition import lora_factors, singular_components, subtract_low_rank_
from milora.errors import MiLoRAError

DEFAULT_GPU_WORKERS = 4


@dataclass
class Matrix:
    """One weight to initialise: `weight` (out x in; a view of the layer's weight) is overwritten with the
    residual. With `factors` given (B, A), only the residual is formed.

    `weight` may also be a function that loads it (in host memory, `nbytes` long) when its turn comes, and
    `write` a function that stores the residual; then only the matrices in flight are in memory."""

    name: str
    weight: torch.Tensor | Callable[[], torch.Tensor]
    r: int
    scaling: float
    generator: torch.Generator | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    write: Callable[[torch.Tensor], None] | None = None
    nbytes: int | None = None
    refit: Callable | None = None  # (weight, B, A, scaling) -> (B, A), e.g. QPiSSA's refits (milora.quantization)

    @property
    def home(self) -> torch.device:
        """Where the weight lives (host memory for a loaded one)."""
        return torch.device("cpu") if callable(self.weight) else self.weight.device

    @property
    def size_bytes(self) -> int:
        return self.nbytes if callable(self.weight) else self.weight.numel() * self.weight.element_size()


@dataclass
class TransferStats:
    """Bytes copied between host and decomposition device, and the device time of those copies."""

    bytes_to_device: int = 0
    bytes_to_host: int = 0
    copy_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, to_device: int, to_host: int, seconds: float) -> None:
        with self._lock:
            self.bytes_to_device += to_device
            self.bytes_to_host += to_host
            self.copy_seconds += seconds

    @property
    def bytes_moved(self) -> int:
        return self.bytes_to_device + self.bytes_to_host


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse a weight with NaN or inf values (run on the decomposition device, where it is cheap)."""
    if not bool(torch.isfinite(weight).all()):
        raise MiLoRAError(f"{name}: the weight holds NaN or inf values; fix the checkpoint before initialising.")


@torch.no_grad()
def decompose_in_place(
    weight: torch.Tensor, r: int, mode: str, scaling: float, *, solver: str = "auto",
    generator: torch.Generator | None = None, factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    refit: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors `(B, A)` (float64, on `weight`'s device) of `mode`'s singular components, and `weight`
    overwritten by `W - scaling * B A` rounded to its dtype. Given `factors`, only the residual is formed;
    `refit(weight, B, A, scaling)` changes computed factors before that."""
    if factors is None:
        B, A = lora_factors(singular_components(weight, r, mode, solver=solver, generator=generator), scaling)
        if refit is not None:
            B, A = refit(weight, B, A, scaling)
    else:
        B, A = (f.to(weight.device, torch.float64) for f in factors)
    subtract_low_rank_(weight, B, A, scaling)
    return B, A


class _Staging:
    """One worker's way to and from the decomposition device: a host buffer (pinned for a GPU) that holds
    one weight in its dtype, and, on a GPU, the worker's CUDA stream and the events that time its copies."""

    def __init__(self, device: torch.device, capacity_bytes: int, stats: TransferStats):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = stats

    def _host_view(self, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        return self.buffer[:nbytes].view(like.dtype).view(like.shape)

    def _timed_copy(self, destination: torch.Tensor, source: torch.Tensor) -> float:
        if not self.cuda:
            destination.copy_(source)
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        destination.copy_(source, non_blocking=True)
        end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A copy of `host` on the device, through the staging buffer."""
        staged = self._host_view(host)
        staged.copy_(host)  # pageable -> pinned (host memcpy, several threads)
        work = torch.empty_like(staged, device=self.device)
        seconds = self._timed_copy(work, staged)
        self.stats.add(staged.numel() * staged.element_size(), 0, seconds)
        return work

    def download(self, work: torch.Tensor, host: torch.Tensor) -> None:
        """Write the device tensor `work` into `host`, through the staging buffer."""
        staged = self._host_view(host)
        seconds = self._timed_copy(staged, work)  # waits for the copy: the buffer is then free again
        self.stats.add(0, staged.numel() * staged.element_size(), seconds)
        host.copy_(staged)


def _process(matrix: Matrix, mode: str, solver: str, device: torch.device, staging: _Staging | None,
             check_values: bool):
    """Factors of one matrix, on the device its weight lives on; its weight is then the residual."""
    host = matrix.weight() if callable(matrix.weight) else matrix.weight
    stream = torch.cuda.stream(staging.stream) if staging is not None and staging.cuda else contextlib.nullcontext()
    with stream:
        work = staging.upload(host) if staging is not None else host.to(device)
        if check_values:
            check_finite(matrix.name, work)
        B, A = decompose_in_place(work, matrix.r, mode, matrix.scaling, solver=solver, generator=matrix.generator,
                                  factors=matrix.factors, refit=matrix.refit)
        if staging is not None:
            staging.download(work, host)
        elif work is not host:
            host.copy_(work)
        B, A = B.to(host.device), A.to(host.device)
        if staging is not None and staging.cuda:
            staging.stream.synchronize()
    if matrix.write is not None:
        matrix.write(host)
    return B, A


def decompose_matrices(
    matrices: Sequence[Matrix],
    mode: str,
    *,
    device: torch.device | str | None = None,
    solver: str = "auto",
    workers: int | None = None,
    staged: bool | None = None,
    check_values: bool = False,
    on_done: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    stats: TransferStats | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Initialise every matrix (see `Matrix`) and return its float64 factors `(B, A)`, on its weight's device;
    with `on_done(index, B, A)` given, hand each matrix's factors to it instead, in order, as matrices finish.

    `device`: where to decompose (default: each weight's own device). `staged`: copy through the staging
    buffer (default: when weights live off `device`). `workers`: matrices in flight at once on a GPU (default
    4; always 1 on the CPU). `check_values`: refuse NaN/inf weights on the decomposition device (for weights
    the caller has not checked on the host).
    """
    if not matrices:
        return []
    stats = stats if stats is not None else TransferStats()
    work_device = torch.device(device) if device is not None else matrices[0].home
    if work_device.type == "cuda" and work_device.index is None:
        work_device = torch.device("cuda", torch.cuda.current_device())
    if staged is None:
        staged = any(m.home != work_device for m in matrices)
    capacity = max(m.size_bytes for m in matrices) if staged else 0
    on_gpu = work_device.type == "cuda"
    workers = (DEFAULT_GPU_WORKERS if workers is None else workers) if on_gpu else 1
    if on_gpu:
        torch.cuda.current_stream(work_device).synchronize()  # weights written on the caller's stream are ready
    local = threading.local()

    def run(index: int):
        if not hasattr(local, "staging"):
            local.staging = _Staging(work_device, capacity, stats) if staged else None
            local.stream = torch.cuda.Stream(work_device) if on_gpu and not staged else None
        context = torch.cuda.stream(local.stream) if local.stream is not None else contextlib.nullcontext()
        with context:
            B, A = _process(matrices[index], mode, solver, work_device, local.staging, check_values)
        if local.stream is not None:
            local.stream.synchronize()
        return B, A

    results = []

    def finish(index, factors):
        B, A = factors
        if B.is_cuda:  # allocated on a worker's stream: tell the allocator it is used on the caller's
            consumer = torch.cuda.current_stream(B.device)
            B.record_stream(consumer)
            A.record_stream(consumer)
        if on_done is not None:
            on_done(index, B, A)
        else:
            results.append(factors)

    # the first matrix on this thread: CUDA libraries initialise lazily, and only once, safely, from one thread
    finish(0, run(0))
    if workers <= 1 or len(matrices) == 1:
        for index in range(1, len(matrices)):
            finish(index, run(index))
        return results
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, factors in enumerate(pool.map(run, range(1, len(matrices))), start=1):
            finish(index, factors)
    return results
