"""Initialising many layers: split across processes, cached on disk, and ZeRO-3 aware.

- Several processes (`accelerate launch`, `torchrun`, DeepSpeed): layer `i` is decomposed by rank
  `i % world_size` only, and its factors are broadcast, so N GPUs share the work and every rank ends
  with identical adapters and residual weights.
- DeepSpeed ZeRO-3: weights are partitioned. Layers are processed in groups of `world_size`; each layer
  of a group is gathered with its owner as the modifying rank, so ranks decompose in parallel and
  DeepSpeed re-partitions the owner's residual on exit; the LoRA factors, which PEFT creates as plain
  tensors after the weights were partitioned, are broadcast from the owner. The result equals a
  single-process init bit for bit.
- Cache: with `cache_dir`, the factors are stored under a key made of a fingerprint of the target
  weights, the targets, r, alpha, mode, seed and solver; a later run with the same key loads them and
  only recomputes the cheap residual `W - s B A`. Rank 0 writes it; with several processes it is used only
  when every rank finds it (a cache on one node's local disk only: every rank computes, rank 0 rewrites it).

Setting up processes, building models under ZeRO-3 and merging after it: `milora.processes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from safetensors.torch import save_file
from tqdm.auto import tqdm

from milora.fingerprint import base_module_name
from milora.io import DamagedFileError, atomic_directory, read_safetensors
from milora.streaming import Matrix, TransferStats, decompose_matrices

ADAPTER_NAME = "default"


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def lora_layers(peft_model, adapter_name: str = ADAPTER_NAME) -> list[tuple[str, LoraLayer]]:
    """`(name, layer)` for every LoRA layer of `peft_model` that carries the adapter `adapter_name`."""
    return [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]


def adapted_module_names(peft_model) -> list[str]:
    """The names of the modules `peft_model` adapts, as the plain base model has them."""
    return [base_module_name(name) for name, _ in lora_layers(peft_model)]


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A cheap fingerprint of a weight: shape, dtype, float64 sum and a strided sample of its values."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step].to(torch.float64).cpu()
    digest = hashlib.sha256()
    digest.update(f"{tuple(weight.shape)}|{weight.dtype}|{float(flat.double().sum()):.17g}".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def cache_key(layers, r, alpha, mode, seed, solver, fingerprints: list[str]) -> str:
    description = {
        "layers": [name for name, _ in layers], "r": r, "alpha": alpha, "mode": mode, "seed": seed,
        "solver": solver, "weights": fingerprints,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def _layer_weight(layer) -> torch.Tensor:
    return transpose(layer.get_base_layer().weight.data, layer.fan_in_fan_out)


def _matrix(name: str, layer, index: int, seed: int, factors=None, refit=None) -> Matrix:
    # one generator per layer: the `random` mode does not depend on which layers came before
    return Matrix(name, _layer_weight(layer), layer.r[ADAPTER_NAME], layer.scaling[ADAPTER_NAME],
                  torch.Generator().manual_seed(seed + index), factors, refit=refit)


@torch.no_grad()
def set_factors(layer, B: torch.Tensor, A: torch.Tensor) -> None:
    """Copy the factors (any dtype and device) into the layer's LoRA weights. LoRA weights made without values
    (on the meta device, `milora.model.wrap_model`) become the factors in their dtype, on the device of the
    layer's base weight, where PEFT puts its adapters."""
    for module, factor in ((layer.lora_A[ADAPTER_NAME], A), (layer.lora_B[ADAPTER_NAME], B)):
        weight = module.weight
        if weight.is_meta:
            values = torch.empty(weight.shape, dtype=weight.dtype, device=layer.get_base_layer().weight.device)
            values.copy_(factor)  # contiguous, whatever the factor's strides: DDP compares them across ranks
            module.weight = torch.nn.Parameter(values, requires_grad=weight.requires_grad)
        else:
            weight.data.copy_(factor.to(device=weight.device, dtype=weight.dtype))


