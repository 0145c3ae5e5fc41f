"""Attention over the engine's slot cache: a transformers attention function driven by a per-forward `StepPlan`.

The engine runs the model's own decoder (`model.get_decoder()`) with ``attn_implementation=ENGINE_ATTENTION`` and
passes a `StepPlan` as the keyword ``milora_step``; transformers hands every keyword down to the attention
function of each layer. The function writes the new keys and values into `SlotCache` (one fixed region of
``max_context`` positions per sequence slot) and attends:

- prefill: the new tokens are whole prompts packed in one row; each attends causally within its own prompt
  (torch's varlen kernel on CUDA, the block-diagonal masked `sdpa` elsewhere: `milora.attention`);
- decode: one token per slot; each attends to the first ``length + 1`` positions of its slot. On CUDA in half
  precision ("flash") torch's flash kernel reads exactly those positions (``seqused_k``), so one CUDA graph
  serves every step; elsewhere (or by choice) `sdpa` or two matrix products read a key-length bucket of every
  slot under a padding mask (query heads grouped per key head, so no key is repeated).

Without a ``milora_step`` keyword the call goes to `milora.attention.varlen_attention_forward` (plain `sdpa`
for ordinary batches), so the model stays usable by any other caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENGINE_ATTENTION = "milora_engine"


DECODE_ATTENTION = ("flash", "sdpa", "matmul")


class SlotCache:
    """Keys and values of every layer, each one tensor (layers, slots, max_context, kv_heads, head_dim) in the
    model's dtype: a slot's positions back to back, as a packed (varlen) attention kernel reads them.

    Code outside this class reaches the cache through its methods only, so the layout can change in one place.
    """

    def __init__(self, num_layers: int, slots: int, max_context: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, slots, max_context, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_context = slots, max_context

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, key, value) -> None:
        """key, value (1, kv_heads, tokens, dim) to their (slot, position) of `layer`."""
        for cache, states in ((self.keys[layer], key), (self.values[layer], value)):
            cache.index_put_((slots, positions), states[0].transpose(0, 1).to(cache.dtype))

    def head_major(self, layer: int, key_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (slots, kv_heads, key_len, dim) of the first `key_len` positions of every slot."""
        return (
            self.keys[layer, :, :key_len].transpose(1, 2),
            self.values[layer, :, :key_len].transpose(1, 2),
        )

    def packed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (slots * max_context, kv_heads, dim): slot s holds rows [s * max_context, (s + 1) * max_context)."""
        rows = self.slots * self.max_context
        return (
            self.keys[layer].view(rows, *self.keys.shape[-2:]),
            self.values[layer].view(rows, *self.values.shape[-2:]),
        )


@dataclass
class StepPlan:
    """Where one forward's tokens go and what they attend to.

    write_slot, write_position: (tokens,) where each new token's key and value go in the cache.
    Prefill: ``cu_seqlens`` (int32, prompts back to back) and ``max_len``. Decode (one token per slot, all
    slots), by ``decode_attention`` (`DECODE_ATTENTION`): "flash" reads each slot's first ``key_counts[s]``
    positions (int32, (slots,)) through the packed flash kernel; "sdpa" and "matmul" read ``key_len`` positions
    of every slot with ``key_mask`` (slots, 1, 1, key_len), True where a slot's position holds a key.
    """

    cache: SlotCache
    write_slot: torch.Tensor
    write_position: torch.Tensor
    prefill: bool
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    key_len: int = 0
    key_mask: torch.Tensor | None = None
    key_counts: torch.Tensor | None = None
    slot_starts: torch.Tensor | None = None
    decode_attention: str = "sdpa"


def register_engine_attention() -> str:
    """Make ``attn_implementation=ENGINE_ATTENTION`` available to transformers models; returns the name.

    No mask function is registered: transformers then builds no mask (and runs no packed-sequence check, whose
    host synchronisation would break a CUDA graph capture); the `StepPlan` says what each token attends to.
    The engine sets this implementation only while it generates.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION, engine_attention_forward)
    return ENGINE_ATTENTION


def flash_decode_available(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether decode steps can use the packed flash kernel with per-slot key counts (CUDA, bf16/fp16, a
    torch whose ``_flash_attention_forward`` takes ``seqused_k``)."""
    if not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16) or head_dim % 8 or head_dim > 256:
        return False
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)():
        return False
    schema = torch.ops.aten._flash_attention_forward.default._schema
    return any(argument.name == "seqused_k" for argument in schema.arguments)


def _decode_flash(query, layer: int, plan: StepPlan, scaling) -> torch.Tensor:
    """query (1, heads, slots, dim) -> (1, slots, heads, dim), each slot's token against its first key_counts
    positions: the kernel reads those and no more (grouped query heads natively)."""
    _, heads, slots, dim = query.shape
    keys, values = plan.cache.packed(layer)
    q = query[0].transpose(0, 1)  # (slots, heads, dim): one query per slot
    out = torch.ops.aten._flash_attention_forward(
        q, keys, values, plan.cu_seqlens, plan.slot_starts, 1, plan.cache.max_context, 0.0, False, False,
        scale=scaling, seqused_k=plan.key_counts,
    )[0]  # fmt: skip
    return out.view(1, slots, heads, dim)


def _decode_sdpa(query, layer: int, plan: StepPlan, scaling) -> torch.Tensor:
    """query (1, heads, slots, dim) -> (1, slots, heads, dim): each slot's token against its own keys."""
    _, heads, slots, dim = query.shape
    keys, values = plan.cache.head_major(layer, plan.key_len)
    kv_heads = keys.shape[1]
    # (slots, kv_heads, group, dim): the query heads that share a key head act as `group` queries of one position
    q = query[0].transpose(0, 1).reshape(slots, kv_heads, heads // kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=plan.key_mask, scale=scaling)
    return out.reshape(1, slots, heads, dim)


def _decode_matmul(query, layer: int, plan: StepPlan, scaling) -> torch.Tensor:
    """As `_decode_sdpa`, by two batched matrix products and a float32 softmax (transformers' eager
    attention)."""
    _, heads, slots, dim = query.shape
    keys, values = plan.cache.head_major(layer, plan.key_len)
    q = query[0].transpose(0, 1).reshape(slots, keys.shape[1], heads // keys.shape[1], dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * (dim**-0.5 if scaling is None else scaling)
    scores = scores.masked_fill(~plan.key_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
    return out.reshape(1, slots, heads, dim)


DECODERS = {"flash": _decode_flash, "sdpa": _decode_sdpa, "matmul": _decode_matmul}


@torch.compiler.disable  # compiled decoder layers (`EngineConfig.compile`) call it eagerly: cache writes, kernels
def engine_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (1, heads, tokens, dim) in, ((1, tokens, heads, dim), None) out."""
    plan: StepPlan | None = kwargs.pop("milora_step", None)
    if plan is None:
        from milora.attention import varlen_attention_forward

        return varlen_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    plan.cache.write(module.layer_idx, plan.write_slot, plan.write_position, key, value)
    if plan.prefill:
        from milora.attention import kernel_available, masked_sdpa_attention, varlen_kernel_attention

        if kernel_available(query):
            return varlen_kernel_attention(query, key, value, plan.cu_seqlens, plan.max_len, scaling), None
        return masked_sdpa_attention(module, query, key, value, plan.cu_seqlens, 0.0, scaling), None
    return DECODERS[plan.decode_attention](query, module.layer_idx, plan, scaling), None
