"""Model FLOPs and MFU of LoRA training steps (frozen base, trainable adapters), from the model and the batch.

Per optimizer step, over the real (non-padding) tokens of the batch, T = sum of the sequence lengths L_i:

    FLOPs = 4 * N_frozen * T            frozen matmul weights: forward 2NT + activation gradients 2NT
                                        (no weight gradients: the base is frozen)
          + 6 * N_trainable * T         adapter matmuls: forward, activation and weight gradients
          + 12 * n_layers * d_attn * sum_i L_i (L_i + 1) / 2
                                        causal attention: QK^T and AV over the L(L+1)/2 visible pairs
                                        (2 * 2 * d_attn FLOPs per pair forward), backward twice the forward

N counts the weights of every linear layer (attention, MLP, LM head), not the embedding lookup;
d_attn = heads * head_dim. These are "model FLOPs": padding, the recomputation of gradient checkpointing
(another forward, ~2NT) and elementwise work are not counted, so variants with and without checkpointing are
compared on the same useful work. MFU = FLOPs / step time / peak; the peak is the GPU's dense bf16 rate
(989 TFLOP/s for H100 and H200 SXM).
"""

from __future__ import annotations

import torch

H100_H200_DENSE_BF16_FLOPS = 989e12


def linear_weight_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) numbers of weights in the model's linear layers (LoRA A/B are trainable linears)."""
    frozen = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            # a 4-bit layer's weight is packed (two values a byte): count the matrix it stands for
            count = module.in_features * module.out_features if hasattr(module.weight, "quant_state") else (
                module.weight.numel())
            if module.weight.requires_grad:
                trainable += count
            else:
                frozen += count
    return frozen, trainable


def attention_width(config) -> tuple[int, int]:
    """(n_layers, heads * head_dim) of a decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_attention_heads * head_dim


def step_flops(lengths: list[int], frozen: int, trainable: int, n_layers: int, d_attn: int) -> float:
    """Model FLOPs of one training step over sequences of these lengths (formula in the module docstring)."""
    tokens = sum(lengths)
    causal_pairs = sum(n * (n + 1) // 2 for n in lengths)
    return 4.0 * frozen * tokens + 6.0 * trainable * tokens + 12.0 * n_layers * d_attn * causal_pairs


def mfu(flops: float, seconds: float, peak_flops: float = H100_H200_DENSE_BF16_FLOPS) -> float:
    return flops / seconds / peak_flops
