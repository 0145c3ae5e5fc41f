"""No float32 round trip of LoRA inputs under autocast.

PEFT casts a LoRA layer's input to the adapter's dtype before the dropout and `A`. In mixed-precision training
the adapters are float32 and the activations bfloat16/float16, so every adapted layer writes a float32 copy of
its input, runs the dropout on it, and autocast then casts it back to the compute dtype for the matmul (and
the backward pass does the same in reverse). The values are unchanged by the round trip (a bfloat16 value
is exact in float32, and the dropout rounds `x * mask / (1 - p)` once either way), so the copies are pure cost:
14% of a LLaMA-2-7B LoRA step on an H200 (docs/benchmarks.md).

`skip_input_casts_under_autocast(model)` turns PEFT's cast off while autocast is on for the input's device and
leaves it on otherwise (a bfloat16 model with float32 adapters outside autocast still needs it).
"""

from __future__ import annotations

import torch

_HOOK_ATTRIBUTE = "_milora_autocast_cast_hook"


def _set_input_cast(module, args):
    if args and isinstance(args[0], torch.Tensor):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(args[0].device.type)


def skip_input_casts_under_autocast(model: torch.nn.Module, enabled: bool = True) -> int:
    """Install (or, with `enabled=False`, remove) the switch on every PEFT LoRA layer; the number of layers."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        handle = getattr(module, _HOOK_ATTRIBUTE, None)
        if enabled and handle is None:
            setattr(module, _HOOK_ATTRIBUTE, module.register_forward_pre_hook(_set_input_cast))
        elif not enabled and handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTRIBUTE)
            module.cast_input_dtype_enabled = True
        count += 1
    return count
