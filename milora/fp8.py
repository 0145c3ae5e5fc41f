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
- Activations and gradients are quantized by plain torch ops inside the layer's forward and backward. Eagerly
  they are separate kernels, each a pass over the tensor. Inside a compiled decoder layer (`torch_compile: true`,
  `milora.regional_compile`) the FP8 layer adds no graph break and no graph: the padding, the quantization and
  the GEMMs are part of the layer's graph (the autograd function takes tensors only), where the compiler may fuse
  the quantization into the kernel that produced the tensor (RMSNorm, SwiGLU, the incoming gradient).
- The weight is frozen, so its gradient is never computed and the layer's input is not kept for backward; only
  the FP8 copy of W^T is used there.
- `_scaled_mm` wants the first operand row-major, the second column-major (the `.t()` view of a row-major
  tensor), K and N divisible by 16: a layer whose in or out features are not is skipped, with a logged reason.
  The tokens (M) are padded to a multiple of 16 where needed (CUTLASS's row-wise kernel may run the problem
  transposed, making M a leading dimension) and the output is cut back. The GEMMs write bfloat16 (older
  row-wise kernels take no other output type); a float16 or float32 layer casts the result.
- The FP8 copies are made on the device the layer runs on, before its first forward, and again when the
  weight was replaced (moved, cast, reassigned, changed in place outside `.data`). A converted decoder checks
  its layers' copies in a forward pre-hook, eagerly: compiled code cannot read a weight's address or version
  counter, and making the copies there would be a side effect, which the compiler refuses inside activation
  checkpointing. (A layer called on its own checks in its forward: fully when eager, device and dtype only when
  compiled.) The copies are plain tensor attributes, not buffers: a device move before the first step costs
  nothing, `.float()` does not cast them, and DistributedDataParallel does not broadcast them every step as it
  does buffers. An in-place change through `weight.data` (PEFT's merge without `safe_merge`) is invisible to
  them: `restore_linears` first; `milora.merge_adapter` does.

FP8 matrix multiplication runs on CUDA GPUs of compute capability 8.9 or higher (Ada, Hopper) and on CPUs (for
tests; slowly). Memory: the two FP8 copies add one byte per weight each beside the 16-bit weight.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from milora.errors import MiLoRAError
from milora.regional_compile import decoder_stack

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
GRADIENT_FP8_DTYPE = torch.float8_e4m3fn  # why not e5m2: the module docstring
ALIGNMENT = 16  # _scaled_mm: K and N divisible by 16; M padded to it
CONVERTIBLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A row of zeros would get scale 0 and 0/0 values; any positive floor gives it zeros with a finite scale.
AMAX_FLOOR = 1e-12
MIN_CAPABILITY = (8, 9)


def quantize_rowwise(t: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows, cols) as float8 values and float32 scales (rows, 1), `t ~ values * scales`: each row's scale is its
    largest magnitude over the dtype's largest finite value, so that row uses the whole range; values saturate."""
    largest = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True).float()
    scales = amax.clamp(min=AMAX_FLOOR) / largest
    values = (t / scales).clamp_(-largest, largest).to(dtype)
    return values, scales


