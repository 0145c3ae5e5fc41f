"""FP8 GEMMs for the frozen base of a model being finetuned with adapters (recipes' `fp8_base: true`).

Every `nn.Linear` inside the decoder layers whose weight is frozen (q, k, v, o, gate, up, down: PEFT's
`base_layer` of an adapted layer and the plain layers beside it) computes `x W^T` with `torch._scaled_mm` on
float8 operands; the LoRA factors, their gradients and the optimizer state stay as they were. lm_head, the
embeddings and LLaVA's vision tower and projector are not touched (they are not decoder layers).

- Operands are scaled per row (`quantize_rowwise`): each token of the input, each output row of W for the
  forward GEMM, each input feature of W (a row of W^T) for the backward one, and each token of the incoming
  gradient. Both copies of W are made from the layer's own weight, which stays the module's parameter in its
  dtype: `state_dict`, adapter saving and merging see the weights they saw before.
- Gradients are quantized to e4m3 like the activations. e5m2 exists for the range of gradients under one
  scale per tensor; with one scale per token that range problem is gone, and e4m3's extra mantissa bit halves
  the rounding error (relative GEMM error 0.033 vs 0.064 on Gaussian data, CPU). An e5m2 first operand would
  run too (CPU and CUDA's CUTLASS row-wise kernel take it; the second operand must be e4m3 there).
- The forward GEMM accumulates in the tensor cores' fast FP8 mode, the backward one in full precision (the split
  torchao's FP8 training makes): gradients are where accumulation error would build up.
- On CUDA the activations and gradients are quantized by one kernel (`torch.compile` of `quantize_rowwise`,
  dynamic shapes; compiled at the first step); eager ops, which pass over the tensor four times, are the fallback.
- The weight is frozen, so its gradient is never computed and the layer's input is not kept for backward; only
  the FP8 copy of W^T is used there.
- `_scaled_mm` wants the first operand row-major, the second column-major (the `.t()` view of a row-major
  tensor), K and N divisible by 16: a layer whose in or out features are not is skipped, with a logged reason.
  The tokens (M) are padded to a multiple of 16 where needed (CUTLASS's row-wise kernel may run the problem
  transposed, making M a leading dimension) and the output is cut back. The GEMMs write bfloat16 (older
  row-wise kernels take no other output type); a float16 or float32 layer casts the result.
- The FP8 copies are made the first time the layer runs, on the device it runs on, and again whenever the
  weight is replaced (moved, cast, reassigned, changed in place outside `.data`). They are plain attributes,
  not buffers: a device move before the first step costs nothing, and DistributedDataParallel does not
  broadcast them every step as it does buffers. An in-place change through `weight.data` (PEFT's merge
  without `safe_merge`) is invisible to them: `restore_linears` first; `milora.merge_adapter` does.

FP8 matrix multiplication runs on CUDA GPUs of compute capability 8.9 or higher (Ada, Hopper) and on CPUs (for
tests; slowly). Memory: the two FP8 copies add one byte per weight each beside the 16-bit weight.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from milora.errors import MiLoRAError

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
GRADIENT_FP8_DTYPE = torch.float8_e4m3fn  # why not e5m2: the module docstring
ALIGNMENT = 16  # _scaled_mm: K and N divisible by 16; M padded to it
CONVERTIBLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A row of zeros would get scale 0 and 0/0 values; any positive floor gives it zeros with a finite scale.
AMAX_FLOOR = 1e-12
MIN_CAPABILITY = (8, 9)
# Devices whose activations and gradients are quantized by one fused kernel (torch.compile of quantize_rowwise);
# elsewhere, or after a compile failure (logged), eager ops: four passes over the tensor instead of two.
COMPILED_QUANTIZATION: set[str] = set()  # none by default: see docs/benchmarks.md (FP8 frozen base)


def quantize_rowwise(t: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows, cols) as float8 values and float32 scales (rows, 1), `t ~ values * scales`: each row's scale is its
    largest magnitude over the dtype's largest finite value, so that row uses the whole range; values saturate."""
    largest = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True).float()
    scales = amax.clamp(min=AMAX_FLOOR) / largest
    values = (t / scales).clamp_(-largest, largest).to(dtype)
    return values, scales


@functools.cache
def compiled_quantize_rowwise():
    """`quantize_rowwise` as one kernel, for any number of rows and features (dynamic shapes: the token count changes
    every step)."""
    return torch.compile(quantize_rowwise, dynamic=True, fullgraph=True)


