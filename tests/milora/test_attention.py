"""milora.attention: padding-free batches through the varlen implementation give the padded `sdpa` results.

On CPU the registered implementation runs its `sdpa` fallback (block-diagonal mask); the kernel's glue
(flattening, GQA, scale) is checked against a per-sequence reference; the CUDA test runs torch's real kernel.
"""

import pytest
import torch
import torch.nn.functional as F

from milora import attention
from milora.attention import (
    VARLEN_ATTENTION,
    block_causal_mask,
    cu_seqlens_from_position_ids,
    register_varlen_attention,
    varlen_kernel_attention,
)
from milora.tiny import tiny_model

LENGTHS = [5, 1, 9, 3]  # includes a length-1 sequence


def _cu(lengths):
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


@pytest.mark.parametrize(
    ("position_ids", "batch_size", "expected", "longest"),
    [
        ([[0, 1, 2, 3]], 1, [0, 4], 4),  # a single sequence
        ([[0, 0, 0]], 1, [0, 1, 2, 3], 1),  # length-1 sequences
        ([[0, 1, 2, 0, 1, 5, 6]], 1, [0, 3, 5, 7], 3),  # restarts at 0 and at another value
        ([[0, 1, 2], [0, 1, 2]], 2, [0, 3, 6], 3),  # each row starts a sequence
        ([[0, 1]], 3, [0, 2, 4, 6], 2),  # (1, seq) position ids shared by a batch of 3 rows
        ([[3, 4, 5, 0]], 1, [0, 3, 4], 3),  # positions need not start at 0
    ],
)
def test_cu_seqlens_from_position_ids(position_ids, batch_size, expected, longest):
    cu_seqlens, max_len = cu_seqlens_from_position_ids(torch.tensor(position_ids), batch_size)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == expected
    assert max_len == longest


def test_block_causal_mask_matches_per_sequence_masks():
    mask = block_causal_mask(torch.tensor(_cu([2, 1, 3]), dtype=torch.int32), 6)[0, 0]
    expected = torch.block_diag(*[torch.ones(n, n).tril() for n in (2, 1, 3)]).bool()
    assert torch.equal(mask, expected)


def _rows(vocab, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def padded_batch(rows):
    """Right-padded rows with a 2D attention mask; pad labels are -100."""
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], attention_mask[i, : len(row)] = row, 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(rows, with_cu_seqlens):
    """One row of all sequences, as TRL's padding-free collator builds it (first token of each sequence -100)."""
    input_ids = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    if with_cu_seqlens:
        cu_seqlens = torch.tensor(_cu([len(r) for r in rows]), dtype=torch.int32)
        batch |= {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
                  "max_length_q": max(map(len, rows)), "max_length_k": max(map(len, rows))}
    return batch


def loss_and_grads(model, batch, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("with_cu_seqlens", [False, True])
def test_packed_batch_equals_padded_sdpa(kind, with_cu_seqlens):
    register_varlen_attention()
    model = tiny_model(kind).train()
    rows = _rows(model.config.vocab_size, LENGTHS)
    ref_loss, ref_grads = loss_and_grads(model, padded_batch(rows), "sdpa")
    loss, grads = loss_and_grads(model, packed_batch(rows, with_cu_seqlens), VARLEN_ATTENTION)

    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batch_through_varlen_equals_sdpa():
    register_varlen_attention()
    model = tiny_model("llama").eval()
    batch = padded_batch(_rows(model.config.vocab_size, LENGTHS, seed=1))
    model.set_attn_implementation("sdpa")
    ref = model(**batch).logits
    model.set_attn_implementation(VARLEN_ATTENTION)
    out = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)


def test_register_is_idempotent_and_loads_by_name():
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register_varlen_attention() == register_varlen_attention() == VARLEN_ATTENTION
    assert ALL_ATTENTION_FUNCTIONS[VARLEN_ATTENTION] is attention.varlen_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[VARLEN_ATTENTION] is attention.varlen_attention_mask
    model = AutoModelForCausalLM.from_config(tiny_model("llama").config, attn_implementation=VARLEN_ATTENTION)
    assert model.config._attn_implementation == VARLEN_ATTENTION


