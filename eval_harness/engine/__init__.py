"""milora's generation engine for evaluation: continuous batching over a slot KV cache, CUDA-graph decode steps.

    from eval_harness.engine import GenerationEngine
    engine = GenerationEngine(model, eos_token_ids=[tokenizer.eos_token_id])
    new_tokens = engine.generate([tokenizer(p).input_ids for p in prompts], max_new_tokens=256)

Greedy decoding only; beam search stays with `model.generate`. `supports(model)` says whether a model can be
driven (decoders using transformers' attention interface).
"""

from eval_harness.engine.attention import ENGINE_ATTENTION, register_engine_attention
from eval_harness.engine.runner import EngineConfig, GenerationEngine, supports

__all__ = ["ENGINE_ATTENTION", "EngineConfig", "GenerationEngine", "register_engine_attention", "supports"]
