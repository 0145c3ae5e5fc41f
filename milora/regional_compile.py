"""Regional compilation for training: each repeated block of a model (its decoder layers) compiled in place.

`torch.compile` of a whole PEFT model graph-breaks at every adapter and recompiles whenever a padding-free
batch changes its token count. Compiling the decoder layers one by one instead (`nn.Module.compile`, in
place, so parameter names, `state_dict` and adapter saving are unchanged) gives one graph per layer that all
layers share, made dynamic in the token dimension after the first change of shape. Inside it the adapter's
dropout, scaling and sum, the residual adds and the norms fuse into few kernels, which cuts the launches
that leave the GPU idle between small kernels. The variable-length attention stays eager
(`milora.attention`), and the boundaries of a padding-free batch reach it beside the layers, not through them
(`keep_boundaries_out_of_layers`): the layers' inputs then change shape with the token count only.
"""

from __future__ import annotations

import torch

from milora.attention import keep_boundaries_out_of_layers


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder of a causal LM (the language model of a LLaVA model), PEFT-wrapped or not; None without one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) else None


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """Every `ModuleList` of two or more modules of one class (decoder layers; a vision tower's layers), outermost
    first, none inside another one found."""
    found: list[torch.nn.ModuleList] = []
    for _, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(_contains(stack, module) for stack in found):
            continue
        found.append(module)
    return found


def _contains(stack: torch.nn.ModuleList, module: torch.nn.Module) -> bool:
    return any(inner is module for block in stack for inner in block.modules())


def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compile every block of `model`'s repeated stacks in place (`torch.compile` keyword arguments pass
    through); the number of blocks compiled. Raises ValueError when the model has no repeated blocks."""
    stacks = repeated_blocks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (decoder layers) to compile; "
                         "set torch_compile: false")
    for stack in stacks:
        for block in stack:
            block.compile(**compile_kwargs)
    decoder = decoder_stack(model)
    if decoder is not None:
        keep_boundaries_out_of_layers(decoder)
    return sum(len(stack) for stack in stacks)
