"""Beam search on the generation engine (eval_harness.engine.beams) against `model.generate(num_beams=4)`, on
tiny float32 models on the CPU: the same new tokens, request by request, under every early-stopping rule."""

from __future__ import annotations

import collections

import pytest
import torch
from lm_eval.models.utils_hf import stop_sequences_criteria

from eval_harness.engine import BeamSearchEngine, EngineConfig
from eval_harness.engine.attention import SlotCache
from eval_harness.engine.stops import lookback_stop
from milora.tiny import tiny_model, tiny_tokenizer
from tests.eval_harness.test_engine import random_requests
from tests.eval_harness.varied_checkpoints import varied_model

# (length_penalty, early_stopping): transformers' default, and the other rules with penalties either side of 1
SETTINGS = [(1.0, False), (0.6, True), (-0.8, "never"), (2.0, "never"), (1.5, False)]


def reference(model, prompts, limits, eos: int | None, num_beams: int = 4, **settings) -> list[list[int]]:
    """`model.generate` beam search one prompt at a time (no padding): the new tokens."""
    outputs = []
    for prompt, limit in zip(prompts, limits, strict=True):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=limit, num_beams=num_beams, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, **settings)  # fmt: skip
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


def frequent_token(outputs: list[list[int]]) -> int:
    """A token the model writes inside its answers: as end-of-sequence token, some answers end early."""
    return collections.Counter(t for out in outputs for t in out[1:-1]).most_common(1)[0][0]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_beam_search_equals_model_generate(kind):
    prompts, limits = random_requests(10, seed=5)
    if kind == "gpt2":  # tied embeddings: scaled, its answers hardly vary; the plain one with a frequent token
        model = tiny_model(kind).eval()
        eos = frequent_token(reference(model, prompts[:3], [12] * 3, None))
    else:
        model = varied_model(kind).eval()
        eos = model.config.eos_token_id
    engine = BeamSearchEngine(model, eos_token_ids=[eos], config=EngineConfig(max_slots=12))  # 3 requests at once
    answers = {}
    for length_penalty, early_stopping in SETTINGS:
        settings = {"length_penalty": length_penalty, "early_stopping": early_stopping}
        expected = reference(model, prompts, limits, eos, **settings)
        assert engine.beam_search(prompts, limits, num_beams=4, **settings) == expected, settings
        answers[length_penalty, early_stopping] = expected
    # Not vacuous: answers that end with EOS before the limit and answers cut at it, and the rules matter.
    every = [(out, n) for outputs in answers.values() for out, n in zip(outputs, limits, strict=True)]
    assert any(out[-1] == eos and len(out) < n for out, n in every)
    assert any(len(out) == n and eos not in out for out, n in every)
    assert len({str(outputs) for outputs in answers.values()}) > 1


def test_several_end_of_sequence_tokens_widen_the_candidates_as_in_transformers():
    """With two EOS tokens transformers keeps 3 * num_beams candidates a step, so that enough stay unfinished."""
    model = tiny_model("llama").eval()
    prompts, limits = random_requests(6, seed=8)
    free = reference(model, prompts, limits, eos=None)
    first, second = collections.Counter(t for out in free for t in out[1:-1]).most_common(2)
    eos = [first[0], second[0]]
    expected = reference(model, prompts, limits, eos=eos, length_penalty=0.7)
    engine = BeamSearchEngine(model, eos_token_ids=eos, config=EngineConfig(max_slots=8))
    assert engine.beam_search(prompts, limits, num_beams=4, length_penalty=0.7) == expected
    assert {out[-1] for out, n in zip(expected, limits, strict=True) if len(out) < n} == set(eos)


def test_slot_groups_do_not_change_the_answers():
    """One group (fewer slots than beams asked for: one request at a time) and many give the same tokens;
    requests are handed over once each, as soon as they finish."""
    model = varied_model("llama").eval()
    prompts, limits = random_requests(7, seed=6)
    finished: list[tuple[int, list[int]]] = []
    one = BeamSearchEngine(model, [2], EngineConfig(max_slots=2)).beam_search(
        prompts, limits, num_beams=3, on_finish=lambda i, tokens: finished.append((i, list(tokens)))
    )
    many = BeamSearchEngine(model, [2], EngineConfig(max_slots=64)).beam_search(prompts, limits, num_beams=3)
    assert one == many == reference(model, prompts, limits, eos=2, num_beams=3)
    assert sorted(finished) == list(enumerate(one))


