"""`milora.llava_data` and `milora.sft.llava`: LLaVA conversation JSON -> dataset + collator (labels on assistant
answers only), missing/unreadable images, the LLaVA-1.5 prompt format. Offline, tiny processor, seconds."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from milora.llava_data import (
    IGNORE_INDEX,
    LLAVA_V1_CHAT_TEMPLATE,
    LlavaDataError,
    LlavaImageError,
    expand_to_square,
    llava_messages,
)
from milora.loading import is_vision_language
from milora.prompts import VICUNA_V1_SYSTEM_PROMPT
from milora.sft.llava import build_llava_train_data
from milora.tiny import tiny_config, tiny_model, tiny_processor
from tests.conftest import REPO_ROOT

TINY_DATA = REPO_ROOT / "recipes" / "data" / "llava_tiny"
TINY_JSON = TINY_DATA / "llava_tiny.json"
IMAGE_TOKENS = 16  # tiny:llava: 32x32 images, patch 8 -> 4*4 (+1 CLS, -1 for the "default" feature strategy)
IMAGE_ID = 4


@pytest.fixture
def processor():
    return tiny_processor()


def _decode(processor, ids) -> str:
    return processor.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _answers(processor, labels) -> str:
    return _decode(processor, labels[labels != IGNORE_INDEX])


def _write_rows(tmp_path: Path, rows: list[dict], images: dict[str, object] | None = None) -> Path:
    for name, content in (images or {}).items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(target)
        else:
            target.write_bytes(content)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path


def _row(row_id, image=None, answer="Red"):
    row = {
        "id": row_id,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + "What color is it?"},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        row["image"] = image
    return row


# ------------------------------------------------------------------------------------------ rows


def test_llava_messages_follow_llava_preprocessing():
    row = {
        "id": 7,
        "image": "a.png",
        "conversations": [
            {"from": "gpt", "value": "leading answer without a question"},
            {"from": "human", "value": "Describe it.\n<image>"},
            {"from": "gpt", "value": "A red circle."},
            {"from": "human", "value": "Bigger?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    messages = llava_messages(row)
    assert messages == [
        {"role": "user", "content": "<image>\nDescribe it."},  # image token moved to the front, as LLaVA does
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Bigger?"},
        {"role": "assistant", "content": "No."},
    ]
    text_only = {"id": "t",
                 "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}]}
    assert llava_messages(text_only)[0]["content"] == "Hi"  # no image -> no image token left behind
    no_token = {"id": "n", "image": "x.png",
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert llava_messages(no_token)[0]["content"] == "<image>\nQ"


def test_unknown_speaker_names_the_row():
    row = {"id": "row-9", "conversations": [{"from": "robot", "value": "x"}]}
    with pytest.raises(LlavaDataError, match="row id=row-9.*robot"):
        llava_messages(row)


def test_bundled_tiny_data_loads(processor):
    dataset, collator = build_llava_train_data(TINY_JSON, TINY_DATA, processor, max_length=512)
    assert dataset.column_names == ["id", "image", "messages"]
    assert len(dataset) == 28
    with_image = [p for p in dataset["image"] if p]
    assert len(with_image) == 24 and all(os.path.isfile(p) for p in with_image)
    assert collator.num_skipped == 0
    # image_folder defaults to the JSON's folder
    dataset2, _ = build_llava_train_data(TINY_JSON, None, tiny_processor())
    assert dataset2["image"] == dataset["image"]


# ------------------------------------------------------------------------------------- collator


def test_labels_mask_everything_but_assistant_answers(processor):
    dataset, collator = build_llava_train_data(TINY_JSON, TINY_DATA, processor, max_length=512)
    by_id = {row_id: i for i, row_id in enumerate(dataset["id"])}
    rows = [dataset[by_id["tiny-001"]], dataset[by_id["tiny-text-026"]], dataset[by_id["tiny-000"]]]
    batch = collator(rows)

    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # the two image rows, in order
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert input_ids.shape == labels.shape == mask.shape

    # only the answers and their end-of-turn token are trained, in every row
    assert _answers(processor, labels[0]) == "Square</s>White</s>"
    assert _answers(processor, labels[1]) == "Three.</s>"
    assert _answers(processor, labels[2]) == "Red</s>"
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], input_ids[trained])
    # image tokens: the processor expanded each row's single placeholder into 16, none of them trained
    assert (input_ids[0] == IMAGE_ID).sum() == IMAGE_TOKENS
    assert (input_ids[1] == IMAGE_ID).sum() == 0
    assert (input_ids[2] == IMAGE_ID).sum() == IMAGE_TOKENS
    assert not trained[input_ids == IMAGE_ID].any()
    # padding: right side, attention 0, never trained
    assert (mask[1] == 0).any() and not trained[mask == 0].any()
    assert (input_ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    lengths = mask.sum(1)
    for row in range(3):
        assert mask[row, : lengths[row]].all()

    # the text is LLaVA-1.5's conv_vicuna_v1 prompt, exactly (this tokenizer adds no BOS; a Llama one does)
    text = _decode(processor, input_ids[2][: lengths[2]]).replace("<image>" * IMAGE_TOKENS, "<image>")
    assert text == (
        f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat color is the shape?\n"
        "Answer the question using a single word or phrase. ASSISTANT: Red</s>"
    )


def test_multi_turn_labels_and_format(processor, tmp_path):
    rows = [{
        "id": "mt",
        "image": "img.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"},
        ],
    }]
    path = _write_rows(tmp_path, rows, {"img.png": Image.new("RGB", (32, 32), "red")})
    dataset, collator = build_llava_train_data(path, tmp_path, processor)
    batch = collator([dataset[0]])
    text = _decode(processor, batch["input_ids"][0]).replace("<image>" * IMAGE_TOKENS, "<image>")
    assert text == f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    assert _answers(processor, batch["labels"][0]) == "A1</s>A2</s>"


def test_text_only_batch_has_no_pixel_values(processor):
    dataset, collator = build_llava_train_data(TINY_JSON, TINY_DATA, processor)
    text_rows = [dataset[i] for i in range(len(dataset)) if dataset[i]["image"] is None]
    batch = collator(text_rows)
    assert "pixel_values" not in batch
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() > 0


def test_processor_chat_template_option(processor):
    """chat_template: processor uses the processor's own template (it must mark the answers)."""
    dataset, collator = build_llava_train_data(TINY_JSON, TINY_DATA, processor, chat_template="processor")
    batch = collator([dataset[1]])
    assert _decode(processor, batch["input_ids"][0]).startswith("<s>### User:\n<image>")
    assert _answers(processor, batch["labels"][0]) == "Square</s>White</s>"
    no_markers = tiny_processor()
    no_markers.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        build_llava_train_data(TINY_JSON, TINY_DATA, no_markers, chat_template="processor")


