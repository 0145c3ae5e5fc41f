"""Answering visual questions with a (merged) LLaVA checkpoint: LlavaForConditionalGeneration + AutoProcessor.

Questions are wrapped in LLaVA-1.5's evaluation conversation (``vicuna_v1``: system line, ``USER: <image>\\n...
ASSISTANT:``) or in the processor's chat template, batched with left padding and decoded greedily, with a
tqdm progress bar. Works on CPU for small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval_harness.errors import UsageError
from eval_harness.vqa import VisualQuestion
from milora.loading import default_device, load_model, load_processing_class, resolve_dtype
from milora.model_source import ModelSource, model_source
from milora.prompts import VICUNA_V1_SYSTEM_PROMPT

PROMPT_STYLES = ("llava_v1", "chat")


def load_llava(path: str | ModelSource, device: str | None = None, dtype: str = "auto"):
    """Model (eval mode, on device) and processor with a left-padding tokenizer, loaded as every model is
    (`milora.loading.load_model`, `load_processing_class`)."""
    source = model_source(path)
    if not source.vision_language:
        raise UsageError(f"--model {source.name} is not a LLaVA checkpoint", "the vqa suite evaluates LLaVA models")
    device = device or default_device()
    processor = load_processing_class(source)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model = load_model(source, dtype=resolve_dtype(dtype, device))
    model.to(device).eval()
    return model, processor


def image_token_of(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def llava_prompt(processor, question: str, style: str = "llava_v1") -> str:
    """The text for one question with its image placeholder, in the given conversation style."""
    token = image_token_of(processor)
    if style == "llava_v1":
        return f"{VICUNA_V1_SYSTEM_PROMPT} USER: {token}\n{question} ASSISTANT:"
    if style == "chat":
        structured = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        try:
            return processor.apply_chat_template(structured, add_generation_prompt=True)
        except (TypeError, ValueError):  # a template that wants plain string content
            plain = [{"role": "user", "content": f"{token}\n{question}"}]
            return processor.apply_chat_template(plain, add_generation_prompt=True)
    raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")


def load_image(image):
    """A PIL RGB image from a path or an image object."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")


def _batches(questions: Sequence[VisualQuestion], batch_size: int):
    """Consecutive batches of questions that all have an image, or all have none."""
    batch: list[int] = []
    for index, question in enumerate(questions):
        if batch and (len(batch) == batch_size or (questions[batch[0]].image is None) != (question.image is None)):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


@torch.no_grad()
def answer_questions(
    model,
    processor,
    questions: Sequence[VisualQuestion],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    style: str = "llava_v1",
    desc: str = "answering",
) -> list[str]:
    """Greedy answers to the questions, in order (a question without image is asked as text only)."""
    if processor.tokenizer.padding_side != "left":
        raise ValueError("batched generation needs the tokenizer to pad on the left")
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(questions)
    token = image_token_of(processor)
    with tqdm(total=len(questions), desc=desc, unit="question") as progress:
        for batch in _batches(questions, batch_size):
            with_images = questions[batch[0]].image is not None
            texts = [llava_prompt(processor, questions[i].question, style) for i in batch]
            if with_images:
                images = [load_image(questions[i].image) for i in batch]
                encoded = processor(images=images, text=texts, return_tensors="pt", padding=True)
            else:
                texts = [t.replace(f"{token}\n", "").replace(token, "") for t in texts]
                encoded = processor.tokenizer(texts, return_tensors="pt", padding=True)
            encoded = encoded.to(device)
            if "pixel_values" in encoded:
                encoded["pixel_values"] = encoded["pixel_values"].to(model.dtype)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            continuations = generated[:, encoded["input_ids"].shape[1] :]
            for index, text in zip(batch, processor.batch_decode(continuations, skip_special_tokens=True), strict=True):
                answers[index] = text.strip()
            progress.update(len(batch))
    return answers
