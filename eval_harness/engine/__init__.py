"""milora's generation engine for evaluation: continuous batching over a slot KV cache, CUDA-graph decode steps.

    from eval_harness.engine import GenerationEngine
    engine = GenerationEngine(model, eos_token_ids=[tokenizer.eos_token_id])
    new_tokens = engine.generate([tokenizer(p).input_ids for p in prompts], max_new_tokens=256)

    engine = BeamSearchEngine(model, eos_token_ids=[tokenizer.eos_token_id])
    new_tokens = engine.beam_search(prompts_ids, max_new_tokens=32, num_beams=4)  # transformers' beam search

Greedy decoding (`runner`) and beam search (`beams`, `beam_state`). `supports(model)` says whether a model can be
driven (decoders using transformers' attention interface); `model_settings`: what of a model's generation config
the engine honours (`token_changing_settings` lists what it does not).
"""

from eval_harness.engine.attention import ENGINE_ATTENTION, register_engine_attention
from eval_harness.engine.beams import BeamSearchEngine
from eval_harness.engine.model_settings import beam_defaults, eos_token_ids, token_changing_settings
from eval_harness.engine.runner import EngineConfig, GenerationEngine, supports, unsupported_reason

__all__ = [
    "ENGINE_ATTENTION",
    "BeamSearchEngine",
    "EngineConfig",
    "GenerationEngine",
    "beam_defaults",
    "eos_token_ids",
    "register_engine_attention",
    "supports",
    "token_changing_settings",
    "unsupported_reason",
]
