"""Several processes around training: setting them up on machines without GPUs, building models under DeepSpeed
ZeRO-3, and merging after ZeRO-3 training.

- Without GPUs (tests, trying a launcher on a laptop): accelerate sets up a process group for several CPU
  processes only when told the run is on CPUs (`use_cpu`), and never for DeepSpeed's CPU accelerator, so each
  process would train alone. `several_processes_without_accelerator` and `share_deepspeed_cpu_process_state`
  let the recipe make up for that; both do nothing when a GPU is there.
- Models built in memory (the tiny test models) keep their seeded weights under ZeRO-3 (`built_in_full`) and are
  then partitioned as `from_pretrained` partitions a checkpoint (`partition_if_zero3`).
- After ZeRO-3 training the full state dict is gathered onto the main process, which writes the merged
  checkpoint from it (`save_merged_from_state_dict`) without materialising the partitioned model.
- At the end of a run the process group is destroyed (`end_processes`) and, on success, the process ends without
  the interpreter's teardown (`exit_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import torch
from peft.utils.other import transpose

from milora.distributed import ADAPTER_NAME, lora_layers
from milora.init_dir import plain_base_key, plain_state_dict
from milora.io import atomic_directory


def end_processes() -> None:
    """Wait for every process, then destroy the process group, once a run has done its last collective (every
    process calls it); nothing without one. Without the barrier a fast process could tear its gloo connections
    down while another still sends. Without the destruction, a process that exits with its gloo group alive can
    abort at interpreter exit (the group's worker threads still hold tensors: SIGABRT, "terminate called without
    an active exception"), so that a run which trained and saved everything ends with a failure. Called on success
    only: after an error another rank may still be inside a collective, and the launcher tears the processes down
    anyway."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(status: int) -> NoReturn:
    """`sys.exit(status)`, except in a process launched as one of several whose run succeeded (status 0): there the
    non-daemon threads are joined, the exit handlers run (trackers, logging) and the standard streams are flushed,
    as at a normal exit, and then the process ends at once (`os._exit`), skipping the interpreter's teardown.

    Native threads of the communication libraries (gloo, DeepSpeed's) that outlive the process group can abort that
    teardown (SIGABRT, "terminate called without an active exception") after everything was written and the group
    destroyed (`end_processes`); the launcher then reports the whole run as failed. Seen rarely, on CPU runs under
    DeepSpeed ZeRO-3."""
    if status != 0 or not _launched_several_processes():
        sys.exit(status)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _launched_several_processes() -> bool:
    """Started by a launcher (accelerate launch, torchrun, deepspeed) as one of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def several_processes_without_accelerator() -> bool:
    """One of several launched processes on a machine without GPUs (or other accelerators). accelerate then sets
    up no process group unless told the run is on CPUs (`use_cpu`): each process would train alone."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; older: CUDA is the accelerator that matters
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return _launched_several_processes() and not has_accelerator


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


def zero3_consolidated_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """Under DeepSpeed ZeRO-3, the full state dict of the trained model, gathered layer by layer onto the main
    process; None on the other processes and without ZeRO-3. Every process must call it. It needs the DeepSpeed
    config's `stage3_gather_16bit_weights_on_model_save: true`, as the Trainer's own save under ZeRO-3 does."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return None
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return state_dict if trainer.accelerator.is_main_process else None


def merged_state_dict(peft_model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapter merged, from a full state dict of `peft_model` (such as
    `zero3_consolidated_state_dict` returns): `W + s B A` for every LoRA layer (in float64, cast back to W's dtype),
    the trained copy of every `modules_to_save` module, keys as the plain base model names them."""
    layers = dict(lora_layers(peft_model))
    if any(layer.use_dora.get(ADAPTER_NAME, False) for layer in layers.values()):
        raise ValueError("merging from a state dict does not cover DoRA adapters; merge a model loaded in full instead")
    merged = plain_state_dict(state_dict, modules_to_save="trained")
    for name, layer in layers.items():
        weight = state_dict[f"{name}.base_layer.weight"]
        B = state_dict[f"{name}.lora_B.{ADAPTER_NAME}.weight"].to(torch.float64)
        A = state_dict[f"{name}.lora_A.{ADAPTER_NAME}.weight"].to(torch.float64)
        delta = transpose(B @ A, layer.fan_in_fan_out) * layer.scaling[ADAPTER_NAME]
        key = plain_base_key(f"{name}.weight", modules_to_save="trained")
        merged[key] = (weight.to(torch.float64) + delta).to(weight.dtype)
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
