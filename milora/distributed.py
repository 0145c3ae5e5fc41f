"""Training on several processes: the SVD init split across them, cached on disk, ZeRO-3 aware; merging after
ZeRO-3; and the process set-up that lets several processes train on CPUs.

- Several processes (`accelerate launch`, `torchrun`, DeepSpeed): layer `i` is decomposed by rank
  `i % world_size` only, and its factors are broadcast, so N GPUs share the work and every rank ends
  with identical adapters and residual weights.
- DeepSpeed ZeRO-3: weights are partitioned. Layers are processed in groups of `world_size`; each layer
  of a group is gathered with its owner as the modifying rank, so ranks decompose in parallel and
  DeepSpeed re-partitions the owner's residual on exit; the LoRA factors, which PEFT creates as plain
  tensors after the weights were partitioned, are broadcast from the owner. The result equals a
  single-process init bit for bit.
- After ZeRO-3 training the full state dict is gathered onto the main process, which writes the merged
  checkpoint from it (`save_merged_from_state_dict`).
- Cache: with `cache_dir`, the factors are stored under a key made of a fingerprint of the target
  weights, the targets, r, alpha, mode, seed and solver; a later run with the same key loads them and
  only recomputes the cheap residual `W - s B A`.
- Without GPUs (tests, trying a launcher on a laptop): accelerate sets up a process group for several CPU
  processes only when told the run is on CPUs, and never for DeepSpeed's CPU accelerator; the two helpers
  at the end of the set-up section make up for that, and do nothing when a GPU is there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from milora.decomposition import lora_factors, residual_weight, singular_components
from milora.io import atomic_directory

ADAPTER_NAME = "default"


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _launched_several_processes() -> bool:
    """Started by a launcher (accelerate launch, torchrun, deepspeed) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def several_processes_without_accelerator() -> bool:
    """One of several launched processes on a machine without GPUs (or other accelerators). accelerate then sets
    up no process group unless told the run is on CPUs (`use_cpu`): each process would train alone."""
    return _launched_several_processes() and not torch.accelerator.is_available()


def share_deepspeed_cpu_process_state(deepspeed_requested: bool, timeout=None) -> bool:
    """Set up accelerate's process state for DeepSpeed on CPUs (DeepSpeed's CPU accelerator) with several processes.

    accelerate chooses a communication backend only for GPUs and other devices, or for `--cpu` runs, which turn
    DeepSpeed off. Under DeepSpeed's CPU accelerator it would therefore record one process on every rank: world
    size 1 in the training arguments (DeepSpeed's batch-size check fails), no data sharding, every rank the main
    process. Creating the state first with DeepSpeed's backend (gloo) fixes that; the training arguments must
    then reuse it (`accelerator_config={"use_configured_state": True}`). Returns whether it did: only with
    DeepSpeed requested, several processes and no GPU, so GPU runs never take this path.
    """
    if not deepspeed_requested or not _launched_several_processes():
        return False
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as TrainingArguments sets it while it builds the state
    try:
        kwargs = {} if timeout is None else {"timeout": timeout}
        PartialState(backend=accelerator.communication_backend_name(), **kwargs)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    return True


def lora_layers(peft_model) -> list[tuple[str, LoraLayer]]:
    """`(name, layer)` for every LoRA layer of `peft_model` that carries the adapter."""
    return [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    ]


@contextlib.contextmanager
def built_in_full():
    """Models built inside keep whole, initialised weights even under DeepSpeed ZeRO-3, where transformers would
    otherwise build them inside `zero.Init` (partitioned, weights left uninitialised for a checkpoint to fill);
    `partition_if_zero3` partitions them afterwards."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    # transformers' own marker for "zero.Init is already active", which stops it from opening one
    from transformers.modeling_utils import set_zero3_state

    with set_zero3_state():
        yield


def partition_if_zero3(model: torch.nn.Module) -> torch.nn.Module:
    """Under DeepSpeed ZeRO-3 (as transformers sees it), partition a model built in memory across the processes,
    as `from_pretrained` partitions the models it loads; otherwise return it unchanged."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return model
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())
    return model


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


