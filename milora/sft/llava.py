"""LLaVA training data for a recipe: LLaVA conversation JSON + an image folder -> a `datasets.Dataset` of
`id`, `image` (full path, or None) and `messages`, and the `milora.llava_data.LlavaDataCollator` that reads the
images and masks all but the answers. The row and prompt formatting lives in `milora.llava_data`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from milora.io import read_json, read_jsonl
from milora.llava_data import (
    CHAT_TEMPLATES,
    LLAVA_IMAGE_PLACEHOLDER,
    LlavaDataCollator,
    LlavaDataError,
    LlavaImageError,
    llava_messages,
    missing_image_message,
)

logger = logging.getLogger(__name__)


def read_llava_rows(data_path: str | os.PathLike) -> list[dict]:
    """The rows of a LLaVA JSON list, a JSON object wrapping one list (`{"data": [...]}`), or a JSONL file."""
    path = Path(data_path)
    if not path.is_file():
        raise LlavaDataError(f"LLaVA data file {str(path)!r} does not exist")
    rows = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LlavaDataError(f"{path}: expected a JSON list of LLaVA rows, got an object with keys {list(rows)}")
        rows = lists[0]
    if not isinstance(rows, list):
        raise LlavaDataError(f"{path}: expected a JSON list of LLaVA rows, got {type(rows).__name__}")
    return rows


def image_of(row: dict, row_id: str) -> str | None:
    """A row's image path (relative to the image folder), or None for a text-only row."""
    image = row.get("image")
    if image is None or image == "":
        return None
    if isinstance(image, list):
        if len(image) != 1:
            raise LlavaDataError(
                f"row id={row_id}: has {len(image)} images; LLaVA-1.5 rows carry one image (a path string)"
            )
        image = image[0]
    if not isinstance(image, str):
        raise LlavaDataError(f"row id={row_id}: 'image' must be a relative path string, got {type(image).__name__}")
    return image


def image_problem(path: str, verify: bool) -> str | None:
    """Why an image file cannot be used (None if it can): missing, or (with `verify`) not a readable image."""
    if not os.path.isfile(path):
        return "missing"
    if verify:
        try:
            from PIL import Image

            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # PIL raises many types for bad files
            return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def training_chat_template(chat_template: str, processor) -> str:
    """The Jinja template for "llava_v1" (the paper's), "processor" (the processor's own, which must mark the
    assistant text with `{% generation %}`), or a template string given as is."""
    if chat_template == "processor":
        template = processor.chat_template
        if not template or "generation" not in template:
            raise ValueError(
                "chat_template='processor' needs a processor chat template with {% generation %} markers "
                "around the assistant text; use chat_template='llava_v1' instead"
            )
        return template
    template = CHAT_TEMPLATES.get(chat_template, chat_template)
    if "{%" not in template:
        raise ValueError(
            f"unknown chat_template {chat_template!r}; use 'llava_v1', 'processor' or a Jinja template string"
        )
    return template


def _log_summary(data_path, kept: int, with_image: int, skipped: list, no_answer: list) -> None:
    if skipped:
        shown = "; ".join(f"id={r} {p!r} ({why})" for r, p, why in skipped[:5])
        logger.warning(
            "skip_missing_images: skipped %d of %d rows whose image is missing or unreadable (first: %s%s)",
            len(skipped), len(skipped) + kept + len(no_answer), shown, ", ..." if len(skipped) > 5 else "",
        )
    if no_answer:
        logger.warning(
            "skipped %d rows with no assistant ('gpt') turn, nothing to learn from (first ids: %s)",
            len(no_answer), ", ".join(no_answer[:5]),
        )
    if not kept:
        raise LlavaDataError(
            f"{data_path}: no usable rows left (skipped {len(skipped)} for their image, {len(no_answer)} without "
            "an answer)"
        )
    logger.info("LLaVA data %s: %d rows (%d with an image, %d text-only)", data_path, kept, with_image,
                kept - with_image)


