"""Generation throughput of `milora eval`'s engines on LLaMA-2-7B shapes (random bfloat16 weights).

Random weights are fine: the cost depends on the shapes and token counts only (EOS is disabled, so every
sequence runs to its new-token limit). Prints one table and writes ``OUT/generation_throughput.json``:

- ``engine``: `eval_harness.engine.GenerationEngine` on all requests (slots from free memory, or --slots);
- ``hf``: `model.generate` with the default dynamic cache at each of --hf_batches, the path of lm-eval's HF
  backend (`--engine hf`; batch 8 is `milora eval`'s default), timed on one batch of the longest prompts;
- ``transformers_cb``: transformers' own continuous batching (`model.generate_batch`), with --cb.

Per row: tokens/s (new tokens over the wall clock, prefill and CUDA-graph captures included), the mean decode
step, the bandwidth bound of that step (the weights plus the KV cache the step's sequences must read, at
--bandwidth TB/s) and the share of it reached, and peak memory.

    python benchmarks/generation_throughput.py --out OUT                       # the recorded configuration
    python benchmarks/generation_throughput.py --out OUT --requests 64 --new_tokens 32 --hf_batches 8  # quick look
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import time
from pathlib import Path

import torch

LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip


def build_model(layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA2_7B, **({"num_hidden_layers": layers} if layers else {})})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_prompts(count: int, low: int, high: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def bound_ms(model, contexts_per_step: float, bandwidth_tbs: float) -> float:
    """Milliseconds to read the weights once plus `contexts_per_step` tokens of KV cache."""
    return (model_bytes(model) + contexts_per_step * kv_bytes_per_token(model)) / (bandwidth_tbs * 1e12) * 1e3


def run_engine(model, prompts, new_tokens, slots, bandwidth, decode_attention="sdpa", compile=True):
    from eval_harness.engine import EngineConfig, GenerationEngine

    config = EngineConfig(max_slots=slots, decode_attention=decode_attention, compile=compile)
    engine = GenerationEngine(model, eos_token_ids=(), config=config)
    # compilation, kernels and the first graphs, at the timed run's slot count (a new count recompiles)
    engine.generate(prompts, 8, desc="warm-up")
    engine.stats = dict.fromkeys(engine.stats, 0)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.generate(prompts, new_tokens, desc="engine")
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    steps = engine.stats["decode_steps"]
    # a CUDA graph is captured on the first step at each key length: that step's time is the capture's
    step_ms = (engine.stats["decode_seconds"] - engine.stats["capture_seconds"]) / steps * 1e3
    # the sequences a step serves read their whole context: mean over steps of the summed context lengths
    mean_context = sum(len(p) + new_tokens / 2 for p in prompts) / len(prompts)
    concurrent = tokens / steps  # new tokens per decode step ~ sequences in flight
    return {
        "variant": f"engine ({decode_attention} decode, {'compiled' if compile else 'eager'}, slots {slots or 'auto'})",
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "step_ms": step_ms,
        "concurrent": concurrent, "bound_ms": bound_ms(model, concurrent * mean_context, bandwidth),
        "prefill_s": engine.stats["prefill_seconds"], "capture_s": engine.stats["capture_seconds"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def run_hf(model, prompts, new_tokens, batch, bandwidth):
    chosen = sorted(prompts, key=len, reverse=True)[:batch]
    width = max(len(p) for p in chosen)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in chosen], device="cuda")
    pads = torch.tensor([width - len(p) for p in chosen], device="cuda")
    mask = (torch.arange(width, device="cuda")[None] >= pads[:, None]).long()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    times = {}
    for count in (1, new_tokens):  # the prefill alone, then the whole generation: the difference is decoding
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False
        )
        torch.cuda.synchronize()
        times[count] = time.perf_counter() - start
    tokens = (out.shape[1] - width) * batch
    step_ms = (times[new_tokens] - times[1]) / (new_tokens - 1) * 1e3
    mean_context = width + new_tokens / 2  # left-padded: every row reads the padded width
    return {
        "variant": f"hf generate, batch {batch}", "tokens": tokens, "wall_s": times[new_tokens],
        "tokens_per_s": tokens / times[new_tokens], "step_ms": step_ms, "concurrent": batch,
        "bound_ms": bound_ms(model, batch * mean_context, bandwidth), "prefill_s": times[1],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def run_transformers_cb(model, prompts, new_tokens, bandwidth, **cb_options):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    kwargs = {}
    if cb_options:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**cb_options)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, **kwargs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(r.generated_tokens) for r in results.values())
    model.set_attn_implementation("sdpa")
    return {
        "variant": f"transformers generate_batch {cb_options or 'defaults'}", "tokens": tokens, "wall_s": wall,
        "tokens_per_s": tokens / wall, "step_ms": float("nan"), "concurrent": float("nan"),
        "bound_ms": float("nan"), "prefill_s": float("nan"), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def print_table(rows):
    print("| variant | new tokens | wall s | tokens/s | ms/step | in flight | bound ms/step | of bound | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        share = r["bound_ms"] / r["step_ms"]  # nan where a variant has no step time
        print(
            f"| {r['variant']} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} "
            f"| {r['concurrent']:.0f} | {r['bound_ms']:.1f} | {share:.0%} | {r['peak_gib']:.1f} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt_min", type=int, default=100)
    parser.add_argument("--prompt_max", type=int, default=260)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument(
        "--engines", nargs="*", default=["sdpa:128", "sdpa:0", "sdpa:128:eager"],
        help="engine variants as DECODE_ATTENTION:SLOTS[:eager] (0 slots: as many as free memory holds; eager: "
        "decoder layers not compiled)",
    )  # fmt: skip
    parser.add_argument("--hf_batches", type=int, nargs="*", default=[8, 64, 128])
    parser.add_argument("--hf_new_tokens", type=int, default=128, help="new tokens of the timed hf batch")
    parser.add_argument("--cb", action="store_true", help="also time transformers' generate_batch")
    parser.add_argument("--cb_requests", type=int, default=128)
    parser.add_argument("--layers", type=int, help="fewer layers than LLaMA-2-7B's 32, for a quick look")
    parser.add_argument("--bandwidth", type=float, default=4.8, help="memory bandwidth in TB/s for the bound")
    args = parser.parse_args(argv)
    from torch.nn.attention import varlen

    signature = inspect.signature(varlen.varlen_attn)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, varlen_attn{signature}")
    model = build_model(args.layers)
    prompts = make_prompts(args.requests, args.prompt_min, args.prompt_max, model.config.vocab_size)
    rows = []
    for variant in args.engines:
        attention, *options = variant.split(":")
        slots = int(options[0]) if options and options[0] else None
        compiled = "eager" not in options[1:]
        rows.append(run_engine(model, prompts, args.new_tokens, slots, args.bandwidth, attention, compiled))
        print_table(rows[-1:])
    for batch in args.hf_batches:
        rows.append(run_hf(model, prompts, args.hf_new_tokens, batch, args.bandwidth))
        print_table(rows[-1:])
    if args.cb:
        for options in ({}, {"use_cuda_graph": True}):
            try:
                cb_prompts = prompts[: args.cb_requests]
                rows.append(run_transformers_cb(model, cb_prompts, args.new_tokens, args.bandwidth, **options))
                print_table(rows[-1:])
            except Exception as error:  # an option this transformers does not take, say
                print(f"transformers generate_batch {options}: {type(error).__name__}: {error}")
    print()
    print_table(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "generation_throughput.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
