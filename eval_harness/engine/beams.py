"""Beam search on the generation engine, continuously batched over groups of slots: `BeamSearchEngine`.

Each request takes ``num_beams`` consecutive slots of the `SlotCache` (its group). Its prompt is prefilled once,
into the group's first slot, and the prompt's keys and values are copied to the group's other slots. Every
decode step then scores all slots in one forward (a CUDA graph replay on CUDA, as in greedy decoding), and
`BeamGroups.step` selects the beams of all running requests at once, as transformers' beam search does
(`eval_harness.engine.beam_state`). A beam whose parent is another beam takes the parent's generated positions
in the cache (`SlotCache.copy_positions`). A done request hands over its best hypothesis (``on_finish``) and
frees its group for the next waiting prompt.

Per request the new tokens are those of `model.generate(num_beams=..., do_sample=False, length_penalty=...,
early_stopping=..., max_new_tokens=...)` for a model without logits processors (on CPU in float32: tested).
The optional ``stop(request, tokens)`` check sees the best candidate of every step, as lm-eval's stop-sequence
criterion sees the first row of a one-prompt batch in HF's beam search; when it says stop, every candidate of
that step ends, and so does the request.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from eval_harness.engine.attention import SlotCache
from eval_harness.engine.beam_state import EARLY_STOPPING, BeamGroups
from eval_harness.engine.runner import KEY_BUCKET, GenerationEngine, _round_up


def head_gives_logits(model) -> bool:
    """Whether the output embedding applied to the decoder's last hidden state gives the model's logits (no
    soft-capping or scaling in the model's forward): beam search needs the log-probabilities themselves."""
    tokens = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits.float()
        hidden = model.get_decoder()(input_ids=tokens).last_hidden_state
        return torch.allclose(model.get_output_embeddings()(hidden).float(), logits, rtol=1e-3, atol=1e-3)


class BeamSearchEngine(GenerationEngine):
    """`GenerationEngine` with beam search (`beam_search`); greedy `generate` works as before."""

    def can_search(self) -> bool:
        """Whether beam search can drive this model (`head_gives_logits`); checked once."""
        if getattr(self, "_can_search", None) is None:
            self._can_search = head_gives_logits(self.model)
        return self._can_search

    def beam_search(self, *args, **kwargs) -> list[list[int]]:
        """`generate_beams` with the engine's attention set on the model for the call, and restored after."""
        return self._with_engine_attention(self.generate_beams, *args, **kwargs)

    def _decode_output(self, hidden: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        if "log_probs" in buffers:  # a beam-search step: every slot's next-token log-probabilities
            buffers["log_probs"].copy_(self._log_probs(hidden))
        else:
            super()._decode_output(hidden, buffers)

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """As transformers' beam search: the logits in float32, then log-softmax."""
        return torch.nn.functional.log_softmax(self.head(hidden).to(torch.float32), dim=-1)

    @torch.inference_mode()
    def generate_beams(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        num_beams: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        stop: Callable[[int, list[int]], bool] | None = None,
        desc: str = "beam search",
        on_finish: Callable[[int, list[int]], None] | None = None,
    ) -> list[list[int]]:
        """Each prompt's new tokens by beam search, the end-of-sequence token included where one ended the best
        hypothesis. `on_finish(i, tokens)` is called as soon as request i is done. `stop(i, tokens)` is asked at
        every step about request i's best candidate, and ends the request when it says so."""
        if num_beams < 2:
            raise ValueError(f"num_beams={num_beams}: beam search needs at least 2 beams (1 beam is greedy)")
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping={early_stopping!r} is not one of True, False, 'never'")
        count = len(prompts)
        limits = [max_new_tokens] * count if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
        if not count:
            return []
        if any(not prompt for prompt in prompts) or min(limits) < 1:
            raise ValueError("every prompt needs at least one token, and every request at least one new token")
        if not self.can_search():
            raise ValueError(f"beam search on the engine cannot drive {type(self.model).__name__}; use --engine hf")
        run = _BeamRun(self, prompts, limits, num_beams, length_penalty, early_stopping, stop, on_finish)
        with tqdm(total=count, desc=desc, unit="seq") as run.progress:
            while run.pending or run.running():
                run.admit()
                if run.running():
                    run.decode()
        self.stats["tokens"] += sum(len(o) for o in run.outputs)
        return run.outputs


class _BeamRun:
    """One `generate_beams` call: the cache, the beam state, which request holds which group."""

    def __init__(self, engine: BeamSearchEngine, prompts, limits, num_beams, length_penalty, early_stopping,
                 stop, on_finish):  # fmt: skip
        self.engine, self.prompts, self.limits, self.beams = engine, prompts, limits, num_beams
        self.stop, self.on_finish = stop, on_finish
        self.width = _round_up(max(len(p) + n for p, n in zip(prompts, limits, strict=True)), KEY_BUCKET)
        self.groups = max(1, engine.slot_count(len(prompts) * num_beams, self.width) // num_beams)
        device, slots = engine.device, self.groups * num_beams
        self.cache = SlotCache(engine.num_layers, slots, self.width, engine.kv_heads, engine.head_dim, engine.dtype,
                               device)  # fmt: skip
        self.buffers = engine._decode_buffers(self.cache)
        self.buffers["log_probs"] = torch.zeros(slots, engine.head.weight.shape[0], device=device)
        self.step_runner = engine._decoder_runner(self.cache, self.buffers)
        self.state = BeamGroups(self.groups, num_beams, max(limits), engine.eos, length_penalty, early_stopping, device)
        self.pending = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True))
        self.owner: list[int | None] = [None] * self.groups
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.started = time.perf_counter()
        self.progress = None

    def running(self) -> list[int]:
        return [group for group, request in enumerate(self.owner) if request is not None]

    def prompt_length(self, group: int) -> int:
        return len(self.prompts[self.owner[group]])

    def check_stop(self, groups: list[int], best: list[list[int]]) -> list[bool]:
        """The caller's stop check on each group's best candidate."""
        return [self.stop(self.owner[group], tokens) for group, tokens in zip(groups, best, strict=True)]

    def admit(self) -> None:
        """Waiting prompts into the free groups (up to ``prefill_tokens`` prompt tokens), and their first step."""
        free = [group for group, request in enumerate(self.owner) if request is None]
        if not free or not self.pending:
            return
        chosen, used = [], 0
        while self.pending and len(chosen) < len(free):
            size = len(self.prompts[self.pending[0]])
            if chosen and used + size > self.engine.config.prefill_tokens:
                break
            chosen.append(self.pending.popleft())
            used += size
        groups, beams = free[: len(chosen)], self.beams
        tick = time.perf_counter()
        first_slots = [(g * beams, self.prompts[r]) for g, r in zip(groups, chosen, strict=True)]
        log_probs = self.engine._log_probs(self.engine._prefill_hidden(self.cache, first_slots))
        for group, request in zip(groups, chosen, strict=True):
            self.owner[group] = request
        copies = [(g * beams, g * beams + b, self.prompt_length(g)) for g in groups for b in range(1, beams)]
        src, dst, stop = zip(*copies, strict=True)
        self.cache.copy_positions(src, dst, [0] * len(copies), stop)
        self.engine.stats["prefill_seconds"] += time.perf_counter() - tick
        self.state.start(groups, [self.limits[r] for r in chosen])
        self.select(groups, log_probs.unsqueeze(1).expand(-1, beams, -1))

    def decode(self) -> None:
        """One decode step for every running beam, then the selection."""
        active, beams, device = self.running(), self.beams, self.engine.device
        rows = torch.tensor(active, device=device)
        lengths = [0] * self.cache.slots  # positions of the tokens fed in; idle slots write at 0, unread
        for group in active:
            position = self.prompt_length(group) + self.state.steps[group] - 1
            lengths[group * beams : (group + 1) * beams] = [position] * beams
        self.buffers["input_ids"].zero_()
        self.buffers["input_ids"].view(self.groups, beams)[rows] = self.state.newest(active)
        self.buffers["lengths"].copy_(torch.tensor(lengths))
        tick = time.perf_counter()
        self.step_runner(min(self.width, _round_up(max(lengths) + 1, KEY_BUCKET)))
        stats = self.engine.stats
        stats["decode_seconds"] += time.perf_counter() - tick
        stats["decode_steps"] += 1
        self.select(active, self.buffers["log_probs"].view(self.groups, beams, -1)[rows])
        rate = f"{stats['decode_steps'] / (time.perf_counter() - self.started):.1f}"
        self.progress.set_postfix(steps_per_s=rate, refresh=False)

    def select(self, groups: list[int], log_probs: torch.Tensor) -> None:
        """The beams' next tokens; beams that changed parent take the parent's generated keys and values, and
        done requests are handed over."""
        parents, done = self.state.step(groups, log_probs, None if self.stop is None else self.check_stop)
        beams = self.beams
        moves = [(g * beams + p, g * beams + b, g) for g, ps, d in zip(groups, parents, done, strict=True) if not d
                 for b, p in enumerate(ps) if p != b]  # fmt: skip
        if moves:  # the positions generated before this step; the prompt is the same in every beam
            src, dst, moved = zip(*moves, strict=True)
            start = [self.prompt_length(g) for g in moved]
            stop = [s + self.state.steps[g] - 1 for s, g in zip(start, moved, strict=True)]
            self.cache.copy_positions(src, dst, start, stop)
        for group, finished in zip(groups, done, strict=True):
            if finished:
                request, self.owner[group] = self.owner[group], None
                self.outputs[request] = self.state.best(group)
                self.progress.update(1)
                if self.on_finish is not None:
                    self.on_finish(request, self.outputs[request])
