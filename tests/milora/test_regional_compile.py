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