def build_llava_train_data(
    data_path: str | os.PathLike,
    image_folder: str | os.PathLike | None,
    processor,
    max_length: int | None = None,
    skip_missing_images: bool = False,
    *,
    chat_template: str = "llava_v1",
    image_aspect_ratio: str = "pad",
    verify_images: bool = False,
    set_processor_chat_template: bool = True,
    max_samples: int | None = None,
):
    """LLaVA conversation JSON + image folder -> `(datasets.Dataset, LlavaDataCollator)` for `trl.SFTTrainer`.

    Args:
        data_path: LLaVA-format JSON list (or JSONL) of rows {"id", "image" (optional), "conversations"}.
        image_folder: folder the rows' image paths are relative to (default: the folder of `data_path`).
        processor: the model's `LlavaProcessor` (its tokenizer needs a pad token).
        max_length: truncate each tokenized conversation (image tokens included) to this many tokens.
        skip_missing_images: skip rows whose image is missing (here) or unreadable (in the collator),
            counting them in the log, instead of raising `LlavaImageError` with the row id and path.
        chat_template: "llava_v1" (LLaVA-1.5's vicuna_v1 format, the paper's), "processor" or a Jinja string
            (`training_chat_template`).
        image_aspect_ratio: "pad" (LLaVA-1.5: pad images to a square with the mean color) or "original".
        verify_images: also open every image here (slow on 665k images) so unreadable files are caught
            before training rather than when their batch comes.
        set_processor_chat_template: set the template on `processor`, so the processor saved next to the
            adapter / merged model prompts the way training did.
        max_samples: use the first N rows only (quick runs; `dataset_max_samples`).

    Returns:
        The dataset (columns `id`, `image` = full image path or None, `messages`) and the collator. Pass them
        to SFTTrainer with `remove_unused_columns=False` and `dataset_kwargs={"skip_prepare_dataset": True}`.
        `collator.skipped` lists the (id, path, reason) of every row skipped for its image.
    """
    from datasets import Dataset

    template = training_chat_template(chat_template, processor)
    image_folder = str(Path(data_path).parent if image_folder is None else image_folder)
    if not os.path.isdir(image_folder):
        raise LlavaDataError(f"image_folder {image_folder!r} is not a directory")
    image_token = getattr(processor, "image_token", None) or LLAVA_IMAGE_PLACEHOLDER

    rows = read_llava_rows(data_path)[:max_samples]
    ids, images, messages = [], [], []
    skipped: list[tuple[str, str, str]] = []
    no_answer = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LlavaDataError(f"{data_path}: row {index} is a {type(row).__name__}, not an object")
        row_id = str(row.get("id", index))
        relative = image_of(row, row_id)
        path = None if relative is None else os.path.join(image_folder, relative)
        problem = None if path is None else image_problem(path, verify_images)
        if problem is not None:
            if not skip_missing_images:
                raise LlavaImageError(missing_image_message(row_id, path, problem))
            skipped.append((row_id, path, problem))
            continue
        row_messages = llava_messages(row, image_token, row_id=row_id)
        if not any(m["role"] == "assistant" for m in row_messages):
            no_answer.append(row_id)
            continue
        ids.append(row_id)
        images.append(path)
        messages.append(row_messages)
    del rows
    _log_summary(data_path, len(ids), sum(p is not None for p in images), skipped, no_answer)

    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    if set_processor_chat_template:
        processor.chat_template = template
    dataset = Dataset.from_dict({"id": ids, "image": images, "messages": messages})
    collator = LlavaDataCollator(
        processor=processor, max_length=max_length, skip_missing_images=skip_missing_images,
        chat_template=template, image_aspect_ratio=image_aspect_ratio,
    )
    collator.skipped.extend(skipped)
    collator.num_skipped = len(skipped)
    return dataset, collator