def dequantize_rowwise(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 `values * scales`, the tensor `quantize_rowwise` stands for (for checks)."""
    return values.float() * scales


def padded_rows(rows: int) -> int:
    return -(-rows // ALIGNMENT) * ALIGNMENT


def scaled_matmul(a: torch.Tensor, b_rows: torch.Tensor, b_scales: torch.Tensor, out_dtype: torch.dtype,
                  a_dtype: torch.dtype = FP8_DTYPE, fast_accumulation: bool = False) -> torch.Tensor:
    """`a @ B^T` for a high-precision `a` (M, K) and an FP8 `B` given by its rows `b_rows` (N, K) and their scales
    (1, N): `a` quantized per row, one `torch._scaled_mm`, M padded to a multiple of 16 and cut back. The GEMM
    writes bfloat16, the one output type every backend's row-wise kernel takes; another `out_dtype` is a cast.
    Compiled, M is padded even when it is a multiple of 16: one graph then serves every M, and the pad fuses into
    the quantization."""
    rows = a.shape[0]
    padding = padded_rows(rows) - rows
    pad = torch.compiler.is_compiling() or padding != 0
    with torch.autocast(a.device.type, enabled=False):  # autocast would run the row norms on a float32 copy
        a = (F.pad(a, (0, 0, 0, padding)) if pad else a).contiguous()  # row-major, as _scaled_mm wants it
        a_values, a_scales = quantize_rowwise(a, a_dtype)
        out = torch._scaled_mm(a_values, b_rows.t(), scale_a=a_scales, scale_b=b_scales, out_dtype=torch.bfloat16,
                               use_fast_accum=fast_accumulation)
    out = out[:rows] if pad else out
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


def rowwise_fp8_copies(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 copies of a frozen weight W (out, in): its rows (out, in) with their scales (1, out) for the forward
    GEMM, the rows of W^T (in, out) with theirs (1, in) for the backward one; scales shaped as `_scaled_mm`'s
    `scale_b`."""
    with torch.no_grad():
        rows, row_scales = quantize_rowwise(weight)
        columns, column_scales = quantize_rowwise(weight.t().contiguous())
    return rows, row_scales.reshape(1, -1).contiguous(), columns, column_scales.reshape(1, -1).contiguous()


class FrozenFloat8Matmul(torch.autograd.Function):
    """`x W^T` in FP8 for a frozen W, and the input's gradient `g W` in FP8, from the FP8 copies of W
    (`rowwise_fp8_copies`); tensors and a dtype only, so that a compiled decoder layer traces it into its graph.
    Nothing of `x` is kept for backward (no weight gradient); the copies of W^T are held on the context, not saved
    as activations (saved-tensor hooks, activation offloading, must not copy them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, row_scales: torch.Tensor, columns: torch.Tensor,
                column_scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.columns, ctx.column_scales, ctx.input_dtype = columns, column_scales, x.dtype
        return scaled_matmul(x, rows, row_scales, out_dtype, fast_accumulation=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = scaled_matmul(grad, ctx.columns, ctx.column_scales, ctx.input_dtype, GRADIENT_FP8_DTYPE)
        return grad_input, None, None, None, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """What `F.linear` would return for `x`: the autocast dtype under autocast, else `x`'s dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Float8FrozenLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight multiplies in FP8 (`convert_frozen_linears_to_fp8` turns a layer into one
    in place; `restore_linears` turns it back). A weight that requires a gradient while gradients are enabled
    takes `F.linear` (it is being trained; FP8 here computes no weight gradient).

    The FP8 copies of the weight are plain tensor attributes (not buffers: not in `state_dict`, not cast by
    `.float()`, not broadcast by DistributedDataParallel), made where `float8_copies_current` finds them stale: by
    the converted decoder's pre-hook (`refresh_float8_copies`) and, for a layer called on its own, by its forward."""

    float8_rows: torch.Tensor | None = None
    float8_row_scales: torch.Tensor | None = None
    float8_columns: torch.Tensor | None = None
    float8_column_scales: torch.Tensor | None = None
    float8_source_dtype: torch.dtype | None = None
    float8_made_from: tuple[int, int] | None = None  # the weight's (data_ptr, _version) when made eagerly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if not self.float8_copies_current():
            self.make_float8_copies()
        out = FrozenFloat8Matmul.apply(x.reshape(-1, self.in_features), self.float8_rows, self.float8_row_scales,
                                       self.float8_columns, self.float8_column_scales, output_dtype(x))
        out = out.reshape(*x.shape[:-1], self.out_features)
        # outside the FP8 GEMM: _scaled_mm takes no bias with a float32 output, and a bias may be trained
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def float8_copies_current(self) -> bool:
        """Whether the FP8 copies stand for the weight as it is now: made from a weight of its device and dtype and,
        run eagerly, of its address and version counter (moved, reassigned, changed in place). Compiled code cannot
        read an address or a version counter; there the device and dtype checks, resolved while tracing and
        guarded, are all, and the graph takes the copies as inputs."""
        weight, rows = self.weight, self.float8_rows
        if rows is None or rows.device != weight.device or self.float8_source_dtype != weight.dtype:
            return False
        return torch.compiler.is_compiling() or self.float8_made_from == (weight.data_ptr(), weight._version)

    def make_float8_copies(self) -> None:
        weight = self.weight
        self.float8_rows, self.float8_row_scales, self.float8_columns, self.float8_column_scales = (
            rowwise_fp8_copies(weight))
        self.float8_source_dtype = weight.dtype
        # made inside a compiled graph: the next eager forward makes them again, once, to record the address
        self.float8_made_from = None if torch.compiler.is_compiling() else (weight.data_ptr(), weight._version)
        if not torch.compiler.is_compiling():
            # CUDA graphs of a compiled layer (torch_compile_mode: reduce-overhead) then read the copies where they
            # are, as they do parameters, instead of copying 2 bytes a weight into the graph's buffers every replay
            for copy in (self.float8_rows, self.float8_row_scales, self.float8_columns, self.float8_column_scales):
                torch._dynamo.mark_static_address(copy)

    def drop_float8_copies(self) -> None:
        for name in ("float8_rows", "float8_row_scales", "float8_columns", "float8_column_scales",
                     "float8_source_dtype", "float8_made_from"):
            self.__dict__.pop(name, None)


@dataclass
class Float8Conversion:
    """What `convert_frozen_linears_to_fp8` did: the layers now in FP8 and those left as they were, with why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (the language model of a LLaVA model), PEFT-wrapped or not."""
    decoder = decoder_stack(model)
    if decoder is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise MiLoRAError(f"fp8_base: {type(base).__name__} has no decoder (get_decoder) whose layers could run in "
                          "FP8; it converts causal LMs and LLaVA models")
    return decoder


@torch.compiler.disable
def refresh_float8_copies(decoder: nn.Module, *_) -> None:
    """Forward pre-hook of a converted decoder: before its layers run, the FP8 copies of its frozen weights made
    again where stale, eagerly. Compiled layers then find them current: compiled code cannot see a weight changed
    in place, and making them there is a side effect (refused inside a checkpointed region)."""
    for module in decoder.modules():
        if isinstance(module, Float8FrozenLinear) and not module.weight.requires_grad:
            if not module.float8_copies_current():
                module.make_float8_copies()


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
    decoder = decoder_of(model)
    inside_decoder = {id(module) for module in decoder.modules()}
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
    if getattr(decoder, "float8_copies_hook", None) is None:
        decoder.float8_copies_hook = decoder.register_forward_pre_hook(refresh_float8_copies)
    logger.info("fp8_base: %d frozen linear layers compute in FP8 (%d skipped)", len(done.converted),
                len(done.skipped))
    return done


def restore_linears(model: nn.Module) -> int:
    """Turn every `Float8FrozenLinear` in `model` back into the `nn.Linear` it was (its weight never changed);
    returns how many. Call it before merging adapters in memory or training the base weights."""
    restored = 0
    for module in model.modules():
        hook = module.__dict__.pop("float8_copies_hook", None)
        if hook is not None:
            hook.remove()
        if isinstance(module, Float8FrozenLinear):
            module.drop_float8_copies()
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
