"""Which base an adapter applies to, recorded beside it and checked before anything is written from it.

A MiLoRA/PiSSA run has two bases that share every name and shape: the original model `W` and the residual
`W - s B0 A0` the adapter was trained on. An adapter put on the wrong one loads without a word and gives other
outputs, so milora writes `ADAPTER_RECORD_FILE` next to each adapter's `adapter_config.json` (PEFT drops keys it
does not know from that file): which base it applies to, by name, and a fingerprint of that base's weights.
`milora merge` and `milora convert` compare the fingerprint of the base they are given with it before writing.

The fingerprint hashes a few fixed slices of every adapted weight (first and last 16 values and 64 evenly
spaced ones, with the module's name and shape), cast to float32, bfloat16 and float16: a base loaded in
another of these dtypes than the one fingerprinted is compared in its own dtype, and the casts are exact
(float32 -> bfloat16 rounds the same way when transformers loads a checkpoint in bfloat16).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from milora.errors import MiLoRAError
from milora.io import read_json, write_json
from milora.layout import ADAPTER_RECORD_FILE

FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EDGE, SPREAD = 16, 64
PEFT_PREFIX = "base_model.model."  # what a PEFT model puts before the names of its base model's modules
RECORD_FORMAT = 1


class BaseMismatchError(MiLoRAError):
    """An adapter given a base whose weights are not the ones it applies to; the message names the right base."""


def base_module_name(name: str) -> str:
    """A PEFT model's module or state-dict name as the plain base model has it."""
    return name.removeprefix(PEFT_PREFIX)


