"""Greedy generations of the engine (each decode attention, compiled and eager) against `model.generate` on a
small random grouped-query Llama in bfloat16 on the GPU: prints how many of 40 requests match token for token."""

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval_harness.engine import EngineConfig, GenerationEngine

config = LlamaConfig(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    vocab_size=1000,
)  # fmt: skip
config._attn_implementation = "sdpa"
torch.manual_seed(0)
model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
rng = random.Random(0)
prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(5, 90))] for _ in range(40)]
reference = [
    model.generate(torch.tensor([p], device="cuda"), max_new_tokens=40, do_sample=False, eos_token_id=None,
                   pad_token_id=0)[0, len(p):].tolist()
    for p in prompts
]  # fmt: skip
for attention, compiled in (("sdpa", True), ("sdpa", False), ("matmul", True)):
    config = EngineConfig(max_slots=16, decode_attention=attention, compile=compiled)
    got = GenerationEngine(model, (), config).generate(prompts, 40)
    equal = sum(a == b for a, b in zip(got, reference, strict=True))
    print(f"{attention} ({'compiled' if compiled else 'eager'}): {equal} of {len(prompts)} equal to model.generate")
