"""The generation engine (eval_harness.engine) against `model.generate`, on tiny float32 models on the CPU."""

from __future__ import annotations

import collections

import pytest
import torch

from eval_harness.engine import EngineConfig, GenerationEngine, supports
from eval_harness.engine.attention import ENGINE_ATTENTION
from milora.tiny import tiny_model


def random_requests(count: int, seed: int, vocab: int = 250) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    limits = torch.randint(1, 30, (count,), generator=generator).tolist()
    return prompts, limits


def reference(model, prompts, limits, eos: int | None) -> list[list[int]]:
    """`model.generate` one prompt at a time (no padding): the new tokens, greedy."""
    outputs = []
    for prompt, limit in zip(prompts, limits, strict=True):
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=limit, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("decode_attention", ["sdpa", "matmul"])
def test_greedy_generations_equal_model_generate(kind, decode_attention):
    model = tiny_model(kind).eval()
    prompts, limits = random_requests(13, seed=1)
    # as end-of-sequence token, one the model produces before the limit: some requests end early, some don't
    without_eos = reference(model, prompts, limits, eos=None)
    eos = collections.Counter(t for out in without_eos[:4] for t in out[:-1]).most_common(1)[0][0]
    expected = reference(model, prompts, limits, eos)
    # fewer slots than requests: slots are refilled as sequences end
    config = EngineConfig(max_slots=4, decode_attention=decode_attention)
    engine = GenerationEngine(model, eos_token_ids=[eos], config=config)
    assert engine.generate(prompts, limits) == expected
    assert any(out[-1] == eos and len(out) < n for out, n in zip(expected, limits, strict=True))
    assert any(len(out) == n for out, n in zip(expected, limits, strict=True))
    assert engine.stats["decode_steps"] > 0 and engine.stats["tokens"] == sum(len(o) for o in expected)


def test_one_slot_and_all_slots_give_the_same_tokens():
    model = tiny_model("llama").eval()
    prompts, limits = random_requests(9, seed=2)
    one = GenerationEngine(model, config=EngineConfig(max_slots=1)).generate(prompts, limits)
    many = GenerationEngine(model, config=EngineConfig(max_slots=32)).generate(prompts, limits)
    assert one == many == reference(model, prompts, limits, eos=None)


def test_stop_check_ends_a_request_early_with_a_prefix_of_its_generation():
    model = tiny_model("llama").eval()
    prompts, _ = random_requests(6, seed=3)
    full = GenerationEngine(model).generate(prompts, 40)
    asked = []

    def stop(request: int, tokens: list[int]) -> bool:
        asked.append((request, len(tokens)))
        return request % 2 == 0 and len(tokens) >= 8

    cut = GenerationEngine(model).generate(prompts, 40, stop=stop, stop_every=4)
    for index, (short, long) in enumerate(zip(cut, full, strict=True)):
        assert long[: len(short)] == short
        assert len(short) == (8 if index % 2 == 0 else 40)
    assert all(length % 4 == 0 for _, length in asked)


def test_the_model_keeps_its_attention_implementation():
    model = tiny_model("llama").eval()
    before = model.config._attn_implementation
    GenerationEngine(model).generate([[5, 6, 7]], 3)
    assert model.config._attn_implementation == before != ENGINE_ATTENTION


def test_unsupported_models_and_empty_prompts_are_refused():
    encoder = tiny_model("bert")
    assert not supports(encoder)
    with pytest.raises(ValueError, match="--engine hf"):
        GenerationEngine(encoder)
    engine = GenerationEngine(tiny_model("llama").eval())
    assert engine.generate([], 5) == []
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], 5)


def test_each_request_is_handed_over_as_soon_as_it_finishes():
    model = tiny_model("llama").eval()
    prompts, limits = random_requests(7, seed=4)
    finished: list[tuple[int, list[int]]] = []
    outputs = GenerationEngine(model, config=EngineConfig(max_slots=2)).generate(
        prompts, limits, on_finish=lambda request, tokens: finished.append((request, list(tokens)))
    )
    assert sorted(finished) == [(i, out) for i, out in enumerate(outputs)]  # once each, with its tokens


def test_compiled_decoder_layers_give_the_same_tokens_and_leave_the_model_eager():
    model = tiny_model("llama").eval()
    prompts, limits = random_requests(5, seed=5)
    own = model.model.layers[0]._call_impl  # a caller's own compiled call (here: the plain one) is kept
    model.model.layers[0]._compiled_call_impl = own
    engine = GenerationEngine(model, config=EngineConfig(max_slots=3, compile=True))
    assert engine.generate(prompts, limits) == reference(model, prompts, limits, eos=None)
    # compiled for the engine's decode steps only: afterwards every layer runs its ordinary call again
    assert model.model.layers[0]._compiled_call_impl == own
    assert all(layer._compiled_call_impl is None for layer in model.model.layers[1:])


def test_decode_attention_is_checked():
    model = tiny_model("llama").eval()
    with pytest.raises(ValueError, match="not one of"):
        GenerationEngine(model, config=EngineConfig(decode_attention="paged"))