def test_lm_eval_stop_strings_end_beams_as_in_a_one_prompt_hf_batch():
    """lm-eval's stop-sequence criterion in `model.generate` (a one-prompt batch) and the engine's stop check
    (`lookback_stop`) end the same requests at the same step, with the same answer."""
    model, tokenizer = varied_model("llama").eval(), tiny_tokenizer()
    prompts, limits = random_requests(8, seed=7)
    free = reference(model, prompts, limits, eos=2)
    stop = tokenizer.decode([frequent_token(free)])
    expected = []
    for prompt, limit in zip(prompts, limits, strict=True):
        criteria = stop_sequences_criteria(tokenizer, [stop], len(prompt), 1)
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=limit, num_beams=4, do_sample=False,
                             eos_token_id=2, pad_token_id=0, stopping_criteria=criteria)  # fmt: skip
        expected.append(ids[0, len(prompt) :].tolist())
    engine = BeamSearchEngine(model, [2], EngineConfig(max_slots=8))
    assert engine.beam_search(prompts, limits, num_beams=4, stop=lookback_stop(tokenizer, [stop])) == expected
    assert expected != free  # the stop string ended some searches early
    assert any(out == short for out, short in zip(free, expected, strict=True))


def test_copy_positions_copies_runs_between_slots_in_every_layer():
    cache = SlotCache(num_layers=2, slots=4, max_context=8, kv_heads=2, head_dim=3, dtype=torch.float32, device="cpu")

    def contents() -> list[torch.Tensor]:  # every layer's (slots, kv_heads, positions, dim) keys and values
        return [view.clone() for layer in range(2) for view in cache.head_major(layer, cache.max_context)]

    generator = torch.Generator().manual_seed(0)
    for layer in range(2):  # distinct values at every (slot, position) of every layer
        slots, positions = torch.arange(4).repeat_interleave(8), torch.arange(8).repeat(4)
        key, value = (torch.randn(1, 2, 32, 3, generator=generator) for _ in range(2))
        cache.write(layer, slots, positions, key, value)
    before = contents()
    # slots 0 and 1 swap positions 2..4, slot 3 takes slot 1's positions 0..5: sources are read before writing
    cache.copy_positions([1, 0, 1], [0, 1, 3], [2, 2, 0], [5, 5, 6])
    for old, new in zip(before, contents(), strict=True):
        expected = old.clone()
        expected[0, :, 2:5], expected[1, :, 2:5], expected[3, :, 0:6] = old[1, :, 2:5], old[0, :, 2:5], old[1, :, 0:6]
        assert torch.equal(new, expected)
    copied = contents()
    cache.copy_positions([0], [1], [3], [3])  # an empty run copies nothing
    assert all(torch.equal(a, b) for a, b in zip(copied, contents(), strict=True))


def test_bad_settings_are_refused():
    engine = BeamSearchEngine(tiny_model("llama").eval())
    assert engine.beam_search([], 5, num_beams=4) == []
    with pytest.raises(ValueError, match="at least 2 beams"):
        engine.beam_search([[5, 6]], 5, num_beams=1)
    with pytest.raises(ValueError, match="early_stopping='sometimes'"):
        engine.beam_search([[5, 6]], 5, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="at least one token"):
        engine.beam_search([[]], 5, num_beams=2)


def test_a_model_whose_forward_changes_the_logits_is_refused():
    """Beam search reads log-probabilities, so a final soft-capping in the model's forward (Gemma 2) matters."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=261, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=0.5)  # fmt: skip
    engine = BeamSearchEngine(Gemma2ForCausalLM(config).eval())
    assert not engine.can_search()
    with pytest.raises(ValueError, match="use --engine hf"):
        engine.beam_search([[5, 6]], 5, num_beams=2)
