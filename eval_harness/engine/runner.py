"""The generation engine: greedy decoding of many prompts at once, continuously batched over sequence slots.

A fixed number of slots (chosen from free memory) each hold one sequence's keys and values (`SlotCache`).
Prompts are taken longest first; whenever slots are free, waiting prompts are prefilled together (whole prompts
packed in one row, up to ``prefill_tokens``), and then every slot advances by one token per decode step. A
sequence leaves its slot at an end-of-sequence token, at its new-token limit, or when the caller's ``stop``
check says so (stop strings), and the next prompt takes the slot at once.

On CUDA each decode step is replayed from a CUDA graph (one per key-length bucket, captured on first use), so
a step costs the GPU's time rather than Python's, and runs through decoder layers compiled by `torch.compile`
(`EngineConfig.compile`), which fuses a step's small kernels; the prefill runs eagerly. Elsewhere the same code runs
eagerly: on CPU in float32 it gives the tokens of `model.generate(do_sample=False)` (tested).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from eval_harness.engine.attention import (
    DECODE_ATTENTION,
    ENGINE_ATTENTION,
    SlotCache,
    StepPlan,
    register_engine_attention,
)
from eval_harness.engine.model_settings import token_changing_settings

LOGGER = logging.getLogger(__name__)
KEY_BUCKET = 64  # decode graphs are captured per key length rounded up to this


@dataclass
class EngineConfig:
    """max_slots: concurrent sequences (default: as many as free memory holds, at most 256; 32 on CPU).
    prefill_tokens: prompt tokens per prefill forward. cuda_graphs: replay decode steps from CUDA graphs
    (default: on CUDA). memory_fraction: share of the free accelerator memory the cache may take.
    decode_attention: how a decode step reads the cache: "sdpa" (closest to `model.generate` in half
    precision) or "matmul".
    compile: run decode steps through decoder layers compiled by `torch.compile` (default: on CUDA), which
    fuses the many small kernels of a step (norms, rotary embedding, activation, residual adds); the first
    step of a process pays the compilation (tens of seconds)."""

    max_slots: int | None = None
    prefill_tokens: int = 16384
    cuda_graphs: bool | None = None
    memory_fraction: float = 0.8
    decode_attention: str = "sdpa"
    compile: bool | None = None


def supports(model) -> bool:
    """Whether the engine can drive this model: a decoder whose attention goes through transformers'
    attention interface (Llama, Mistral, Qwen2 and most current decoder-only models)."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    return bool(can_set and can_set()) and model.get_output_embeddings() is not None and decoder is not model


def unsupported_reason(model) -> str | None:
    """Why the engine cannot give this model's `model.generate` tokens (it cannot drive the model, or the model's
    generation config adds logits processors it does not implement), or None where it can."""
    if not supports(model):
        return f"it cannot drive {type(model).__name__}"
    if changing := token_changing_settings(model.generation_config):
        return f"the model's generation config sets {', '.join(changing)}, which it does not implement"
    return None


