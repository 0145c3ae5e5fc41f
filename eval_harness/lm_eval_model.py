"""lm-eval's Hugging Face model with milora's generation engine: the lm-eval model ``milora``.

`MiloraLM` is lm-eval's `HFLM` (loading, tokenisation, loglikelihood, the split of requests across processes
under ``accelerate launch``: all HFLM's) whose ``generate_until`` sends greedy requests (``do_sample`` false,
one beam) and beam-search requests (``do_sample`` false, ``num_beams`` > 1, optionally ``length_penalty`` and
``early_stopping``) to milora's generation engine (`eval_harness.engine.BeamSearchEngine`), grouped by
identical generation settings, and every other request (sampling, settings the engine does not implement, or
any request when the model's generation config adds logits processors, e.g. a ``repetition_penalty``) to
HFLM's own ``generate_until``. An answer is made as HFLM makes it: the context left-truncated to
``max_length - max_gen_toks`` tokens, generation ended by an end-of-sequence token, ``max_gen_toks`` or a stop
string (``until`` plus the EOS text), the new tokens decoded and cut at the first stop string, and reported to
``cache_hook.add_partial``.

Beam search honours stop strings as HFLM's ``model.generate`` does with lm-eval's stop-sequence criterion in a batch
of one prompt: at every step the best candidate's last new tokens are decoded, and a stop string there ends the
search (`eval_harness.engine.stops.lookback_stop`). In larger batches that criterion watches only the first rows of
the batch and ends all of them together, so HFLM's beam-search answers depend on its batch size; the engine's equal
HFLM's with ``batch_size=1``.

Options (``--model_args`` of lm-eval, keywords here): ``engine`` ("milora", or "hf" for HFLM's path
throughout), ``max_slots`` (concurrent sequences; default from free memory), ``compile`` (decode through
decoder layers compiled by `torch.compile`; default on CUDA), ``max_gen_toks_cap`` (lower every
request's new-token limit to at most this), ``generations_dir`` (stream finished generations there and reuse
them on a rerun: `eval_harness.generation_store`).

lm-eval 0.4 finds models only in its own registry, which this module fills when imported: run lm-eval through
``python -m eval_harness.lm_eval_cli`` (lm-eval's command line, with ``milora`` registered).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from eval_harness.engine import BeamSearchEngine, EngineConfig, unsupported_reason
from eval_harness.engine.beam_state import EARLY_STOPPING
from eval_harness.engine.model_settings import beam_defaults, eos_token_ids
from eval_harness.engine.stops import STOP_EVERY, lookback_stop, windowed_stop
from eval_harness.generation_store import GenerationStore, StoringCacheHook, weights_fingerprint
from eval_harness.lm_eval_runner import capped_generation_kwargs

LOGGER = logging.getLogger(__name__)
ENGINES = ("milora", "hf")
# Settings a greedy request may carry: HF's greedy search ignores the sampling ones.
ENGINE_SETTINGS = frozenset(
    {"do_sample", "temperature", "top_p", "top_k", "min_p", "num_beams", "until", "max_gen_toks"}
)
# ... and a beam-search request besides: transformers' beam search reads these two.
BEAM_SETTINGS = ENGINE_SETTINGS | {"length_penalty", "early_stopping"}

def engine_request_settings(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> dict[str, Any] | None:
    """lm-eval's normalised settings of a request the engine can answer, else None: greedy (one beam) or beam
    search (``num_beams`` > 1, with ``length_penalty`` and ``early_stopping`` as transformers reads them), no
    sampling, nothing else that changes the tokens."""
    settings = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks)
    beams = int(settings.get("num_beams") or 1) > 1
    if settings.get("do_sample") or set(settings) - (BEAM_SETTINGS if beams else ENGINE_SETTINGS):
        return None
    if beams and settings.get("early_stopping", False) not in EARLY_STOPPING:
        return None
    return dict(settings)


@register_model("milora")
class MiloraLM(HFLM):
    """HFLM whose greedy generations come from milora's engine (see the module docstring)."""

    def __init__(
        self,
        *args,
        engine: str = "milora",
        max_slots: int | None = None,
        compile: bool | None = None,
        max_gen_toks_cap: int | None = None,
        generations_dir: str | None = None,
        **kwargs,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
        super().__init__(*args, **kwargs)
        self._adopt_process_group()
        self.engine = engine
        self._engine, self._beams_on_engine = None, None
        self.engine_config = EngineConfig(max_slots=int(max_slots) if max_slots else None, compile=compile)
        self.max_gen_toks_cap = int(max_gen_toks_cap) if max_gen_toks_cap is not None else None
        if engine == "milora" and not self._engine_usable():
            self.engine = "hf"
        self.store = None
        if generations_dir:
            self.store = GenerationStore(Path(generations_dir), self._run_identity(), self.rank, self.world_size)

    # -- set-up ------------------------------------------------------------------------------------------
    def _adopt_process_group(self) -> None:
        """Data-parallel ranks under ``accelerate launch`` on any device: HFLM takes them only with 2+ GPUs."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    def _engine_usable(self) -> bool:
        reason = None
        if self.backend != "causal":
            reason = "it is not a decoder-only model"
        elif getattr(self, "mixed_precision_dtype", None) is not None:
            reason = "it does not run under autocast (mixed_precision_dtype)"
        else:
            reason = unsupported_reason(self.model)
        if reason:
            LOGGER.warning("milora's generation engine is not used (%s): generating with HFLM's path", reason)
        return reason is None

    def _run_identity(self) -> dict[str, Any]:
        """What besides the request decides a generation: the model, its dtype, the engine, the context limit."""
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return {
            "model": str(name),
            "weights": weights_fingerprint(name),
            "dtype": str(self.model.dtype),
            "engine": self.engine,
            "max_length": self.max_length,
        }

    # -- generate_until ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.max_gen_toks_cap is not None:
            for request in requests:  # the Instance objects lm-eval logs: samples show the limit that was used
                context, gen_kwargs, *rest = request.args
                capped = capped_generation_kwargs(gen_kwargs, self.max_gen_toks_cap, default=self.max_gen_toks)
                request.arguments = (context, capped, *rest)
        results: list[str | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        hook = self.cache_hook
        if self.store is not None:
            todo = self.store.fill(requests, results)
            self.cache_hook = StoringCacheHook(hook, self.store, [requests[i] for i in todo])
        try:
            engine_groups: dict[str, tuple[dict[str, Any], list[int]]] = {}  # settings -> (settings, requests)
            hf_requests: list[int] = []
            for i in todo:
                context, gen_kwargs = requests[i].args[:2]
                settings = self._engine_settings(gen_kwargs) if self.engine == "milora" else None
                if settings is None:
                    hf_requests.append(i)
                else:
                    key = json.dumps(settings, sort_keys=True, default=str)
                    engine_groups.setdefault(key, (settings, []))[1].append(i)
            if hf_requests:
                answers = super().generate_until([requests[i] for i in hf_requests], disable_tqdm=disable_tqdm)
                for i, answer in zip(hf_requests, answers, strict=True):
                    results[i] = answer
            for settings, group in engine_groups.values():

                def answered(position: int, answer: str, group=group) -> None:  # stored as soon as it is made
                    i = group[position]
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answer)

                self._engine_generate([requests[i].args[0] for i in group], settings, answered)
        finally:
            self.cache_hook = hook
        return results

    def _engine_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The normalised settings of a request the engine answers, else None (HFLM's path)."""
        settings = engine_request_settings(gen_kwargs, self.max_gen_toks)
        if settings is not None and int(settings.get("num_beams") or 1) > 1 and not self._engine_searches_beams():
            return None
        return settings

    def _engine_searches_beams(self) -> bool:
        if self._beams_on_engine is None:
            self._beams_on_engine = self._get_engine().can_search()
            if not self._beams_on_engine:
                LOGGER.warning("beam search on milora's engine cannot drive this model: beams go to HFLM's path")
        return self._beams_on_engine

    def _get_engine(self) -> BeamSearchEngine:
        if self._engine is None:  # sets its attention on the model only while it generates
            self._engine = BeamSearchEngine(self.model, eos_token_ids(self.model, self.tokenizer), self.engine_config)
        return self._engine

    def _engine_generate(
        self, contexts: Sequence[str], settings: dict[str, Any], answered: Callable[[int, str], None]
    ) -> None:
        """Greedy or beam-search answers to `contexts` under one request's normalised `settings`, as HFLM makes
        them, each handed to `answered(position in contexts, answer)` as soon as it is generated."""
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(list(settings["until"]), eos=eos_text)
        max_gen_toks = int(settings["max_gen_toks"])
        max_context = self.max_length - max_gen_toks
        if max_context <= 0:
            raise ValueError(
                f"requested max tokens to generate ({max_gen_toks}) must be less than the model's maximum "
                f"sequence length ({self.max_length})"
            )
        prompts = [self._encode_context(context, max_context) for context in contexts]
        finish = lambda position, tokens: answered(position, self._continuation_text(tokens, until))  # noqa: E731
        num_beams = int(settings.get("num_beams") or 1)
        if num_beams > 1:  # unset, these two are the model's generation config's, as in model.generate
            penalty, early = beam_defaults(self.model.generation_config)
            penalty = settings.get("length_penalty", penalty)
            early = settings.get("early_stopping", early)
            self._get_engine().beam_search(
                prompts, max_gen_toks, num_beams, length_penalty=1.0 if penalty is None else float(penalty),
                early_stopping=False if early is None else early,
                stop=lookback_stop(self.tokenizer, until), desc="generate_until (beam search)", on_finish=finish,
            )  # fmt: skip
            return
        self._get_engine().generate(
            prompts, max_gen_toks, stop=windowed_stop(self.tokenizer, until, skip_special_tokens=False),
            desc="generate_until", stop_every=STOP_EVERY, on_finish=finish,
        )  # fmt: skip  (HF's stop-sequence check decodes special tokens too)

    def _encode_context(self, context: str, max_context: int) -> list[int]:
        """One context's tokens as HFLM's batch encoding gives them (special tokens, left truncation)."""
        encoded, mask = self.tok_batch_encode([context], left_truncate_len=max_context, truncation=self.truncation)
        return encoded[0][mask[0].bool()].tolist()

    def _continuation_text(self, tokens: list[int], until: list[str]) -> str:
        """HFLM's decoding of new tokens: thinking stripped, special tokens dropped, cut at the first stop."""
        think_end = self.think_end_token
        if isinstance(think_end, int):
            found = [i for i, token in enumerate(tokens) if token == think_end]
            tokens = tokens[found[-1] + 1 :] if found else tokens
        text = self.tok_decode(tokens)
        if isinstance(think_end, int):
            text = text.lstrip()
        return postprocess_generated_text(text, until, think_end if isinstance(think_end, str) else None)