def per_sequence_reference(q, k, v, cu_seqlens, cu_seqlens_k, max_q, max_k, *, window_size=(-1, -1),
                           enable_gqa=False, scale=None, is_causal=False):
    """Stand-in for torch's varlen kernel with its (tokens, heads, dim) contract, one sequence at a time."""
    assert window_size == (-1, 0) or is_causal
    assert torch.equal(cu_seqlens, cu_seqlens_k) and max_q == max_k == int(cu_seqlens.diff().max())
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "the glue must ask for GQA or expand the key/value heads"
    outs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        seq = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, len, dim)
        outs.append(F.scaled_dot_product_attention(*seq, is_causal=True, scale=scale,
                                                   enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("kernel_takes", [("window_size", True, True), ("is_causal", False, False)])
def test_kernel_glue_matches_sdpa_fallback(monkeypatch, kernel_takes):
    """Flattening, GQA (kernel option or expanded heads), scale (option or pre-scaled query) for both torch APIs."""
    causal_key, takes_scale, takes_gqa = kernel_takes
    causal = {"window_size": (-1, 0)} if causal_key == "window_size" else {"is_causal": True}
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (per_sequence_reference, causal, takes_scale, takes_gqa))
    generator = torch.Generator().manual_seed(0)
    total, heads, kv_heads, dim = sum(LENGTHS), 4, 2, 16
    query = torch.randn(1, heads, total, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, total, dim, generator=generator) for _ in range(2))
    cu_seqlens = torch.tensor(_cu(LENGTHS), dtype=torch.int32)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True

    out = varlen_kernel_attention(query, key, value, cu_seqlens, max(LENGTHS), scaling=0.3)
    ref = attention.masked_sdpa_attention(module, query, key, value, cu_seqlens, dropout=0.0, scaling=0.3)
    assert out.shape == (1, total, heads, dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dropout_on_the_kernel_path_is_refused(monkeypatch):
    monkeypatch.setattr(attention, "kernel_available", lambda query: True)
    query = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="attention_dropout"):
        attention.varlen_attention_forward(module, query, query, query, None, dropout=0.1,
                                           position_ids=torch.tensor([[0, 1, 0, 1]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen kernel)")
@pytest.mark.parametrize("with_cu_seqlens", [False, True])
def test_cuda_varlen_kernel_equals_padded_sdpa_bf16(with_cu_seqlens):
    from transformers import LlamaConfig, LlamaForCausalLM

    register_varlen_attention()
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # head_dim 128, GQA
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    rows = _rows(config.vocab_size, [37, 1, 120, 64, 5])
    query = torch.empty(1, 4, 1, 128, device="cuda", dtype=torch.bfloat16)
    assert attention.kernel_available(query), "the kernel path must run on this GPU"

    def on_cuda(batch):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    ref_loss, ref_grads = loss_and_grads(model, on_cuda(padded_batch(rows)), "sdpa")
    loss, grads = loss_and_grads(model, on_cuda(packed_batch(rows, with_cu_seqlens)), VARLEN_ATTENTION)
    assert abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)) < 1e-2
    flat = torch.cat([g.float().flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].float().flatten() for n in grads])
    assert float((flat - ref_flat).norm() / ref_flat.norm()) < 1e-2
    for name, grad in grads.items():
        rel = float((grad.float() - ref_grads[name].float()).norm() / ref_grads[name].float().norm())
        assert rel < 3e-2, f"{name}: relative gradient error {rel:.2e}"


def test_load_model_registers_and_selects_varlen_attention():
    from milora.loading import load_model

    model = load_model("tiny:llama", attn_implementation=VARLEN_ATTENTION)
    assert model.config._attn_implementation == VARLEN_ATTENTION
