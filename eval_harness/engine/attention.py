"""Attention over the engine's slot cache: a transformers attention function driven by a per-forward `StepPlan`.

The engine runs the model's own decoder (`model.get_decoder()`) with ``attn_implementation=ENGINE_ATTENTION`` and
passes a `StepPlan` as the keyword ``milora_step``; transformers hands every keyword down to the attention
function of each layer. The function writes the new keys and values into `SlotCache` (one fixed region of
``max_context`` positions per sequence slot) and attends:

- prefill: the new tokens are whole prompts packed in one row; each attends causally within its own prompt
  (torch's varlen kernel on CUDA, the block-diagonal masked `sdpa` elsewhere: `milora.attention`);
- decode: one token per slot; each attends to the first ``length + 1`` positions of its slot: on CUDA through
  torch's varlen kernel, which reads only those positions (`decode_key_boundaries`), elsewhere through `sdpa`
  with a key-length bucket and a padding mask (query heads grouped per key head, so no key is repeated).

Without a ``milora_step`` keyword the call goes to `milora.attention.varlen_attention_forward` (plain `sdpa`
for ordinary batches), so the model stays usable by any other caller.
"""

from __future__ import annotations

import functools
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
    slots): for the varlen kernel ``cu_seqlens`` (queries) and ``key_cu_seqlens`` (`decode_key_boundaries`),
    else ``key_mask`` (slots, 1, 1, key_len), True where a slot's position holds a key.
    """

    cache: SlotCache
    write_index: torch.Tensor
    prefill: bool
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    key_len: int = 0
    key_mask: torch.Tensor | None = None
    key_cu_seqlens: torch.Tensor | None = None


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
def _kernel_takes_grouped_heads(device: str) -> bool:
    """Whether torch's varlen kernel accepts fewer key heads than query heads (grouped-query attention)."""
    from milora.attention import _varlen_kernel

    varlen_attn, _, _, takes_gqa = _varlen_kernel()
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16, device=device)
    kv = torch.zeros(2, 2, 64, dtype=torch.bfloat16, device=device)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    try:
        varlen_attn(q, kv, kv, cu, cu, 2, 2, **({"enable_gqa": True} if takes_gqa else {}))
    except (RuntimeError, ValueError):
        return False
    return True


def decode_kernel_usable(query: torch.Tensor, kv_heads: int) -> bool:
    """Whether decode steps can run on torch's varlen kernel (CUDA, half precision, a supported head size;
    for grouped-query models, a kernel that takes the key heads as they are)."""
    from milora.attention import kernel_available

    if not kernel_available(query):
        return False
    return query.shape[1] == kv_heads or _kernel_takes_grouped_heads(str(query.device))


def decode_key_boundaries(slot_starts: torch.Tensor, used: torch.Tensor, end: int) -> torch.Tensor:
    """Cumulative key boundaries for one decode step on the varlen kernel: slot i's used keys
    ``[start_i, start_i + used_i)`` as sequence 2i and the unused rest of its region as sequence 2i + 1, which
    has no query (`decode_query_boundaries`): every key range is contiguous, and only used keys are read."""
    pairs = torch.stack([slot_starts, slot_starts + used], dim=1).flatten()
    return torch.cat([pairs, pairs.new_full((1,), end)]).to(torch.int32)


def decode_query_boundaries(slots: int, device) -> torch.Tensor:
    """[0, 1, 1, 2, 2, ..., slots, slots]: one query for sequence 2i (slot i), none for 2i + 1."""
    counts = torch.arange(1, slots + 1, device=device).repeat_interleave(2)
    return torch.cat([counts.new_zeros(1), counts]).to(torch.int32)


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
    """query (1, heads, slots, dim) -> (1, slots, heads, dim) through torch's varlen kernel."""
    from milora.attention import _varlen_kernel

    varlen_attn, _, takes_scale, takes_gqa = _varlen_kernel()
    _, heads, slots, dim = query.shape
    q = query[0].transpose(0, 1)  # (slots, heads, dim)
    if scaling is not None and not takes_scale:
        q = q * (scaling * dim**0.5)
    options = {"scale": scaling} if scaling is not None and takes_scale else {}
    if takes_gqa and heads != keys.shape[2]:
        options["enable_gqa"] = True
    flat_keys = keys.view(-1, keys.shape[2], dim)
    flat_values = values.view(-1, values.shape[2], dim)
    out = varlen_attn(
        q, flat_keys, flat_values, plan.cu_seqlens, plan.key_cu_seqlens, 1, plan.cache.max_context, **options
    )
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
    if plan.key_cu_seqlens is not None:
        return _decode_kernel(query, keys, values, plan, scaling), None
    return _decode_sdpa(query, keys, values, plan, scaling), None
