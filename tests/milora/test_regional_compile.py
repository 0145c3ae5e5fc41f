import copy

import pytest
import torch

from milora import apply_milora
from milora.regional_compile import compile_repeated_blocks, repeated_blocks
from milora.tiny import tiny_config


def tiny_llama(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config("llama")).float()


def packed_batch(lengths, vocab, seed):
    """One padding-free row of `lengths` sequences, as TRL's collator makes it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone()}


def test_repeated_blocks_are_the_decoder_layers():
    model = apply_milora(tiny_llama(), ["q_proj", "v_proj"], 4, show_progress=False)
    stacks = repeated_blocks(model)
    assert len(stacks) == 1
    assert stacks[0] is model.base_model.model.model.layers


def test_compiled_layers_train_as_eager_ones_across_changing_token_counts():
    """Loss and adapter gradients of the compiled layers equal the eager model's, on batches of three
    different token counts (the dynamic dimension), and parameter names stay as they were."""
    torch._dynamo.reset()
    eager = apply_milora(tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], 4, show_progress=False)
    compiled = apply_milora(tiny_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], 4, show_progress=False)
    names = list(compiled.state_dict())
    assert compile_repeated_blocks(compiled, backend="aot_eager") == len(eager.base_model.model.model.layers)
    assert list(compiled.state_dict()) == names
    vocab = eager.config.vocab_size
    for seed, lengths in enumerate([[5, 9], [7, 3, 11], [16]]):
        batch = packed_batch(lengths, vocab, seed)
        losses, grads = [], []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, grad in grads[0].items():
            assert torch.allclose(grad, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


def test_packed_boundaries_reach_the_attention_beside_the_compiled_layers():
    """TRL's padding-free batches carry cu_seq_lens_q / max_length_q, whose length changes with the number of
    sequences: passed through the compiled layers, each new count compiled them again (and with CUDA graphs recorded
    new graphs). Beside the layers, batches of one token count and different sequence counts reuse one graph, and the
    loss is the eager model's."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from milora.attention import VARLEN_ATTENTION, register_varlen_attention

    register_varlen_attention()
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    eager = tiny_llama()
    eager.set_attn_implementation(VARLEN_ATTENTION)
    vocab = eager.config.vocab_size

    def batch(lengths, seed):
        generator = torch.Generator().manual_seed(seed)
        return collate([{"input_ids": torch.randint(3, vocab, (n,), generator=generator).tolist()} for n in lengths])

    batches = [batch(lengths, seed) for seed, lengths in enumerate([[12, 12], [6, 6, 6, 6], [24], [3, 13, 8]])]
    assert len({b["cu_seq_lens_q"].numel() for b in batches}) == 4 and {b["input_ids"].shape for b in batches} == {
        (1, 24)}

    def graphs_compiled(model, hook):
        torch._dynamo.reset()
        compile_repeated_blocks(model, backend="eager")
        if not hook:
            model.model.packed_boundaries_hook.remove()
        losses = []
        for b in batches:
            if len(losses) == 1:
                before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            losses.append(model(**b).loss.detach())
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before, losses

    reference = [eager(**b).loss.detach() for b in batches]
    new_graphs, losses = graphs_compiled(copy.deepcopy(eager), hook=True)
    assert new_graphs == 0
    assert torch.allclose(torch.stack(losses), torch.stack(reference), rtol=1e-5, atol=1e-6)
    new_graphs, losses = graphs_compiled(copy.deepcopy(eager), hook=False)  # the arguments through the layers
    assert new_graphs > 0
    assert torch.allclose(torch.stack(losses), torch.stack(reference), rtol=1e-5, atol=1e-6)