def _compute_factors(layer, mode, device, solver, generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = _layer_weight(layer)
    work_device = torch.device(device) if device is not None else weight.device
    components = singular_components(
        weight.to(work_device), layer.r[ADAPTER_NAME], mode, solver=solver, generator=generator
    )
    return lora_factors(components, layer.scaling[ADAPTER_NAME])


@torch.no_grad()
def _write_layer(layer, B: torch.Tensor, A: torch.Tensor, device) -> None:
    """Set the LoRA factors and replace the base weight by the residual `W - s B A`."""
    base = layer.get_base_layer().weight
    weight = _layer_weight(layer)
    work_device = torch.device(device) if device is not None else weight.device
    scaling = layer.scaling[ADAPTER_NAME]
    B64, A64 = B.to(work_device, torch.float64), A.to(work_device, torch.float64)
    residual = residual_weight(weight.to(work_device), B64, A64, scaling)
    lora_A, lora_B = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    lora_A.data.copy_(A64.to(device=lora_A.device, dtype=lora_A.dtype))
    lora_B.data.copy_(B64.to(device=lora_B.device, dtype=lora_B.dtype))
    base.data.copy_(transpose(residual, layer.fan_in_fan_out).to(device=base.device, dtype=base.dtype))


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


def _load_cache(path: Path, count: int):
    file = path / "factors.safetensors"
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    return {i: (tensors[f"{i}.B"], tensors[f"{i}.A"]) for i in range(count)}


def _save_cache(path: Path, factors, metadata: dict) -> None:
    tensors = {}
    for i, (B, A) in factors.items():
        tensors[f"{i}.B"] = B.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{i}.A"] = A.detach().to("cpu", torch.float32).contiguous()
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / "factors.safetensors"))
        (tmp / "key.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))


def _compute_owned(layers, owned, mode, device, solver, seed, workers, progress):
    """Factors of the `owned` layers; on a GPU, `workers` threads each run their own CUDA stream, since
    one decomposition is a chain of small, latency-bound kernels that leaves most of the GPU idle."""

    def compute(i):
        # one generator per layer: the `random` mode does not depend on which layers came before
        return _compute_factors(layers[i][1], mode, device, solver, torch.Generator().manual_seed(seed + i))

    work_device = torch.device(device) if device is not None else _layer_weight(layers[0][1]).device
    if workers is None:
        workers = 4 if work_device.type == "cuda" else 1
    if workers <= 1 or work_device.type != "cuda" or len(owned) <= 1:
        factors = {}
        for i in owned:
            factors[i] = compute(i)
            progress.update()
        return factors

    local = threading.local()

    def on_own_stream(i):
        if not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(work_device)
        with torch.cuda.stream(local.stream):
            B, A = compute(i)
        local.stream.synchronize()
        return B, A

    # the first layer on this thread: CUDA libraries initialise lazily, and only once, safely, from one thread
    factors = {owned[0]: compute(owned[0])}
    progress.update()
    consumer = torch.cuda.current_stream(work_device)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (B, A) in zip(owned[1:], pool.map(on_own_stream, owned[1:]), strict=True):
            # the tensors were allocated on a worker's stream: tell the allocator they are used on ours
            B.record_stream(consumer)
            A.record_stream(consumer)
            factors[i] = (B, A)
            progress.update()
    return factors


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
) -> None:
    """Initialise every `(name, LoraLayer)` in `layers` from its `mode` singular components."""
    rank, world_size = world()
    if any(is_zero3_partitioned(layer.get_base_layer().weight) for _, layer in layers):
        if cache_dir is not None and rank == 0:
            warnings.warn("cache_dir is not used under DeepSpeed ZeRO-3; start from a `milora init` directory "
                          "to skip the decomposition on repeated runs", stacklevel=3)
        return _initialize_zero3(layers, mode, device, solver, seed, show_progress, description)

    first = layers[0][1]
    cache_path = None
    factors = None
    if cache_dir is not None:
        fingerprints = [weight_fingerprint(layer.get_base_layer().weight) for _, layer in layers]
        key = cache_key(layers, first.r[ADAPTER_NAME], first.scaling[ADAPTER_NAME], mode, seed, solver, fingerprints)
        cache_path = Path(cache_dir) / key
        factors = _load_cache(cache_path, len(layers))
    computed = factors is None
    if computed:
        owned = [i for i in range(len(layers)) if i % world_size == rank]
        progress = tqdm(total=len(owned), desc=description, disable=not show_progress or rank != 0, unit="layer")
        factors = _compute_owned(layers, owned, mode, device, solver, seed, workers, progress)
        progress.close()
        if world_size > 1:
            _broadcast_factors(factors, layers, rank, world_size)
    for i, (_, layer) in enumerate(layers):
        _write_layer(layer, *factors[i], device)
    if computed and cache_path is not None and rank == 0:
        _save_cache(cache_path, factors, {"layers": len(layers), "mode": mode, "seed": seed, "solver": solver})