def test_sentencepiece_style_answer_tokens_are_trained(tmp_path):
    """With a Llama-like tokenizer (it adds the BOS; the answer's first token carries the space before it,
    '▁Blue') the answer is trained whole, not lost at the span boundary, and the text has a single BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["▁USER:", "▁ASSISTANT:", "▁Red", "▁Blue", "▁What", "▁color?", "\n", "▁A", "▁chat"]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    path = _write_rows(tmp_path, [_row("sp", "i.png", answer="Blue")], {"i.png": Image.new("RGB", (32, 32), "blue")})
    dataset, collator = build_llava_train_data(path, tmp_path, processor)
    batch = collator([dataset[0]])
    labels = batch["labels"][0]
    trained = tokenizer.convert_ids_to_tokens([int(i) for i in labels[labels != IGNORE_INDEX]])
    assert trained == ["▁Blue", "</s>"]
    ids = batch["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    assert tokenizer.convert_ids_to_tokens([int(ids[1])]) == ["▁A"]  # "A chat between ...", as LLaVA tokenized it
    assert (batch["input_ids"][0] == tokenizer.convert_tokens_to_ids("<image>")).sum() == IMAGE_TOKENS


def test_non_square_images_are_padded_like_llava(processor, tmp_path):
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    square = expand_to_square(wide, (10, 20, 30))
    assert square.size == (64, 64)
    assert square.getpixel((0, 0)) == (10, 20, 30) and square.getpixel((32, 32)) == (255, 0, 0)
    path = _write_rows(tmp_path, [_row("w", "wide.png")], {"wide.png": wide})
    dataset, collator = build_llava_train_data(path, tmp_path, processor)
    pixels = collator([dataset[0]])["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    # top rows are the (normalised) mean color, not red: padded, not center-cropped
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    top = pixels[0, :, 0, 16]
    expected = (torch.tensor(collator._background) / 255 - mean) / std
    assert torch.allclose(top, expected, atol=0.05)
    _, original = build_llava_train_data(path, tmp_path, tiny_processor(), image_aspect_ratio="original")
    assert not torch.allclose(original([dataset[0]])["pixel_values"][0, :, 0, 16], expected, atol=0.05)


def test_max_length_truncates_but_never_cuts_image_tokens(processor, tmp_path):
    path = _write_rows(tmp_path, [_row("long", "i.png", answer="R" * 200)], {"i.png": Image.new("RGB", (32, 32))})
    dataset, collator = build_llava_train_data(path, tmp_path, processor, max_length=260)
    batch = collator([dataset[0]])
    assert batch["input_ids"].shape == (1, 260)
    assert (batch["input_ids"] == IMAGE_ID).sum() == IMAGE_TOKENS
    _, short = build_llava_train_data(path, tmp_path, tiny_processor(), max_length=100)
    with pytest.raises(LlavaDataError, match="row id=long.*max_length=100"):
        short([dataset[0]])


# ----------------------------------------------------------------------------- missing / unreadable


def test_missing_image_is_a_clear_error(processor, tmp_path):
    rows = [_row("ok-1", "ok.png"), _row("gone-2", "coco/train2017/missing.jpg")]
    path = _write_rows(tmp_path, rows, {"ok.png": Image.new("RGB", (32, 32))})
    with pytest.raises(LlavaImageError) as info:
        build_llava_train_data(path, tmp_path, processor)
    message = str(info.value)
    assert "row id=gone-2" in message
    assert str(tmp_path / "coco/train2017/missing.jpg") in message
    assert "missing" in message and "skip_missing_images" in message


def test_skip_missing_images_skips_and_counts(processor, tmp_path, caplog):
    rows = [_row("ok-1", "ok.png"), _row("gone-2", "gone.png"), _row("text-3"), _row("gone-4", "sub/gone.jpg")]
    path = _write_rows(tmp_path, rows, {"ok.png": Image.new("RGB", (32, 32))})
    with caplog.at_level(logging.WARNING, logger="milora"):
        dataset, collator = build_llava_train_data(path, tmp_path, processor, skip_missing_images=True)
    assert dataset["id"] == ["ok-1", "text-3"]
    assert collator.num_skipped == 2
    assert [s[0] for s in collator.skipped] == ["gone-2", "gone-4"]
    log = caplog.text
    assert "skipped 2 of 4 rows" in log and "gone-2" in log and "gone.png" in log
    assert collator([dataset[0], dataset[1]])["pixel_values"].shape[0] == 1


def test_unreadable_image_error_and_skip(processor, tmp_path, caplog):
    rows = [_row("good", "good.png"), _row("bad-7", "bad.jpg")]
    path = _write_rows(tmp_path, rows, {"good.png": Image.new("RGB", (32, 32)), "bad.jpg": b"not an image"})

    # exists, so the (fast) build check passes; the collator names the row when its batch comes
    dataset, collator = build_llava_train_data(path, tmp_path, processor)
    with pytest.raises(LlavaImageError, match=r"row id=bad-7: image .*bad\.jpg' is unreadable"):
        collator([dataset[0], dataset[1]])

    # verify_images catches it up front
    with pytest.raises(LlavaImageError, match=r"row id=bad-7.*unreadable"):
        build_llava_train_data(path, tmp_path, tiny_processor(), verify_images=True)

    # skip: dropped from the batch, counted, logged
    dataset, collator = build_llava_train_data(path, tmp_path, tiny_processor(), skip_missing_images=True)
    with caplog.at_level(logging.WARNING, logger="milora"):
        batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert collator.num_skipped == 1 and collator.skipped[0][0] == "bad-7"
    assert "bad-7" in caplog.text
    with pytest.raises(LlavaImageError, match="every row of this batch"):
        collator([dataset[1]])


def test_bad_data_file_errors(processor, tmp_path):
    from milora.data import DataError

    with pytest.raises(DataError, match="does not exist"):
        build_llava_train_data(tmp_path / "nope.json", tmp_path, processor)
    path = _write_rows(tmp_path, [_row("a")])
    with pytest.raises(LlavaDataError, match="image_folder"):
        build_llava_train_data(path, tmp_path / "no_folder", processor)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": "hello"}]))
    with pytest.raises(LlavaDataError, match="row id=x"):
        build_llava_train_data(bad, tmp_path, processor)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(_row(f"j{i}")) for i in range(3)) + "\n")
    dataset, _ = build_llava_train_data(jsonl, tmp_path, processor)
    assert dataset["id"] == ["j0", "j1", "j2"]
    dataset, _ = build_llava_train_data(jsonl, tmp_path, processor, max_samples=2)
    assert dataset["id"] == ["j0", "j1"]


# ------------------------------------------------------------------------------- processor / model


def test_processor_gets_the_training_template_for_inference(processor, tmp_path):
    build_llava_train_data(TINY_JSON, TINY_DATA, processor)
    assert processor.chat_template == LLAVA_V1_CHAT_TEMPLATE
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat color is it? ASSISTANT:"
    # saved and reloaded with the processor
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path / "proc")
    assert AutoProcessor.from_pretrained(tmp_path / "proc").chat_template == LLAVA_V1_CHAT_TEMPLATE


def test_training_prompt_is_the_vqa_generators_prompt(processor):
    """eval_harness asks LLaVA-1.5 questions as plain vicuna_v1 text: the same text training used."""
    generation = pytest.importorskip("eval_harness.llava_generation")
    build_llava_train_data(TINY_JSON, TINY_DATA, processor)
    question = "What color is the shape?\nAnswer the question using a single word or phrase."
    for style in ("llava_v1", "chat"):
        assert generation.llava_prompt(processor, question, style) == (
            f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"
        )


def test_is_vision_language():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llava")
    assert is_vision_language(model) and is_vision_language(model.config)
    assert is_vision_language(tiny_config("llava"))
    assert is_vision_language("tiny:llava") and not is_vision_language("tiny:llama")
    assert not is_vision_language(tiny_model("llama")) and not is_vision_language(tiny_config("llama"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert is_vision_language(peft_model)
