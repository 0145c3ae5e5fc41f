"""Attention over the engine's slot cache: a transformers attention function driven by a per-forward `StepPlan`.

The engine runs the model's own decoder (`model.get_decoder()`) with ``attn_implementation=ENGINE_ATTENTION`` and
passes a `StepPlan` as the keyword ``milora_step``; transformers hands every keyword down to the attention
function of each layer. The function writes the new keys and values into `SlotCache` (one fixed region of
``max_context`` positions per sequence slot) and attends:

- prefill: the new tokens are whole prompts packed in one row; each attends causally within its own prompt
  (torch's varlen kernel on CUDA, the block-diagonal masked `sdpa` elsewhere: `milora.attention`);
- decode: one token per slot; each attends to the first ``length + 1`` positions of its slot: `sdpa` (or two
  matrix products) over a key-length bucket of every slot under a padding mask (query heads grouped per key
  head, so no key is repeated). torch's packed flash kernel with per-slot key counts (``seqused_k``) reads
  fewer keys but was slower (15.8 against 11.6 ms a step at LLaMA-2-7B shapes, 128 slots): its packed path
  gives each one-token query a full tile of query rows.

Without a ``milora_step`` keyword the call goes to `milora.attention.varlen_attention_forward` (plain `sdpa`
for ordinary batches), so the model stays usable by any other caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENGINE_ATTENTION = "milora_engine"


DECODE_ATTENTION = ("sdpa", "matmul")


class SlotCache:
    """Keys and values of every layer, each one tensor (layers, slots, max_context, kv_heads, head_dim) in the
    model's dtype (one tensor, so that moving a slot's positions is one indexing operation for all layers).

    Code outside this class reaches the cache through its methods only, so the layout can change in one place.
    """

    def __init__(self, num_layers: int, slots: int, max_context: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, slots, max_context, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_context = slots, max_context

    def copy_positions(self, src_slots, dst_slots, start, stop) -> None:
        """Keys and values of positions ``start[i] <= p < stop[i]`` of slot ``src_slots[i]`` into the same
        positions of slot ``dst_slots[i]``, in every layer (one indexed copy each for keys and values).
        Arguments are int sequences or tensors of one length; a slot may be a source and a destination in one
        call (all sources are read before anything is written)."""
        device = self.keys.device
        src, dst, first, last = (
            torch.as_tensor(x, dtype=torch.long).to(device) for x in (src_slots, dst_slots, start, stop)
        )
        counts = (last - first).clamp(min=0)
        total = int(counts.sum())
        if not total:
            return
        offsets = counts.cumsum(0) - counts  # where each pair's run begins among all copied positions
        positions = torch.arange(total, device=device) - (offsets - first).repeat_interleave(counts)
        src, dst = src.repeat_interleave(counts), dst.repeat_interleave(counts)
        for cache in (self.keys, self.values):
            cache[:, dst, positions] = cache[:, src, positions]

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


DECODERS = {"sdpa": _decode_sdpa, "matmul": _decode_matmul}


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
