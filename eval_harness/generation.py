"""Generation with a causal LM checkpoint for the suites that lm-eval does not drive (AlpacaEval, FollowBench)
and for scripts: greedy or beam search, cut at the first stop string, in the order of the prompts.

`GenerationConfig.engine` picks how: ``milora`` (the default) runs milora's generation engine
(`eval_harness.engine`: continuous batching, concurrency from free memory, CUDA graphs on a GPU; a sequence
whose text reaches a stop string ends there), ``hf`` runs `model.generate` on left-padded batches of
``batch_size`` prompts, sorted by length. Both give `model.generate`'s tokens (on CPU in float32: tested). A model
the engine cannot drive (not a decoder using transformers' attention interface, or whose generation config adds
logits processors such as a ``repetition_penalty``) goes to the ``hf`` path with one warning. Works on CPU for
small models; shows a tqdm progress bar.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from milora.loading import default_device, resolve_dtype
from milora.model_source import ModelSource, model_source
from milora.prompts import alpaca_prompt

LOGGER = logging.getLogger(__name__)
PROMPT_FORMATS = ("alpaca", "chat", "raw")
ENGINES = ("milora", "hf")
__all__ = [
    "ENGINES", "PROMPT_FORMATS", "GenerationConfig", "format_prompt", "generate", "load_causal_lm", "truncate_at_stop",
]  # fmt: skip


def load_causal_lm(path: str | ModelSource, device: str | None = None, dtype: str = "auto"):
    """Model (eval mode, on device) and a tokenizer that left-pads and has a pad token, from a checkpoint
    directory, a hub id, a `.gguf` file or `tiny:<kind>` (or its `ModelSource`); dtype `auto` is bfloat16 on a
    GPU that supports it, float32 elsewhere."""
    from transformers import ProcessorMixin

    from milora.loading import load_model, load_processing_class

    path = model_source(path)
    device = device or default_device()
    # The model first: load_model names the mistake of a folder without config.json (an adapter folder, say).
    model = load_model(path, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    tokenizer = load_processing_class(path)
    if isinstance(tokenizer, ProcessorMixin):  # a LLaVA checkpoint: its language model's tokenizer
        tokenizer = tokenizer.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def format_prompt(instruction: str, tokenizer, prompt_format: str = "alpaca") -> str:
    """The text fed to the model for an instruction: Alpaca template, the tokenizer's chat template, or as is."""
    if prompt_format == "alpaca":
        return alpaca_prompt(instruction)
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    if prompt_format == "raw":
        return instruction
    raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop string (the stop string itself removed)."""
    cut = len(text)
    for marker in stop:
        if marker:
            position = text.find(marker)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


@dataclass
class GenerationConfig:
    """batch_size: prompts per `model.generate` call of the ``hf`` engine (milora's engine chooses its own
    concurrency)."""

    max_new_tokens: int = 512
    batch_size: int = 8
    stop: tuple[str, ...] = ()
    num_beams: int = 1
    engine: str = "milora"


def _needs_bos(tokenizer, prompts: Sequence[str]) -> bool:
    """Let the tokenizer add its special tokens unless the prompts (e.g. from a chat template) start with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and all(p.startswith(bos) for p in prompts))


def generate(model, tokenizer, prompts: Sequence[str], config: GenerationConfig, desc: str = "generating",
             on_answer: Callable[[int, str], None] | None = None) -> list[str]:
    """The continuation of each prompt (greedy, or beam search with ``config.num_beams``), cut at the first stop
    string and stripped, in prompt order. `on_answer(i, text)` is called as soon as prompt i's answer is made
    (to store it, say)."""
    if config.engine not in ENGINES:
        raise ValueError(f"engine={config.engine!r} is not one of {', '.join(ENGINES)}")
    engine = _engine_for(model, tokenizer, config.num_beams) if config.engine == "milora" else None
    if engine is None:
        return _generate_hf(model, tokenizer, prompts, config, desc, on_answer)
    return _generate_on_engine(engine, tokenizer, prompts, config, desc, on_answer)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its engine (compiled once per model)


def _engine_for(model, tokenizer, num_beams: int):
    """milora's engine for `model`, or None (with a warning saying why) where it cannot give `model.generate`'s
    tokens."""
    from eval_harness.engine import BeamSearchEngine, eos_token_ids, unsupported_reason

    reason = unsupported_reason(model)
    if reason is None:
        if model not in _ENGINES:
            _ENGINES[model] = BeamSearchEngine(model, eos_token_ids(model, tokenizer))
        if num_beams > 1 and not _ENGINES[model].can_search():
            reason = f"its beam search cannot drive {type(model).__name__}"
    if reason:
        LOGGER.warning("milora's generation engine is not used (%s): generating with model.generate", reason)
        return None
    return _ENGINES[model]


def _generate_on_engine(engine, tokenizer, prompts: Sequence[str], config: GenerationConfig, desc: str,
                        on_answer: Callable[[int, str], None] | None) -> list[str]:
    from eval_harness.engine import beam_defaults
    from eval_harness.engine.stops import STOP_EVERY, windowed_stop

    ids = [tokenizer(p, add_special_tokens=_needs_bos(tokenizer, [p]))["input_ids"] for p in prompts]
    answers: list[str] = [""] * len(prompts)

    def finish(i: int, tokens: list[int]) -> None:
        answers[i] = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), config.stop).strip()
        if on_answer is not None:
            on_answer(i, answers[i])

    if config.num_beams > 1:
        length_penalty, early_stopping = beam_defaults(engine.model.generation_config)
        engine.beam_search(ids, config.max_new_tokens, config.num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, desc=desc, on_finish=finish)  # fmt: skip
    else:
        stop = windowed_stop(tokenizer, config.stop, skip_special_tokens=True)  # as the answers are decoded
        engine.generate(ids, config.max_new_tokens, stop=stop, desc=desc, stop_every=STOP_EVERY, on_finish=finish)
    return answers


@torch.no_grad()
def _generate_hf(model, tokenizer, prompts: Sequence[str], config: GenerationConfig, desc: str,
                 on_answer: Callable[[int, str], None] | None = None) -> list[str]:
    """`model.generate` on left-padded batches of prompts of similar length."""
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs tokenizer.padding_side == 'left'")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
        for start in range(0, len(order), config.batch_size):
            batch_ids = order[start : start + config.batch_size]
            batch_prompts = [prompts[i] for i in batch_ids]
            encoded = tokenizer(
                batch_prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=_needs_bos(tokenizer, batch_prompts),
            ).to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                num_beams=config.num_beams,
                pad_token_id=tokenizer.pad_token_id,
            )
            continuations = generated[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
            for index, text in zip(batch_ids, texts, strict=True):
                outputs[index] = truncate_at_stop(text, config.stop).strip()
                if on_answer is not None:
                    on_answer(index, outputs[index])
            progress.update(len(batch_ids))
    return outputs