def _slices(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    spread = torch.linspace(0, n - 1, steps=min(SPREAD, n), device=flat.device).round().long()
    return torch.cat([flat[:EDGE], flat[spread], flat[-EDGE:]]).cpu()


@contextlib.contextmanager
def _gathered(weight: torch.Tensor):
    """The full weight, also under DeepSpeed ZeRO-3 (every process must enter)."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            yield weight
    else:
        yield weight


def base_weight(model: torch.nn.Module, module_name: str) -> torch.Tensor:
    """The base weight of `module_name` in a plain model or a PEFT model (the LoRA layer's base layer)."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = root.get_submodule(module_name)
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return module.weight


def model_fingerprint(model: torch.nn.Module, module_names: Iterable[str]) -> dict:
    """The fingerprint of `model`'s base weights at `module_names` (names as the plain base model has them)."""
    pairs = []
    for name in sorted(module_names):
        try:
            weight = base_weight(model, name)
        except AttributeError:
            raise BaseMismatchError(f"the base has no module {name}: it is another architecture") from None
        with _gathered(weight):
            pairs.append((name, _slices(weight), tuple(weight.shape)))
    return _fingerprint_of_samples(pairs)


def _fingerprint_of_samples(samples: list[tuple[str, torch.Tensor, tuple]]) -> dict:
    hashes = {name: hashlib.sha256() for name in FINGERPRINT_DTYPES}
    for module, sample, shape in sorted(samples, key=lambda item: item[0]):
        if not sample.is_floating_point():
            raise MiLoRAError(f"{module}: weights of dtype {sample.dtype} cannot be fingerprinted; use a float model")
        header = f"{module}:{shape};".encode()
        for dtype_name, dtype in FINGERPRINT_DTYPES.items():
            hashes[dtype_name].update(header)
            hashes[dtype_name].update(sample.to(dtype).view(torch.uint8).numpy().tobytes())
    return {"layers": len(samples), **{name: digest.hexdigest()[:32] for name, digest in hashes.items()}}


def fingerprint_dtype(model: torch.nn.Module, module_names: Iterable[str]) -> str | None:
    """The dtype name the base's adapted weights have, if it is one the fingerprint covers."""
    names = sorted(module_names)
    if not names:
        return None
    dtype = base_weight(model, names[0]).dtype
    return next((name for name, value in FINGERPRINT_DTYPES.items() if value == dtype), None)


def same_base(expected: dict, found: dict, dtype_name: str | None) -> bool:
    """Whether two fingerprints describe the same weights, compared in `dtype_name` (the candidate's dtype)."""
    if expected.get("layers") != found.get("layers"):
        return False
    keys = [dtype_name] if dtype_name in FINGERPRINT_DTYPES else list(FINGERPRINT_DTYPES)
    return all(expected.get(key) == found.get(key) for key in keys)


def adapter_module_names(adapter_dir: str | Path) -> list[str]:
    """The adapted modules of a saved PEFT adapter, named as in the plain base model."""
    from milora.io import safetensors_keys
    from milora.layout import ADAPTER_WEIGHTS_FILE

    keys = safetensors_keys(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE)
    return sorted({base_module_name(k).split(".lora_A.")[0] for k in keys if ".lora_A." in k})


def read_record(adapter_dir: str | Path) -> dict | None:
    """The adapter's base record, or None for an adapter written without one (by PEFT or an older milora)."""
    path = Path(adapter_dir) / ADAPTER_RECORD_FILE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError:
        raise OSError(f"{path} is damaged (not valid JSON); rewrite the outputs (rerun with "
                      "resume_from_checkpoint: true) or delete the file to skip the base check") from None


def write_record(adapter_dir: str | Path, *, applies_to: str, base_model: str | None, fingerprint: dict | None,
                 method: str, r: int, lora_alpha: float, original_model: str | None = None,
                 original_fingerprint: dict | None = None, note: str | None = None) -> Path:
    """Write the base record of the adapter in `adapter_dir` (`applies_to`: "original" or "residual")."""
    record = {
        "format": RECORD_FORMAT, "applies_to": applies_to, "base_model": base_model, "fingerprint": fingerprint,
        "method": method, "r": r, "lora_alpha": lora_alpha, "original_model": original_model,
        "original_fingerprint": original_fingerprint, "note": note,
    }
    return write_json(Path(adapter_dir) / ADAPTER_RECORD_FILE, record, sort_keys=True)


def describe_base(record: dict) -> str:
    """`the original model tiny:llama` / `the residual base W - B0 A0 of tiny:llama (milora, r=8) in DIR`."""
    if record.get("applies_to") == "original":
        return f"the original model {record.get('base_model')}"
    where = f" in {record['base_model']}" if record.get("base_model") else " (not saved by the run)"
    return (f"the residual base W - B0 A0 of {record.get('original_model')} ({record.get('method')}, "
            f"r={record.get('r')}){where}")


def _fingerprint_for(model: torch.nn.Module, adapter_dir: str | Path) -> tuple[list[str], dict, str | None]:
    """The adapted modules of the adapter in `adapter_dir`, `model`'s fingerprint there and its dtype's name."""
    names = adapter_module_names(adapter_dir)
    return names, model_fingerprint(model, names), fingerprint_dtype(model, names)


def check_base(model: torch.nn.Module, adapter_dir: str | Path, base_name: str) -> str:
    """Refuse (BaseMismatchError, one line) a base whose weights are not the ones the adapter applies to.

    Returns what was checked, for the caller to print: a match, or that the adapter has no record (written by
    PEFT or an older milora), so nothing could be checked.
    """
    record = read_record(adapter_dir)
    if record is None:
        refuse_legacy_residual_root(adapter_dir)
    if record is None or not record.get("fingerprint"):
        return f"{adapter_dir} records no base fingerprint (written by PEFT or an older milora): base not checked"
    names, found, dtype_name = _fingerprint_for(model, adapter_dir)
    if same_base(record["fingerprint"], found, dtype_name):
        return f"base {base_name} matches {describe_base(record)}"
    hint = _mismatch_fix(record, found, dtype_name, adapter_dir)
    raise BaseMismatchError(
        f"{adapter_dir} applies to {describe_base(record)}, but the weights of {base_name} differ from it "
        f"(fingerprint of {len(names)} adapted layers); {hint}"
    )


def refuse_legacy_residual_root(adapter_dir: str | Path) -> None:
    """An output directory of an older milora kept the residual adapter at its root and the standard LoRA in
    `lora_adapter/`: refuse its root, whose base cannot be checked, and say what to use instead."""
    from milora.layout import LEGACY_STANDARD_LORA_DIR, RUN_INFO_FILE

    info_path = Path(adapter_dir) / RUN_INFO_FILE
    if not info_path.is_file():
        return
    try:
        residual = read_json(info_path).get("adapter_base") == "residual"
    except ValueError:
        return
    if residual:
        raise BaseMismatchError(
            f"{adapter_dir} was written by an older milora: its root adapter applies to the residual base W - B0 A0, "
            f"not to the original model; use {Path(adapter_dir) / LEGACY_STANDARD_LORA_DIR} on the original model "
            "(or move the folders to the current layout: README, Outputs)"
        )


def _mismatch_fix(record: dict, found: dict, dtype_name: str | None, adapter_dir) -> str:
    original = record.get("original_fingerprint")
    if record.get("applies_to") == "residual":
        if original and same_base(original, found, dtype_name):
            return (f"that is the original model: load the standard LoRA (rank {2 * record.get('r', 0)}) in "
                    f"{Path(adapter_dir).parent} on it instead")
        if record.get("base_model"):
            return f"give {record['base_model']} as the base"
        return (f"load the standard LoRA in {Path(adapter_dir).parent} on {record.get('original_model')} instead, "
                "or train with save_residual_base: true to keep the residual")
    return f"give {record.get('base_model')} (the model the run trained from) as the base"


def check_original_base(model: torch.nn.Module, adapter_dir: str | Path, base_name: str) -> str:
    """Refuse a base for `milora convert` (whose output applies to the original model) that is not the original
    model recorded beside the residual adapter in `adapter_dir`. Returns what was checked."""
    record = read_record(adapter_dir)
    if record is None or not record.get("original_fingerprint"):
        return f"{adapter_dir} records no fingerprint of its original model: base not checked"
    _, found, dtype_name = _fingerprint_for(model, adapter_dir)
    if same_base(record["original_fingerprint"], found, dtype_name):
        return f"base {base_name} matches the original model {record.get('original_model')}"
    what = ("it is the residual base the adapter was trained on" if record.get("fingerprint")
            and same_base(record["fingerprint"], found, dtype_name) else "its weights differ")
    raise BaseMismatchError(
        f"--base {base_name} is not the original model of {adapter_dir} ({what}); the standard LoRA applies to "
        f"{record.get('original_model')}: give that as --base"
    )


def check_same_residual(adapter_dir: str | Path, initial_adapter_dir: str | Path) -> None:
    """Refuse a trained adapter and an initial adapter whose records name different residual bases."""
    trained, initial = read_record(adapter_dir), read_record(initial_adapter_dir)
    if not (trained and initial and trained.get("fingerprint") and initial.get("fingerprint")):
        return
    if not same_base(trained["fingerprint"], initial["fingerprint"], None):
        raise BaseMismatchError(
            f"{initial_adapter_dir} was initialised on another residual base than {adapter_dir} was trained on; "
            "give the initial adapter of the same run (OUTPUT/milora_init_adapter) or init directory (DIR/milora_init)"
        )
