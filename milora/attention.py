"""Variable-length attention for padding-free batches, on torch's own kernel.

A padding-free batch (TRL's `padding_free=True`) is one row holding several sequences back to back; their
boundaries come from `position_ids` (a sequence starts wherever the position does not continue the previous
one) or from the `cu_seq_lens_q` / `max_length_q` keys that TRL's collator adds. `sdpa` runs such a row as one
long sequence under a materialised block-diagonal causal mask; this implementation instead hands the
boundaries to `torch.nn.attention.varlen.varlen_attn` (FlashAttention on CUDA, torch >= 2.10), which attends
within each sequence and builds no mask.

    from milora.attention import VARLEN_ATTENTION, register_varlen_attention
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=VARLEN_ATTENTION)

Everything else goes to transformers' `sdpa` path unchanged: ordinary padded batches (a 2D attention mask),
decoding with a cache, non-causal modules. Where the kernel cannot run (CPU, float32, a head size it does not
support, torch without `varlen_attn`), packed rows fall back to `sdpa` with the block-diagonal causal mask, so
the numbers are the same everywhere and only the speed differs.
"""

from __future__ import annotations

import functools
import inspect

import torch

VARLEN_ATTENTION = "milora_varlen"
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
MAX_KERNEL_HEAD_DIM = 256


def register_varlen_attention() -> str:
    """Make `attn_implementation=VARLEN_ATTENTION` available to every transformers model; returns the name.

    Registers the attention function and a mask function that builds no 4D mask for padding-free batches
    (and the usual `sdpa` mask for padded ones). Calling it again changes nothing.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_attention_mask)
    return VARLEN_ATTENTION


def varlen_attention_mask(*args, attention_mask=None, **kwargs):
    """No mask when the batch has no padding mask (padding-free or unpadded rows); `sdpa`'s mask otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch_size: int = 1) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths (int32, starting at 0) and the longest length, over all rows flattened.

    A sequence starts at the beginning of each row and wherever a position is not the previous one plus 1
    (the rule transformers uses to detect packed rows), so restarts at 0 or at any other value both count.
    """
    positions = position_ids.reshape(position_ids.shape[0], -1)
    if positions.shape[0] != batch_size:
        positions = positions.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    flat_starts = starts.flatten()
    start_index = flat_starts.nonzero().flatten()
    total = torch.tensor([flat_starts.numel()], device=start_index.device, dtype=start_index.dtype)
    cu_seqlens = torch.cat([start_index, total]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


_last_boundaries: tuple | None = None  # (position_ids tensor, (cu_seqlens, max_len)): every layer sees the same ids


def _cached_cu_seqlens(position_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    # one host sync per forward instead of one per layer; read and replaced as one tuple, so replicas running
    # in threads (nn.DataParallel) never mix one batch's ids with another's boundaries
    global _last_boundaries
    cached = _last_boundaries
    if cached is not None and cached[0] is position_ids:
        return cached[1]
    boundaries = cu_seqlens_from_position_ids(position_ids, batch_size)
    _last_boundaries = (position_ids, boundaries)
    return boundaries


PACKED_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _boundaries_beside_layers(decoder, args, kwargs):
    """Forward pre-hook of a decoder (`keep_boundaries_out_of_layers`): the packed row's boundaries go to the
    attention through the position-ids cache, and the layers are called without them."""
    global _last_boundaries
    position_ids, cu_seqlens, max_len = (kwargs.get(key) for key in ("position_ids", "cu_seq_lens_q", "max_length_q"))
    if position_ids is None or cu_seqlens is None or max_len is None or position_ids.shape[0] != 1:
        return None
    _last_boundaries = (position_ids, (cu_seqlens.to(device=position_ids.device, dtype=torch.int32), int(max_len)))
    return args, {key: value for key, value in kwargs.items() if key not in PACKED_BOUNDARY_KEYS}


def keep_boundaries_out_of_layers(decoder: torch.nn.Module) -> bool:
    """For compiled decoder layers (`milora.regional_compile`): the boundaries of a padding-free batch that TRL's
    collator passes (`cu_seq_lens_q`, `max_length_q`, ...) reach this module's attention through its position-ids
    cache instead of as arguments of every layer of `decoder`. As arguments, their length (the batch's number of
    sequences) and its longest sequence change from batch to batch: each change was a recompilation at the start,
    and with CUDA graphs (`torch_compile_mode: reduce-overhead`) a new recording. Whether a hook was added: only a
    decoder whose attention is `VARLEN_ATTENTION` reads the cache (transformers' flash attention reads the
    arguments)."""
    if getattr(getattr(decoder, "config", None), "_attn_implementation", None) != VARLEN_ATTENTION:
        return False
    if getattr(decoder, "packed_boundaries_hook", None) is None:
        decoder.packed_boundaries_hook = decoder.register_forward_pre_hook(_boundaries_beside_layers, with_kwargs=True)
    return True


def packed_boundaries(query, key, attention_mask, module, kwargs) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_len) of the flattened batch when this call can run as varlen attention, else None."""
    if attention_mask is not None or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True):
        return None
    batch_size = query.shape[0]
    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    # self-attention over the same tokens (checked above): the key boundaries are the query boundaries
    if batch_size == 1 and cu_seq_lens_q is not None and kwargs.get("max_length_q") is not None:
        return cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(kwargs["max_length_q"])
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    return _cached_cu_seqlens(position_ids, batch_size)