def quantize_activations(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rowwise`, compiled on the devices of `COMPILED_QUANTIZATION`."""
    device_type = t.device.type
    if device_type in COMPILED_QUANTIZATION:
        try:
            return compiled_quantize_rowwise()(t, dtype)
        except Exception as error:  # a compiler missing or failing: the eager ops compute the same values
            COMPILED_QUANTIZATION.discard(device_type)
            logger.warning("fp8_base: compiling the row-wise quantization failed on %s (%s); quantizing with eager "
                           "ops", device_type, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
    return quantize_rowwise(t, dtype)


def dequantize_rowwise(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 `values * scales`, the tensor `quantize_rowwise` stands for (for checks)."""
    return values.float() * scales


def padded_rows(rows: int) -> int:
    return -(-rows // ALIGNMENT) * ALIGNMENT


def scaled_matmul(a: torch.Tensor, b_rows: torch.Tensor, b_scales: torch.Tensor, out_dtype: torch.dtype,
                  a_dtype: torch.dtype = FP8_DTYPE, fast_accumulation: bool = False) -> torch.Tensor:
    """`a @ B^T` for a high-precision `a` (M, K) and an FP8 `B` given by its rows `b_rows` (N, K) and their scales
    (1, N): `a` quantized per row, one `torch._scaled_mm`, M padded to a multiple of 16 and cut back. The GEMM
    writes bfloat16, the one output type every backend's row-wise kernel takes; another `out_dtype` is a cast."""
    rows = a.shape[0]
    padding = padded_rows(rows) - rows
    with torch.autocast(a.device.type, enabled=False):  # autocast would run the row norms on a float32 copy
        a = (F.pad(a, (0, 0, 0, padding)) if padding else a).contiguous()  # row-major, as _scaled_mm wants it
        a_values, a_scales = quantize_activations(a, a_dtype)
        out = torch._scaled_mm(a_values, b_rows.t(), scale_a=a_scales, scale_b=b_scales, out_dtype=torch.bfloat16,
                               use_fast_accum=fast_accumulation)
    out = out[:rows] if padding else out
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


@dataclass
class Float8Weight:
    """The FP8 copies of a frozen weight W (out, in): its rows for the forward GEMM, the rows of W^T for the
    backward one, each with scales shaped as `_scaled_mm`'s `scale_b` (1, N)."""

    rows: torch.Tensor  # (out, in)
    row_scales: torch.Tensor  # (1, out)
    columns: torch.Tensor  # (in, out): W^T, contiguous
    column_scales: torch.Tensor  # (1, in)

    @classmethod
    def of(cls, weight: torch.Tensor) -> Float8Weight:
        with torch.no_grad():
            rows, row_scales = quantize_rowwise(weight)
            columns, column_scales = quantize_rowwise(weight.t().contiguous())
        return cls(rows, row_scales.reshape(1, -1).contiguous(), columns, column_scales.reshape(1, -1).contiguous())


class FrozenFloat8Matmul(torch.autograd.Function):
    """`x W^T` in FP8 for a frozen W, and the input's gradient `g W` in FP8. Nothing of `x` is kept for backward
    (no weight gradient); the FP8 weight is held on the context, not saved as an activation (saved-tensor hooks,
    activation offloading, must not copy it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Float8Weight, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.weight, ctx.input_dtype = weight, x.dtype
        return scaled_matmul(x, weight.rows, weight.row_scales, out_dtype, fast_accumulation=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight
        grad_input = scaled_matmul(grad, weight.columns, weight.column_scales, ctx.input_dtype, GRADIENT_FP8_DTYPE)
        return grad_input, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What `F.linear` would return for `x`: the autocast dtype under autocast, else `x`'s dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Float8FrozenLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight multiplies in FP8 (`convert_frozen_linears_to_fp8` turns a layer into one
    in place; `restore_linears` turns it back). A weight that requires a gradient while gradients are enabled
    takes `F.linear` (it is being trained; FP8 here computes no weight gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        out = FrozenFloat8Matmul.apply(x.reshape(-1, self.in_features), self.float8_weight(), output_dtype(x))
        out = out.reshape(*x.shape[:-1], self.out_features)
        # outside the FP8 GEMM: _scaled_mm takes no bias with a float32 output, and a bias may be trained
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def float8_weight(self) -> Float8Weight:
        """The FP8 copies of the weight as it is now, made on first use and whenever the weight was replaced."""
        weight = self.weight
        made_from = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if getattr(self, "_float8_made_from", None) != made_from:
            self._float8_weight = Float8Weight.of(weight)
            self._float8_made_from = made_from
        return self._float8_weight

    def drop_float8_weight(self) -> None:
        self.__dict__.pop("_float8_weight", None)
        self.__dict__.pop("_float8_made_from", None)


@dataclass
class Float8Conversion:
    """What `convert_frozen_linears_to_fp8` did: the layers now in FP8 and those left as they were, with why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (the language model of a LLaVA model), PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        raise MiLoRAError(f"fp8_base: {type(base).__name__} has no decoder (get_decoder) whose layers could run in "
                          "FP8; it converts causal LMs and LLaVA models")
    return decoder


def unsupported_shape(linear: nn.Linear) -> str | None:
    if linear.in_features % ALIGNMENT or linear.out_features % ALIGNMENT:
        return (f"in_features {linear.in_features} x out_features {linear.out_features}: FP8 GEMMs need both "
                f"divisible by {ALIGNMENT}")
    return None


def convert_frozen_linears_to_fp8(model: nn.Module) -> Float8Conversion:
    """Turn every `nn.Linear` inside `model`'s decoder whose weight is frozen into a `Float8FrozenLinear`, in
    place (PEFT's wrappers keep their `base_layer`, now in FP8). Layers with a trainable weight (LoRA A/B, a
    module trained in full) stay; so do layers whose features are not divisible by 16 (logged). Refuses weights
    that are not bfloat16, float16 or float32, and a model in which no layer could be converted."""
    inside_decoder = {id(module) for module in decoder_of(model).modules()}
    done = Float8Conversion()
    for name, module in model.named_modules():
        if id(module) not in inside_decoder or type(module) is not nn.Linear or module.weight.requires_grad:
            continue
        if module.weight.dtype not in CONVERTIBLE_DTYPES:
            raise MiLoRAError(
                f"fp8_base: {name} holds {str(module.weight.dtype).removeprefix('torch.')} weights; FP8 GEMMs are "
                "made from bfloat16, float16 or float32 weights (dtype: bfloat16)"
            )
        reason = unsupported_shape(module)
        if reason is not None:
            logger.warning("fp8_base: %s stays in %s (%s)", name, module.weight.dtype, reason)
            done.skipped[name] = reason
            continue
        module.__class__ = Float8FrozenLinear
        done.converted.append(name)
    if not done.converted:
        why = "; ".join(f"{name}: {reason}" for name, reason in done.skipped.items()) or "none found"
        raise MiLoRAError(f"fp8_base: no frozen nn.Linear in the decoder layers of {type(model).__name__} can run "
                          f"in FP8 ({why})")
    logger.info("fp8_base: %d frozen linear layers compute in FP8 (%d skipped)", len(done.converted),
                len(done.skipped))
    return done


def restore_linears(model: nn.Module) -> int:
    """Turn every `Float8FrozenLinear` in `model` back into the `nn.Linear` it was (its weight never changed);
    returns how many. Call it before merging adapters in memory or training the base weights."""
    restored = 0
    for module in model.modules():
        if isinstance(module, Float8FrozenLinear):
            module.drop_float8_weight()
            module.__class__ = nn.Linear
            restored += 1
    return restored


@contextlib.contextmanager
def plain_linears(model: nn.Module):
    """Within the block the `Float8FrozenLinear` layers of `model` compute as the `nn.Linear` they were (in their
    weights' dtype); after it in FP8 again, with the FP8 copies they had."""
    layers = [module for module in model.modules() if isinstance(module, Float8FrozenLinear)]
    for layer in layers:
        layer.__class__ = nn.Linear
    try:
        yield model
    finally:
        for layer in layers:
            layer.__class__ = Float8FrozenLinear


def has_fp8_layers(model: nn.Module) -> bool:
    return any(isinstance(module, Float8FrozenLinear) for module in model.modules())


def fp8_unsupported_reason(device: torch.device | str | None = None) -> str | None:
    """Why this machine's GPU cannot run FP8 GEMMs (compute capability below 8.9), else None. Without a CUDA GPU
    the CPU runs them (slowly: for tests and tiny runs)."""
    if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
        return None
    index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(index)} has compute capability {capability[0]}.{capability[1]}; FP8 "
                f"GEMMs need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher (Ada, Hopper and later)")
    return None