def _initialize(layers, indices, mode, device, solver, seed, workers, progress=None, factors=None, stats=None,
                check_values=False, keep=True, refit=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Residuals and LoRA factors of `layers[i]` for i in `indices` (decomposed, or from `factors[i]`); returns
    the float64 factors by index if `keep`."""
    matrices = [_matrix(layers[i][0], layers[i][1], i, seed, None if factors is None else factors[i], refit)
                for i in indices]
    found = {}

    def done(position, B, A):
        index = indices[position]
        set_factors(layers[index][1], B, A)
        if keep:
            found[index] = (B, A)
        if progress is not None:
            progress.update()

    decompose_matrices(matrices, mode, device=device, solver=solver, workers=workers, on_done=done, stats=stats,
                       check_values=check_values)
    return found


def _broadcast_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_factors(factors: dict[int, tuple[torch.Tensor, torch.Tensor]], layers, rank, world_size):
    """Every rank receives every layer's (B, A) from the rank that computed it."""
    device = _broadcast_device()
    for index, (_, layer) in enumerate(layers):
        owner = index % world_size
        out_f, in_f = _layer_weight(layer).shape
        r = layer.r[ADAPTER_NAME]
        if rank == owner:
            B, A = (t.to(device, torch.float64).contiguous() for t in factors[index])
        else:
            B = torch.empty(out_f, r, dtype=torch.float64, device=device)
            A = torch.empty(r, in_f, dtype=torch.float64, device=device)
        dist.broadcast(B, src=owner)
        dist.broadcast(A, src=owner)
        factors[index] = (B, A)


def _every_rank_has(found: bool) -> bool:
    """Whether `found` holds on every rank; all ranks must call it."""
    flag = torch.tensor([int(found)], device=_broadcast_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _load_cache(path: Path, count: int):
    """The cached factors, or None when there are none or the file is damaged (then they are computed again and
    the cache rewritten)."""
    file = path / "factors.safetensors"
    if not file.is_file():
        return None
    try:
        tensors = read_safetensors(file)
        return {i: (tensors[f"{i}.B"], tensors[f"{i}.A"]) for i in range(count)}
    except (DamagedFileError, KeyError) as error:
        warnings.warn(f"milora_cache_dir: {error if isinstance(error, DamagedFileError) else f'{file} lacks {error}'};"
                      " computing the factors again", stacklevel=2)
        return None


def _save_cache(path: Path, factors, metadata: dict) -> None:
    tensors = {}
    for i, (B, A) in factors.items():
        tensors[f"{i}.B"] = B.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{i}.A"] = A.detach().to("cpu", torch.float32).contiguous()
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "factors.safetensors"))
        (tmp / "key.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))


def initialize_layers(
    layers,
    mode: str,
    *,
    device=None,
    solver: str = "auto",
    seed: int = 0,
    show_progress: bool = True,
    cache_dir: str | Path | None = None,
    description: str = "MiLoRA init",
    workers: int | None = None,
    stats: TransferStats | None = None,
    check_values: bool = False,
    refit=None,
) -> None:
    """Initialise every `(name, LoraLayer)` in `layers` from its `mode` singular components.

    `refit(weight, B, A, scaling) -> (B, A)`, when given, changes each layer's factors before the residual is formed
    (`milora.quantization.FactorRefit`); its `key()` goes into the cache key.

    The decomposition and the residual run on `device` (default: each weight's own), weights elsewhere
    streamed there and back (`milora.streaming`); `stats` collects the bytes moved; `check_values` refuses
    NaN/inf weights on the decomposition device (for weights not checked before)."""
    rank, world_size = world()
    if any(is_zero3_partitioned(layer.get_base_layer().weight) for _, layer in layers):
        if cache_dir is not None and rank == 0:
            warnings.warn("cache_dir is not used under DeepSpeed ZeRO-3; start from a `milora init` directory "
                          "to skip the decomposition on repeated runs", stacklevel=3)
        return _initialize_zero3(layers, mode, device, solver, seed, show_progress, description, refit)

    first = layers[0][1]
    cache_path = None
    factors = None
    if cache_dir is not None:
        fingerprints = [weight_fingerprint(layer.get_base_layer().weight) for _, layer in layers]
        cache_mode = mode if refit is None else f"{mode}+{refit.key()}"
        key = cache_key(layers, first.r[ADAPTER_NAME], first.scaling[ADAPTER_NAME], cache_mode, seed, solver,
                        fingerprints)
        cache_path = Path(cache_dir) / key
        factors = _load_cache(cache_path, len(layers))
        if world_size > 1 and not _every_rank_has(factors is not None):
            factors = None  # found on some nodes' local disks only: all ranks compute, else the broadcast hangs
    settings = dict(mode=mode, device=device, solver=solver, seed=seed, workers=workers, stats=stats,
                    check_values=check_values, refit=refit)
    computed = factors is None
    if computed:
        owned = [i for i in range(len(layers)) if i % world_size == rank]
        progress = tqdm(total=len(owned), desc=description, disable=not show_progress or rank != 0, unit="layer")
        keep = cache_path is not None or world_size > 1  # 8 bytes a factor value: only when they are needed
        factors = _initialize(layers, owned, progress=progress, keep=keep, **settings)
        progress.close()
        if world_size > 1:
            _broadcast_factors(factors, layers, rank, world_size)
            _initialize(layers, [i for i in range(len(layers)) if i % world_size != rank], factors=factors,
                        keep=False, **settings)
    else:
        _initialize(layers, list(range(len(layers))), factors=factors, keep=False, **settings)
    if computed and cache_path is not None and rank == 0:
        _save_cache(cache_path, factors, {"layers": len(layers), "mode": mode, "seed": seed, "solver": solver})


def _layer_params(layer) -> list[torch.nn.Parameter]:
    return [layer.get_base_layer().weight, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]


def _initialize_zero3(layers, mode, device, solver, seed, show_progress, description, refit=None) -> None:
    """Layers in groups of `world_size`: every rank gathers the whole group, rank k decomposes and writes the
    group's k-th layer, and every rank ends with that rank's residual and factors."""
    import deepspeed

    rank, world_size = world()
    groups = [list(range(start, min(start + world_size, len(layers)))) for start in range(0, len(layers), world_size)]
    for group in tqdm(groups, desc=description + " (ZeRO-3)", disable=not show_progress or rank != 0, unit="group"):
        with contextlib.ExitStack() as stack:
            for position, index in enumerate(group):
                # DeepSpeed broadcasts the modifier rank's gathered values on exit, then re-partitions them
                params = _layer_params(layers[index][1])
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=position))
            if rank < len(group):
                # the same generator as the single-process path: the `random` mode picks the same triplets
                _initialize(layers, [group[rank]], mode, device, solver, seed, workers=1, refit=refit)
        if world_size > 1:
            _broadcast_unpartitioned(group, layers)


@torch.no_grad()
def _broadcast_unpartitioned(group: list[int], layers) -> None:
    """Send each layer's factors from the rank that wrote them when they are plain tensors (PEFT creates the
    LoRA layers after `zero.Init`, so GatheredParameters leaves them alone). Without this the other ranks
    keep PEFT's default factors, and the DeepSpeed engine later spreads rank 0's copy on top of SVD residuals."""
    device = _broadcast_device()
    for position, index in enumerate(group):
        for param in _layer_params(layers[index][1])[1:]:
            if not is_zero3_partitioned(param):
                buffer = param.data.to(device).contiguous()
                dist.broadcast(buffer, src=position)
                param.data.copy_(buffer)