@functools.cache
def _varlen_kernel():
    """torch's `varlen_attn` and how to ask it for causal attention in this torch version, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    # torch 2.10 takes is_causal=True; later versions express causality as window_size=(-1, 0)
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return varlen_attn, causal, "scale" in parameters, "enable_gqa" in parameters


def kernel_available(query: torch.Tensor) -> bool:
    """Whether the varlen kernel can run on these tensors (CUDA, bf16/fp16, a supported head size)."""
    head_dim = query.shape[-1]
    flash = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    return (
        query.is_cuda
        and query.dtype in KERNEL_DTYPES
        and head_dim <= MAX_KERNEL_HEAD_DIM
        and head_dim % 8 == 0
        and _varlen_kernel() is not None
        and flash()
    )


def _flatten_tokens(states: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) -> (batch * seq, heads, dim); a view for transformers' usual layouts."""
    batch, heads, seq, dim = states.shape
    return states.transpose(1, 2).reshape(batch * seq, heads, dim)


def varlen_kernel_attention(query, key, value, cu_seqlens, max_len, scaling) -> torch.Tensor:
    """Causal attention within each sequence by torch's varlen kernel; (batch, seq, heads, dim) out."""
    varlen_attn, causal, takes_scale, takes_gqa = _varlen_kernel()
    batch, heads, seq, dim = query.shape
    q, k, v = _flatten_tokens(query), _flatten_tokens(key), _flatten_tokens(value)
    n_rep = heads // k.shape[1]
    options = dict(causal)
    if n_rep > 1 and takes_gqa:
        options["enable_gqa"] = True
    elif n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if scaling is not None and takes_scale:
        options["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * dim**0.5)  # the kernel's default scale is dim**-0.5
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)
    return out.reshape(batch, seq, heads, dim)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, 1, total, total) boolean mask: token i sees token j iff same sequence and j <= i."""
    lengths = cu_seqlens.diff().long()
    sequence_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    same = sequence_of[:, None] == sequence_of[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (same & causal)[None, None]


def masked_sdpa_attention(module, query, key, value, cu_seqlens, dropout, scaling) -> torch.Tensor:
    """The same attention through `sdpa` with a materialised block-diagonal causal mask (the fallback)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, seq, dim = query.shape

    def one_row(states):  # (batch, heads, seq, dim) -> (1, heads, batch * seq, dim)
        return _flatten_tokens(states).transpose(0, 1).unsqueeze(0)

    mask = block_causal_mask(cu_seqlens.to(query.device), batch * seq)
    out, _ = sdpa_attention_forward(
        module, one_row(query), one_row(key), one_row(value), mask, dropout=dropout, scaling=scaling, is_causal=False
    )
    return out.reshape(batch, seq, heads, dim)


# Eager inside `torch.compile`d decoder layers (milora.regional_compile): the boundaries come from a host-side
# cache and the kernel takes a Python int, neither of which a graph can hold; the layer's GEMMs and elementwise
# work around it still compile.
@torch.compiler.disable
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (batch, heads, seq, dim) in, ((batch, seq, heads, dim), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    boundaries = None if is_causal is False else packed_boundaries(query, key, attention_mask, module, kwargs)
    if boundaries is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    cu_seqlens, max_len = boundaries
    if kernel_available(query):
        if dropout > 0:
            raise ValueError(
                f"attention dropout {dropout} is not supported by the varlen kernel; set the model config's "
                f"attention_dropout to 0 or use attn_implementation='sdpa'"
            )
        return varlen_kernel_attention(query, key, value, cu_seqlens, max_len, scaling), None
    return masked_sdpa_attention(module, query, key, value, cu_seqlens, dropout, scaling), None