def _layer_params(layer) -> list[torch.nn.Parameter]:
    return [layer.get_base_layer().weight, layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]


def _initialize_zero3(layers, mode, device, solver, seed, show_progress, description) -> None:
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
                index = group[rank]
                layer = layers[index][1]
                # the same generator as the single-process path: the `random` mode picks the same triplets
                B, A = _compute_factors(layer, mode, device, solver, torch.Generator().manual_seed(seed + index))
                _write_layer(layer, B, A, device)
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


# --- after training under ZeRO-3: merging from the consolidated state dict ----------------------------------------


def zero3_consolidated_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed ZeRO-3, the full state dict of the trained model, gathered layer by layer onto the main
    process; None on the other processes and without ZeRO-3. Every process must call it. It needs the DeepSpeed
    config's `stage3_gather_16bit_weights_on_model_save: true`, as the Trainer's own save under ZeRO-3 does."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return None
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return state_dict if trainer.accelerator.is_main_process else None


def _base_model_key(key: str) -> str:
    """A PEFT model's state-dict key as the plain base model names it."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER_NAME}.", ".")


def merged_state_dict(peft_model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapter merged, from a full state dict of `peft_model` (such as
    `zero3_consolidated_state_dict` returns): `W + s B A` for every LoRA layer (in float64, cast back to W's dtype),
    the trained copy of every `modules_to_save` module, keys as the plain base model names them."""
    layers = dict(lora_layers(peft_model))
    if any(layer.use_dora.get(ADAPTER_NAME, False) for layer in layers.values()):
        raise ValueError("merging from a state dict does not cover DoRA adapters; merge a model loaded in full instead")
    adapter_prefixes = tuple(f"{name}.lora_" for name in layers)
    merged = {
        _base_model_key(key): value
        for key, value in state_dict.items()
        if not key.startswith(adapter_prefixes) and ".original_module." not in key
    }
    for name, layer in layers.items():
        weight = state_dict[f"{name}.base_layer.weight"]
        B = state_dict[f"{name}.lora_B.{ADAPTER_NAME}.weight"].to(torch.float64)
        A = state_dict[f"{name}.lora_A.{ADAPTER_NAME}.weight"].to(torch.float64)
        delta = transpose(B @ A, layer.fan_in_fan_out) * layer.scaling[ADAPTER_NAME]
        merged[_base_model_key(f"{name}.weight")] = (weight.to(torch.float64) + delta).to(weight.dtype)
    return merged


def save_merged_from_state_dict(peft_model, state_dict, out_dir: str | Path, processing_class=None) -> Path:
    """Write the merged full checkpoint (`from_pretrained` loads it) from a full state dict of `peft_model`,
    without materialising the model's partitioned weights: the base model's config and classes, the merged
    weights. Atomic; call it on one process."""
    with atomic_directory(out_dir) as tmp:
        peft_model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(peft_model, state_dict))
        if processing_class is not None:
            processing_class.save_pretrained(tmp)
    return Path(out_dir)