def _decoder_layers(decoder) -> torch.nn.ModuleList | None:
    """The decoder's stack of layers (``layers`` in Llama-like models, ``h`` in GPT-2), or None."""
    for name in ("layers", "h"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    return None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class GenerationEngine:
    """Greedy generation for a causal LM (eval mode, on its device). `generate` returns each prompt's new
    tokens, the end-of-sequence token included where one ended it, as `model.generate` would."""

    def __init__(self, model, eos_token_ids: Sequence[int] = (), config: EngineConfig | None = None):
        if not supports(model):
            raise ValueError(f"the generation engine cannot drive {type(model).__name__}; use --engine hf")
        self.model, self.config = model, config or EngineConfig()
        self.eos = frozenset(int(t) for t in eos_token_ids)
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        text_config = model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        register_engine_attention()
        if self.config.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention={self.config.decode_attention!r} is not one of {DECODE_ATTENTION}")
        use_graphs = self.config.cuda_graphs
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.use_compile = self.device.type == "cuda" if self.config.compile is None else self.config.compile
        self._compiled_layers: list | None = None
        stats = ("decode_steps", "decode_seconds", "prefill_seconds", "capture_seconds", "tokens")
        self.stats = dict.fromkeys(stats, 0)

    # -- sizing ------------------------------------------------------------------------------------------
    def slot_count(self, requests: int, max_context: int) -> int:
        cap = self.config.max_slots or (256 if self.device.type == "cuda" else 32)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            hidden = self.model.config.get_text_config().hidden_size
            reserve = 2 * 2**30 + self.config.prefill_tokens * hidden * 4 * 24  # prefill activations, logits
            per_token = SlotCache.bytes_per_token(self.num_layers, self.kv_heads, self.head_dim, self.dtype)
            per_slot = max_context * per_token
            cap = min(cap, max(1, int((free * self.config.memory_fraction - reserve) // per_slot)))
        return max(1, min(cap, requests))

    # -- forward passes ----------------------------------------------------------------------------------
    def _logits_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).argmax(dim=-1)

    def _prefill(self, cache: SlotCache, entries: list[tuple[int, Sequence[int]]]) -> list[int]:
        """Prompts into their slots; the first new token of each."""
        return self._logits_argmax(self._prefill_hidden(cache, entries)).tolist()

    def _prefill_hidden(self, cache: SlotCache, entries: list[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Prompts into their slots; the last hidden state of each, (prompts, hidden)."""
        device = self.device
        lengths = [len(prompt) for _, prompt in entries]
        tokens = torch.tensor([t for _, prompt in entries for t in prompt], device=device).unsqueeze(0)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        slots = torch.tensor([slot for slot, _ in entries]).repeat_interleave(torch.tensor(lengths)).to(device)
        plan = StepPlan(cache, slots, positions, prefill=True, cu_seqlens=cu_seqlens, max_len=max(lengths))
        hidden = self.decoder(input_ids=tokens, position_ids=positions.unsqueeze(0), use_cache=False, milora_step=plan)
        last = cu_seqlens[1:].long() - 1
        return hidden.last_hidden_state[0, last]

    def _decode_buffers(self, cache: SlotCache) -> dict[str, torch.Tensor]:
        slots, device = cache.slots, self.device
        return {
            "input_ids": torch.zeros(1, slots, dtype=torch.long, device=device),
            "lengths": torch.zeros(slots, dtype=torch.long, device=device),
            "slot_ids": torch.arange(slots, device=device),
            "out": torch.zeros(slots, dtype=torch.long, device=device),
        }

    def _decode_step(self, cache: SlotCache, buffers: dict[str, torch.Tensor], key_len: int) -> None:
        """One token for every slot, read from and written to `buffers` only (so it can be captured)."""
        lengths = buffers["lengths"]
        plan = StepPlan(
            cache, buffers["slot_ids"], lengths, prefill=False, key_len=key_len,
            decode_attention=self.config.decode_attention,
        )  # fmt: skip
        key_positions = torch.arange(key_len, device=lengths.device)
        plan.key_mask = (key_positions.unsqueeze(0) <= lengths.unsqueeze(1)).view(cache.slots, 1, 1, key_len)
        with self._compiled_decoder():
            hidden = self.decoder(
                input_ids=buffers["input_ids"], position_ids=lengths.unsqueeze(0), use_cache=False, milora_step=plan
            )
        self._decode_output(hidden.last_hidden_state[0], buffers)

    def _decode_output(self, hidden: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        """What a decode step leaves in `buffers` from each slot's last hidden state: greedy, the next token."""
        buffers["out"].copy_(self._logits_argmax(hidden))

    @contextmanager
    def _compiled_decoder(self):
        """While open, the decoder's layers run compiled (`EngineConfig.compile`): for decode steps only, so
        prefills (whose shapes change every call) and every other user of the model stay eager."""
        layers = _decoder_layers(self.decoder) if self.use_compile else None
        if layers is None:
            yield
            return
        if self._compiled_layers is None:
            self._compiled_layers = [torch.compile(layer._call_impl) for layer in layers]
        previous = [layer._compiled_call_impl for layer in layers]  # a caller's own `layer.compile()` stays
        for layer, compiled in zip(layers, self._compiled_layers, strict=True):
            layer._compiled_call_impl = compiled  # what `nn.Module.compile` sets; `__call__` then runs it
        try:
            yield
        finally:
            for layer, own in zip(layers, previous, strict=True):
                layer._compiled_call_impl = own

    def _decoder_runner(self, cache: SlotCache, buffers: dict) -> Callable[[int], None]:
        """A function key_len -> run one decode step: a CUDA graph replay per key length, or eager."""
        if not self.use_graphs:
            return lambda key_len: self._decode_step(cache, buffers, key_len)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()

        def run(key_len: int) -> None:
            graph = graphs.get(key_len)
            if graph is None:
                stream = torch.cuda.Stream(device=self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                tick = time.perf_counter()
                # a warm-up step on a side stream, as capture requires (it also compiles, where compiling)
                with torch.cuda.stream(stream):
                    self._decode_step(cache, buffers, key_len)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._decode_step(cache, buffers, key_len)
                graphs[key_len] = graph
                torch.cuda.synchronize(self.device)
                self.stats["capture_seconds"] += time.perf_counter() - tick
            graph.replay()

        return run

    # -- the loop ----------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs) -> list[list[int]]:
        """`generate_greedy` with the engine's attention set on the model for the call, and restored after."""
        return self._with_engine_attention(self.generate_greedy, *args, **kwargs)

    def _with_engine_attention(self, run: Callable, *args, **kwargs):
        previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ENGINE_ATTENTION)
        try:
            return run(*args, **kwargs)
        finally:
            self.model.set_attn_implementation(previous)

    @torch.inference_mode()
    def generate_greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        stop: Callable[[int, list[int]], bool] | None = None,
        desc: str = "generating",
        stop_every: int = 8,
        on_finish: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (token ids), greedy. `stop(i, tokens)` is asked every `stop_every` tokens
        whether request i may end (e.g. a stop string appeared); generation past that point is cut short only
        to save time: callers still cut the text at their stop strings. `on_finish(i, tokens)` is called as
        soon as request i is done (to store it, say), before the call returns."""
        count = len(prompts)
        limits = [max_new_tokens] * count if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
        outputs: list[list[int]] = [[] for _ in range(count)]
        if not count:
            return outputs
        if any(not prompt for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        width = _round_up(max(len(p) + n for p, n in zip(prompts, limits, strict=True)), KEY_BUCKET)
        slots = self.slot_count(count, width)
        cache = SlotCache(self.num_layers, slots, width, self.kv_heads, self.head_dim, self.dtype, self.device)
        buffers = self._decode_buffers(cache)
        decode = self._decoder_runner(cache, buffers)
        pending = deque(sorted(range(count), key=lambda i: len(prompts[i]), reverse=True))
        owner: list[int | None] = [None] * slots
        lengths, next_tokens = [0] * slots, [0] * slots

        def advance(slot: int, request: int, token: int) -> None:
            generated = outputs[request]
            generated.append(token)
            done = token in self.eos or len(generated) >= limits[request]
            if not done and stop is not None and len(generated) % stop_every == 0:
                done = stop(request, generated)
            if done:
                owner[slot], lengths[slot], next_tokens[slot] = None, 0, 0
                progress.update(1)
                if on_finish is not None:
                    on_finish(request, generated)

        started = time.perf_counter()
        with tqdm(total=count, desc=desc, unit="seq") as progress:
            while pending or any(o is not None for o in owner):
                free = [slot for slot in range(slots) if owner[slot] is None]
                if free and pending:
                    chosen, used = [], 0
                    while pending and len(chosen) < len(free):
                        size = len(prompts[pending[0]])
                        if chosen and used + size > self.config.prefill_tokens:
                            break
                        chosen.append(pending.popleft())
                        used += size
                    entries = [(slot, prompts[request]) for slot, request in zip(free, chosen, strict=False)]
                    tick = time.perf_counter()
                    first = self._prefill(cache, entries)
                    self.stats["prefill_seconds"] += time.perf_counter() - tick
                    for (slot, prompt), request, token in zip(entries, chosen, first, strict=True):
                        owner[slot], lengths[slot], next_tokens[slot] = request, len(prompt), token
                        advance(slot, request, token)
                active = [slot for slot in range(slots) if owner[slot] is not None]
                if not active:
                    continue
                buffers["input_ids"].copy_(torch.tensor([next_tokens]))
                buffers["lengths"].copy_(torch.tensor(lengths))
                tick = time.perf_counter()
                decode(min(width, _round_up(max(lengths) + 1, KEY_BUCKET)))
                tokens = buffers["out"].tolist()
                self.stats["decode_seconds"] += time.perf_counter() - tick
                self.stats["decode_steps"] += 1
                for slot in active:
                    lengths[slot] += 1
                    next_tokens[slot] = tokens[slot]
                    advance(slot, owner[slot], tokens[slot])
                made = sum(len(o) for o in outputs)
                progress.set_postfix(tokens_per_s=f"{made / (time.perf_counter() - started):.0f}", refresh=False)
        self.stats["tokens"] += sum(len(o) for o in outputs)
        return outputs
