"""A recipe's training data, and the trainer settings that go with it, as one value.

Text data goes through `milora.data` (prompt/completion or chat rows; TRL tokenizes them and masks the prompt);
LLaVA models through `milora.sft.llava` (its own collator reads the images and masks all but the answers). The
settings each kind needs (`trainer_overrides`) are returned, not set: `recipes/sft.py` applies them in view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from milora.sft.config import RecipeError


@dataclass(frozen=True)
class TrainingData:
    """What `SFTTrainer` gets from the data: the datasets, a collator (None: TRL's own) and the `SFTConfig`
    values this data needs."""

    train_dataset: Any
    eval_dataset: Any = None
    data_collator: Any = None
    trainer_overrides: dict[str, Any] = field(default_factory=dict)


def load_training_data(recipe, processing_class) -> TrainingData:
    """The data for a recipe: LLaVA conversations for a vision-language model, formatted text rows otherwise."""
    if recipe.model.model_source.vision_language:
        return load_llava_data(recipe, processing_class)
    return load_text_data(recipe)


def load_text_data(recipe) -> TrainingData:
    """Prompt/completion rows train on the completion (TRL's default); chat rows need `assistant_only_loss`,
    which is on for them unless the recipe says otherwise."""
    from milora.data import load_sft_dataset

    data, training = recipe.data, recipe.training
    kwargs = {
        "dataset_format": data.dataset_format, "config": data.dataset_config,
        "messages_field": data.dataset_messages_field, "max_samples": data.dataset_max_samples,
    }
    train_dataset = load_sft_dataset(data.dataset_name, split=data.dataset_train_split, **kwargs)
    eval_dataset = None
    if training.eval_strategy != "no":
        eval_dataset = load_sft_dataset(data.dataset_name, split=data.dataset_test_split, **kwargs)
    overrides = {}
    if training.assistant_only_loss is None:
        overrides["assistant_only_loss"] = "messages" in train_dataset.column_names
    return TrainingData(train_dataset, eval_dataset, None, overrides)


def load_llava_data(recipe, processor) -> TrainingData:
    """LLaVA rows stay as they are (TRL must not prepare them: the collator tokenizes, and needs every column)."""
    from milora.sft.llava import build_llava_train_data

    data, training = recipe.data, recipe.training
    if training.eval_strategy != "no":
        raise RecipeError("LLaVA recipes train without an eval set; set eval_strategy: 'no'")
    train_dataset, collator = build_llava_train_data(
        data.dataset_name, data.image_folder, processor, training.max_length, data.skip_missing_images,
        max_samples=data.dataset_max_samples,
    )
    overrides = {
        "assistant_only_loss": False,
        "remove_unused_columns": False,
        "dataset_kwargs": {**(training.dataset_kwargs or {}), "skip_prepare_dataset": True},
    }
    return TrainingData(train_dataset, None, collator, overrides)
