"""Attention over the engine's slot cache: a transformers attention function driven by a per-forward `StepPlan`.

The engine runs the model's own decoder (`model.get_decoder()`) with ``attn_implementation=ENGINE_ATTENTION`` and
passes a `StepPlan` as the keyword ``milora_step``; transformers hands every keyword down to the attention
function of each layer. The function writes the new keys and values into `SlotCache` (one fixed region of
``max_context`` positions per sequence slot) and attends:

- prefill: the new tokens are whole prompts packed in one row; each attends causally within its own prompt
  (torch's varlen kernel on CUDA, the block-diagonal masked `sdpa` elsewhere: `milora.attention`);
- decode: one token per slot; each attends to the first ``length + 1`` positions of its slot, through `sdpa`
  with a key-length bucket and a padding mask (query heads grouped per key head, so no key is repeated), or,
  where torch's varlen kernel takes a block table, through that kernel reading only the used positions.

Without a ``milora_step`` keyword the call goes to `milora.attention.varlen_attention_forward` (plain `sdpa`
for ordinary batches), so the model stays usable by any other caller.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

ENGINE_ATTENTION = "milora_engine"


class SlotCache:
    """Keys and values of every layer: (slots, max_context, kv_heads, head_dim) each, in the model's dtype."""

    def __init__(self, num_layers: int, slots: int, max_context: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (slots, max_context, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_context = slots, max_context

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepPlan:
    """Where one forward's tokens go and what they attend to.

    write_index: (tokens,) flat position ``slot * max_context + position`` of each new token in the cache.
    Prefill: ``cu_seqlens`` (int32, prompts back to back) and ``max_len``. Decode (one token per slot, all
    slots): ``key_mask`` (slots, 1, 1, key_len), True where a slot's position holds a key, or for the kernel
    path ``seqused`` (slots,) int32 and ``block_table`` (slots, 1) int32.
    """

    cache: SlotCache
    write_index: torch.Tensor
    prefill: bool
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    key_len: int = 0
    key_mask: torch.Tensor | None = None
    seqused: torch.Tensor | None = None
    block_table: torch.Tensor | None = None


def register_engine_attention() -> str:
    """Make ``attn_implementation=ENGINE_ATTENTION`` available to transformers models; returns the name.

    No mask function is registered: transformers then builds no mask (and runs no packed-sequence check, whose
    host synchronisation would break a CUDA graph capture); the `StepPlan` says what each token attends to.
    The engine sets this implementation only while it generates.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION, engine_attention_forward)
    return ENGINE_ATTENTION


@functools.cache
def paged_kernel():
    """torch's varlen kernel when it reads keys through a block table (torch >= 2.12), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"block_table", "seqused_k", "enable_gqa"} <= set(parameters) else None


def decode_kernel_usable(query: torch.Tensor, max_context: int) -> bool:
    from milora.attention import kernel_available

    # FlashAttention's paged path reads pages of a multiple of 256 positions
    return paged_kernel() is not None and kernel_available(query) and max_context % 256 == 0


def _write(cache_tensor: torch.Tensor, index: torch.Tensor, states: torch.Tensor) -> None:
    """states (1, kv_heads, tokens, dim) into the flat (slots * max_context, kv_heads, dim) view at index."""
    flat = cache_tensor.view(-1, cache_tensor.shape[2], cache_tensor.shape[3])
    flat.index_copy_(0, index, states[0].transpose(0, 1).to(flat.dtype))


def _decode_sdpa(query, keys, values, plan: StepPlan, scaling) -> torch.Tensor:
    """query (1, heads, slots, dim) -> (1, slots, heads, dim): each slot's token against its own keys."""
    _, heads, slots, dim = query.shape
    kv_heads = keys.shape[2]
    group = heads // kv_heads
    # (slots, kv_heads, group, dim): the query heads that share a key head act as `group` queries of one position
    q = query[0].transpose(0, 1).reshape(slots, kv_heads, group, dim)
    k = keys[:, : plan.key_len].transpose(1, 2)
    v = values[:, : plan.key_len].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.key_mask, scale=scaling)
    return out.reshape(1, slots, heads, dim)


def _decode_kernel(query, keys, values, plan: StepPlan, scaling) -> torch.Tensor:
    _, heads, slots, dim = query.shape
    q = query[0].transpose(0, 1)  # (slots, heads, dim)
    cu_seq_q = torch.arange(slots + 1, device=q.device, dtype=torch.int32)
    out = paged_kernel()(
        q, keys, values, cu_seq_q, None, 1, keys.shape[1],
        scale=scaling, enable_gqa=heads != keys.shape[2], seqused_k=plan.seqused, block_table=plan.block_table,
    )  # fmt: skip
    return out.reshape(1, slots, heads, dim)


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
    keys, values = plan.cache.keys[module.layer_idx], plan.cache.values[module.layer_idx]
    _write(keys, plan.write_index, key)
    _write(values, plan.write_index, value)
    if plan.prefill:
        from milora.attention import kernel_available, masked_sdpa_attention, varlen_kernel_attention

        if kernel_available(query):
            return varlen_kernel_attention(query, key, value, plan.cu_seqlens, plan.max_len, scaling), None
        return masked_sdpa_attention(module, query, key, value, plan.cu_seqlens, 0.0, scaling), None
    if plan.block_table is not None:
        return _decode_kernel(query, keys, values, plan, scaling), None
    return _decode_sdpa(query, keys, values, plan, scaling), None
