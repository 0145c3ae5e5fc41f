"""`milora init` for checkpoints larger than CPU memory: safetensors files in, safetensors files out, one matrix
at a time.

The model is built on the meta device (no weights in memory), only to know its target layers and to give PEFT
its adapter. The checkpoint's safetensors files are copied to the output as they are (by the file system, not
through memory); then each target weight is read from its input file when its turn comes, decomposed
(`milora.streaming`: on the CPU, or streamed to a GPU and back) and its residual written over its own bytes in
the output file: same tensor names, dtypes, shapes and offsets. Memory holds the adapter factors and the few
matrices in flight, whatever the number or size of the files. The directory equals the one `milora init`
writes from a model loaded in memory (residual weights and adapter alike).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils.other import transpose

from milora.distributed import ADAPTER_NAME, lora_layers, set_factors
from milora.errors import MiLoRAError
from milora.init_dir import save_init_dir
from milora.streaming import Matrix, TransferStats, decompose_matrices

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# files of a model directory that describe it (weights aside); copied as they are
DESCRIPTION_FILES = ("config.json", "generation_config.json")
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class NotShardable(MiLoRAError):
    """The checkpoint cannot be initialised file by file (the message says why); load it in memory instead."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file (`offset` from the start of the file)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def read(self) -> torch.Tensor:
        """The tensor, read into fresh memory (no memory map that would stay resident)."""
        if self.dtype not in FLOAT_DTYPES:
            raise NotShardable(f"{self.file.name}: a target weight is stored as {self.dtype}, not a float type")
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with open(self.file, "rb") as handle:
            handle.seek(self.offset)
            done = 0
            while done < self.nbytes:
                count = handle.readinto(view[done:])
                if not count:
                    raise MiLoRAError(f"{self.file}: the file ends inside a tensor; the checkpoint is truncated")
                done += count
        return buffer.view(FLOAT_DTYPES[self.dtype]).view(self.shape)

    def write_into(self, out_file: Path, tensor: torch.Tensor) -> None:
        """Write `tensor` (this tensor's dtype and shape) over this tensor's bytes in `out_file`."""
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != self.nbytes:
            raise ValueError(f"{out_file}: {data.numel()} bytes do not fit a {self.nbytes}-byte tensor")
        with open(out_file, "r+b") as handle:
            handle.seek(self.offset)
            handle.write(memoryview(data.numpy()))


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, by name, from its header (8-byte length, JSON, then the data)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    start = 8 + length
    return {
        name: StoredTensor(path, entry["dtype"], tuple(entry["shape"]), start + entry["data_offsets"][0],
                           entry["data_offsets"][1] - entry["data_offsets"][0])
        for name, entry in header.items() if name != "__metadata__"
    }


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded with an index, or one file); [] if it has none."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SAFETENSORS_SINGLE
    return [single] if single.is_file() else []


def shardable_reason(model: str) -> str | None:
    """None when `model` names a checkpoint `init_by_shards` can process, else why not."""
    from milora import gguf, tiny
    from milora.loading import is_vision_language

    if tiny.is_tiny(model) or gguf.is_gguf_path(model):
        return "not a safetensors checkpoint"
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        return "not a local model directory"
    if not checkpoint_files(path):
        return "no safetensors files"
    if is_vision_language(str(path)):
        return "vision-language checkpoints name their weights differently from their modules"
    return None


def _skeleton(model_dir: Path, targets, r: int, method: str, lora_alpha, stored: dict[str, StoredTensor]):
    """The PEFT model `apply_milora` would build, its base on the meta device, its LoRA factors in CPU memory."""
    from transformers import AutoConfig

    from milora.loading import model_class
    from milora.model import wrap_model

    config = AutoConfig.from_pretrained(model_dir)
    dtypes = {FLOAT_DTYPES.get(t.dtype) for t in stored.values()} - {None}
    dtype = next((d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64) if d in dtypes), None)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=dtype)
    peft_model = wrap_model(model, targets, r, method=method, lora_alpha=lora_alpha)
    for _, layer in lora_layers(peft_model):
        layer.lora_A[ADAPTER_NAME].to_empty(device="cpu")
        layer.lora_B[ADAPTER_NAME].to_empty(device="cpu")
    return peft_model


def _matrices(peft_model, stored: dict[str, StoredTensor], out_dir: Path, seed: int) -> list[Matrix]:
    """One `Matrix` per LoRA layer: read from the input file, its residual written into the output copy."""
    matrices = []
    prefix = "base_model.model."
    for index, (name, layer) in enumerate(lora_layers(peft_model)):
        key = name.removeprefix(prefix) + ".weight"
        if key not in stored:
            raise NotShardable(f"the checkpoint stores no tensor {key!r} for the target {name.removeprefix(prefix)}")
        tensor, flip = stored[key], layer.fan_in_fan_out
        out_file = out_dir / tensor.file.name

        def write(residual, tensor=tensor, out_file=out_file, flip=flip):
            tensor.write_into(out_file, transpose(residual, flip))

        matrices.append(Matrix(
            key, lambda tensor=tensor, flip=flip: transpose(tensor.read(), flip), layer.r[ADAPTER_NAME],
            layer.scaling[ADAPTER_NAME], torch.Generator().manual_seed(seed + index), write=write,
            nbytes=tensor.nbytes,
        ))
    return matrices


def init_by_shards(
    model_dir: str | Path,
    out_dir: str | Path,
    targets,
    r: int,
    *,
    method: str = "milora",
    lora_alpha: float | None = None,
    device: torch.device | str | None = None,
    solver: str = "auto",
    seed: int = 0,
    workers: int | None = None,
    processing_class=None,
    source_model: str | None = None,
    show_progress: bool = True,
    stats: TransferStats | None = None,
) -> Path:
    """Write the `milora init` directory of the safetensors checkpoint in `model_dir` to `out_dir`, file by file.

    Arguments as `apply_milora`'s (`device`: where to decompose; default the CPU). Raises `NotShardable` (before
    writing anything) when the checkpoint's tensors do not match the model's target layers by name.
    """
    from tqdm.auto import tqdm

    from milora.model import METHOD_MODES, check_method

    model_dir = Path(model_dir)
    reason = shardable_reason(str(model_dir))
    if reason is not None:
        raise NotShardable(f"{model_dir}: {reason}")
    files = checkpoint_files(model_dir)
    stored = {name: tensor for file in files for name, tensor in read_header(file).items()}
    component_mode = METHOD_MODES[check_method(method)]
    if component_mode is None:
        raise MiLoRAError("plain LoRA needs no precomputed init; use method milora, pissa, mid or random")
    peft_model = _skeleton(model_dir, targets, r, method, lora_alpha, stored)
    layers = lora_layers(peft_model)

    def write_base(tmp: Path) -> None:
        matrices = _matrices(peft_model, stored, tmp, seed)  # NotShardable here leaves nothing behind
        for name in DESCRIPTION_FILES + (SAFETENSORS_INDEX,):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        for file in files:
            shutil.copyfile(file, tmp / file.name)
        progress = tqdm(total=len(matrices), desc=f"MiLoRA init by shards ({method}, r={r})", unit="layer",
                        disable=not show_progress)

        def done(index, B, A):
            set_factors(layers[index][1], B, A)
            progress.update()

        decompose_matrices(matrices, component_mode, device=device, solver=solver, workers=workers, on_done=done,
                           stats=stats, check_values=True)
        progress.close()

    return save_init_dir(peft_model, out_dir, processing_class, method=method, source_model=source_model,
                         targets=targets, solver=solver, seed=seed, write_base=write_base)
