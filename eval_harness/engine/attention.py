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

from dataclasses import dataclass

import torch

ENGINE_ATTENTION = "milora_engine"


DECODE_ATTENTION = ("sdpa", "matmul")


class SlotCache:
    """Keys and values of every layer: (slots, kv_heads, max_context, head_dim) each, in the model's dtype.

    Head-major within a slot, so that the first L positions of every (slot, head) pair form one strided batch
    of (L, head_dim) matrices: batched matrix products read them in place, without a copy.
    """

    def __init__(self, num_layers: int, slots: int, max_context: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_context = slots, max_context

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StepPlan:
    """Where one forward's tokens go and what they attend to.

    write_slot, write_position: (tokens,) where each new token's key and value go in the cache.
    Prefill: ``cu_seqlens`` (int32, prompts back to back) and ``max_len``. Decode (one token per slot, all
    slots): ``key_mask`` (slots, 1, 1, key_len), True where a slot's position holds a key, and which
    ``decode_attention`` reads the keys ("sdpa" or "matmul", `DECODE_ATTENTION`).
    """

    cache: SlotCache
    write_slot: torch.Tensor
    write_position: torch.Tensor
    prefill: bool
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    key_len: int = 0
    key_mask: torch.Tensor | None = None
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


def _write(cache_tensor: torch.Tensor, plan: StepPlan, states: torch.Tensor) -> None:
    """states (1, kv_heads, tokens, dim) to their (slot, position) in the cache."""
    by_position = cache_tensor.transpose(1, 2)  # (slots, max_context, kv_heads, dim), a view
    by_position.index_put_((plan.write_slot, plan.write_position), states[0].transpose(0, 1).to(cache_tensor.dtype))


def _decode_sdpa(query, keys, values, plan: StepPlan, scaling) -> torch.Tensor:
    """query (1, heads, slots, dim) -> (1, slots, heads, dim): each slot's token against its own keys."""
    _, heads, slots, dim = query.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # (slots, kv_heads, group, dim): the query heads that share a key head act as `group` queries of one position
    q = query[0].transpose(0, 1).reshape(slots, kv_heads, group, dim)
    k, v = keys[:, :, : plan.key_len], values[:, :, : plan.key_len]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=plan.key_mask, scale=scaling)
    return out.reshape(1, slots, heads, dim)


def _decode_matmul(query, keys, values, plan: StepPlan, scaling) -> torch.Tensor:
    """As `_decode_sdpa`, by two batched matrix products and a float32 softmax (transformers' eager
    attention): for one query per slot these read the keys and values once, at the memory's speed."""
    _, heads, slots, dim = query.shape
    kv_heads = keys.shape[1]
    q = query[0].transpose(0, 1).reshape(slots, kv_heads, heads // kv_heads, dim)
    k, v = keys[:, :, : plan.key_len], values[:, :, : plan.key_len]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (dim**-0.5 if scaling is None else scaling)
    scores = scores.masked_fill(~plan.key_mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
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
    _write(keys, plan, key)
    _write(values, plan, value)
    if plan.prefill:
        from milora.attention import kernel_available, masked_sdpa_attention, varlen_kernel_attention

        if kernel_available(query):
            return varlen_kernel_attention(query, key, value, plan.cu_seqlens, plan.max_len, scaling), None
        return masked_sdpa_attention(module, query, key, value, plan.cu_seqlens, 0.0, scaling), None
    decode = _decode_matmul if plan.decode_attention == "matmul" else _decode_sdpa
    return decode(query, keys, values, plan, scaling), None
