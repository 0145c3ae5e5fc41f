"""LLaVA-1.5 visual instruction tuning data: LLaVA conversation JSON + an image folder -> a `datasets.Dataset`
and a collator that `trl.SFTTrainer` consumes.

The data is the LLaVA format (e.g. `llava_v1_5_mix665k.json`)::

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]},
     {"id": "sharegpt_1", "conversations": [...]}]            # text-only rows have no "image"

`milora.sft.llava.build_llava_train_data` reads it once (checking that every referenced image exists), and
returns the rows as a dataset of `id`, `image` (full path, or None) and `messages` (`llava_messages`: chat
messages whose first user turn starts with the processor's image token). Images are read and processed on the
fly by `LlavaDataCollator`, as TRL does for vision datasets: the processor builds the pixel values and expands
the image token into the image's patch tokens; the labels keep only the assistant answers (and their end-of-turn
token), -100 everywhere else (system prompt, user turns, role markers, image tokens, padding).

The conversation is rendered with the LLaVA-1.5 ("vicuna_v1") format the paper trained with, written as a
chat template with `{% generation %}` markers; the assistant spans it marks are mapped onto the tokens of the
processor's output through the processor's own replacement offsets (transformers < 5.18 maps them onto the
unexpanded text, so `return_assistant_tokens_mask` cannot be used for LLaVA there). The same template is set
on the processor, so the processor saved with the adapter / merged model prompts the way training did.

Recipes route a LLaVA model (`milora.loading.is_vision_language`) to `milora.sft.llava.build_llava_train_data`,
which returns the dataset and this module's collator for `SFTTrainer` (with `remove_unused_columns=False` and
`dataset_kwargs={"skip_prepare_dataset": True}`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from milora.data import DataError
from milora.prompts import VICUNA_V1_SYSTEM_PROMPT

logger = logging.getLogger(__name__)

# LLaVA-1.5's `conv_vicuna_v1` (SeparatorStyle.TWO, seps " " and "</s>"):
#   "SYSTEM USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
# with the answers and their "</s>" (the only trained tokens) inside `{% generation %}`. No BOS in the text:
# the tokenizer adds it, as LLaVA's `tokenizer(prompt)` did, so a prompt built as plain text at evaluation
# ("SYSTEM USER: <image>\nQ ASSISTANT:", eval_harness/llava_generation.py) tokenizes the same way. Content may be a
# string (with the image token inline) or a list of {"type": "image"} / {"type": "text", "text": ...} items,
# so `processor.apply_chat_template` works with either message style at inference.
LLAVA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_V1_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}{% generation %}{{ render(message['content']) + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"llava_v1": LLAVA_V1_CHAT_TEMPLATE}

# LLaVA JSON speaker names -> chat roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

IGNORE_INDEX = -100
LLAVA_IMAGE_PLACEHOLDER = "<image>"  # what LLaVA JSON writes, whatever the processor's image token is


class LlavaDataError(DataError):
    """The LLaVA data cannot be used as configured; the message names the file or the row id (and image path)
    and the fix. A `milora.data.DataError`, so `recipes/sft.py` reports it as a one-line error."""


class LlavaImageError(LlavaDataError):
    """An image referenced by a row is missing or cannot be read; names the row id and the path."""


def llava_messages(row: dict, image_token: str = LLAVA_IMAGE_PLACEHOLDER, *, row_id: str | None = None) -> list[dict]:
    """A LLaVA row's `conversations` as chat messages ({"role", "content"}), the way LLaVA-1.5 prepares them.

    Image placeholders are removed from every turn; a row with an image gets exactly one, `image_token + "\\n"`
    at the start of its first user turn (LLaVA's `preprocess_multimodal`). Leading non-user turns other than
    a system message are dropped (as LLaVA does).
    """
    row_id = row_id if row_id is not None else str(row.get("id"))
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise LlavaDataError(f"row id={row_id}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise LlavaDataError(f"row id={row_id}: turn {index} must be an object with 'from' and 'value'")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise LlavaDataError(
                f"row id={row_id}: turn {index} has unknown speaker {turn['from']!r}; "
                f"expected one of {', '.join(ROLES)}"
            )
        value = turn["value"] if isinstance(turn["value"], str) else str(turn["value"])
        for placeholder in {LLAVA_IMAGE_PLACEHOLDER, image_token}:
            if placeholder in value:
                value = value.replace(placeholder, "").strip()
        if role == "system" and messages:
            raise LlavaDataError(f"row id={row_id}: a system turn may only come first (turn {index})")
        messages.append({"role": role, "content": value})
    start = 1 if messages[0]["role"] == "system" else 0
    while len(messages) > start and messages[start]["role"] != "user":
        del messages[start]
    if row.get("image") and len(messages) > start:
        messages[start]["content"] = image_token + "\n" + messages[start]["content"]
    return messages


def missing_image_message(row_id: str, path: str, problem: str) -> str:
    return (
        f"row id={row_id}: image {path!r} is {problem}. Check image_folder and the row's 'image' path, "
        "fix or remove the row, or set `skip_missing_images: true` to skip rows whose image is missing or unreadable."
    )


# ------------------------------------------------------------------------------------------- collator


def expand_to_square(image, background_color: tuple[int, ...]):
    """LLaVA-1.5's `expand2square` (`image_aspect_ratio: pad`): pad the short side, centred, with the mean color."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background_color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _shift_span(start: int, end: int, replacements: list[dict]) -> tuple[int, int]:
    """Map a character span of the rendered text onto the processor's expanded text (image tokens repeated)."""
    shift_start = shift_end = 0
    for rep in replacements:
        rep_start, rep_end = rep["span"]
        growth = (rep["new_span"][1] - rep["new_span"][0]) - (rep_end - rep_start)
        if rep_end <= start:
            shift_start += growth
        if rep_end <= end:
            shift_end += growth
    return start + shift_start, end + shift_end


@dataclass
class LlavaDataCollator:
    """Batches rows of the dataset from `build_llava_train_data` into LLaVA model inputs.

    Returns `input_ids`, `attention_mask`, `labels` (right padded; -100 except on assistant answers) and
    `pixel_values` (one per image row of the batch, in order; absent when the batch has no image).
    A row whose image cannot be read raises `LlavaImageError` naming the row id and path, or, with
    `skip_missing_images`, is left out of the batch with a warning and counted in `num_skipped` (per process,
    and per worker with `dataloader_num_workers`; the warning carries the running count).
    """

    processor: Any
    max_length: int | None = None
    skip_missing_images: bool = False
    chat_template: str = LLAVA_V1_CHAT_TEMPLATE
    image_aspect_ratio: str = "pad"
    pad_to_multiple_of: int | None = None
    num_skipped: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self):
        if self.image_aspect_ratio not in ("pad", "original"):
            raise ValueError(
                f"image_aspect_ratio must be 'pad' (LLaVA-1.5) or 'original', got {self.image_aspect_ratio!r}"
            )
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set processor.tokenizer.pad_token first")
        mean = getattr(self.processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self._background = tuple(int(x * 255) for x in mean)  # as LLaVA's expand2square

    # -- one row
    def load_image(self, row_id: str, path: str):
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as exc:
            problem = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({type(exc).__name__}: {exc})"
            raise LlavaImageError(missing_image_message(row_id, path, problem)) from exc
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, self._background)
        return image

    def encode(self, messages: list[dict], image=None, row_id: str = "?") -> dict[str, torch.Tensor]:
        """One conversation (and its image) -> input_ids, labels (1-D) and pixel_values (or None)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        tokenizer = self.processor.tokenizer
        rendered, generation_indices = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        text, spans = rendered[0], generation_indices[0]
        # The tokenizer adds the BOS, unless the template wrote it already (as processor.apply_chat_template).
        bos = tokenizer.bos_token
        out = self.processor(
            images=[image] if image is not None else None,
            text=[text],
            add_special_tokens=not (bos and text.startswith(bos)),
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
        )
        input_ids = out["input_ids"][0]
        offsets = out["offset_mapping"][0]
        replacements = out["text_replacement_offsets"][0] if "text_replacement_offsets" in out else []
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for start, end in spans:
            start, end = _shift_span(start, end, replacements)
            # a token belongs to the answer if it overlaps it (SentencePiece's "▁word" also covers the space before)
            inside = (offsets[:, 1] > start) & (offsets[:, 0] < end)
            labels[inside] = input_ids[inside]
        image_token_id = getattr(self.processor, "image_token_id", None)
        if image_token_id is not None:
            labels[input_ids == image_token_id] = IGNORE_INDEX
        if self.max_length is not None and input_ids.numel() > self.max_length:
            if image_token_id is not None and image is not None:
                positions = (input_ids == image_token_id).nonzero()
                if positions.numel() and int(positions.max()) >= self.max_length:
                    raise LlavaDataError(
                        f"row id={row_id}: max_length={self.max_length} cuts into the image's tokens (they end at "
                        f"token {int(positions.max()) + 1}); raise max_length"
                    )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        pixel_values = out.get("pixel_values") if image is not None else None
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}

    # -- a batch
    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = []
        for index, example in enumerate(examples):
            row_id = str(example.get("id", index))
            image = None
            if example.get("image"):
                try:
                    image = self.load_image(row_id, example["image"])
                except LlavaImageError as exc:
                    if not self.skip_missing_images:
                        raise
                    self.num_skipped += 1
                    self.skipped.append((row_id, example["image"], str(exc.__cause__ or exc)))
                    logger.warning(
                        "skip_missing_images: skipped row id=%s, image %r cannot be read (%d skipped while training)",
                        row_id, example["image"], self.num_skipped,
                    )
                    continue
            encoded.append(self.encode(example["messages"], image, row_id))
        if not encoded:
            raise LlavaImageError(
                "every row of this batch has an unreadable image (skip_missing_images could not leave any): "
                + ", ".join(f"id={r} {p!r}" for r, p, _ in self.skipped[-len(examples):])
            )
        return self.pad(encoded)

    def pad(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad_id = self.processor.tokenizer.pad_token_id
        length = max(e["input_ids"].numel() for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = e["input_ids"].numel()
            input_ids[row, :n] = e["input_ids"]
            labels[row, :n] = e["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixel_values = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        return batch


__all__ = [
    "CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "LLAVA_IMAGE_PLACEHOLDER",
    "LLAVA_V1_CHAT_TEMPLATE",
    "LlavaDataCollator",
    "LlavaDataError",
    "LlavaImageError",
    "expand_to_square",
    "llava_messages",
    "missing_image_message",
]
