"""Batched greedy generation with a causal LM checkpoint, for the suites that lm-eval does not drive
(AlpacaEval, FollowBench).

Prompts are sorted by length, left-padded into batches (so every prompt ends where generation starts),
decoded greedily and cut at the first stop string; outputs come back in the order of the prompts.
Works on CPU for small models; shows a tqdm progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from milora.loading import default_device, resolve_dtype
from milora.model_source import ModelSource, model_source
from milora.prompts import alpaca_prompt

PROMPT_FORMATS = ("alpaca", "chat", "raw")
__all__ = ["PROMPT_FORMATS", "GenerationConfig", "format_prompt", "generate", "load_causal_lm", "truncate_at_stop"]


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
    max_new_tokens: int = 512
    batch_size: int = 8
    stop: tuple[str, ...] = ()
    num_beams: int = 1


def _needs_bos(tokenizer, prompts: Sequence[str]) -> bool:
    """Let the tokenizer add its special tokens unless the prompts (e.g. from a chat template) start with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and all(p.startswith(bos) for p in prompts))


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], config: GenerationConfig, desc: str = "generating") -> list[str]:
    """Greedy continuations of the prompts, batched with left padding, in prompt order."""
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
            progress.update(len(batch_ids))
    return outputs
