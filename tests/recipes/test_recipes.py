"""The recipes: one per (model, task, method) the paper runs, each with the paper's hyperparameters (Appendix A.2,
Table 10), each parsing into the training dataclasses; the tiny recipes differ only in method."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from milora.sft.parsing import parse_recipe, valid_keys

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MODELS = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B"}
TASKS = {  # task: (rank, dataset, format, models the paper trains on it)
    "commonsense": (32, "zwhe99/commonsense_170k", "alpaca", ("llama2-7b", "llama3-8b")),
    "math": (64, "meta-math/MetaMathQA", "metamath", ("llama2-7b", "llama3-8b")),
    "instruct": (32, "HuggingFaceH4/ultrafeedback_binarized", "chat", ("llama2-7b",)),
}
METHODS = ("lora", "pissa", "milora")
PAPER = {
    f"{model}_{task}_{method}.yaml": (model, task, method)
    for task, (_, _, _, models) in TASKS.items() for model in models for method in METHODS
}


def test_one_recipe_per_paper_experiment():
    names = {p.name for p in RECIPES.glob("*.yaml") if not p.name.startswith(("llava", "tiny_llava"))}
    miniature = {f"smollm2_{task}_{method}.yaml" for task in ("math", "commonsense") for method in METHODS}
    assert names == set(PAPER) | miniature | {"tiny_lora.yaml", "tiny_pissa.yaml", "tiny_milora.yaml"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name):
    model, task, method = PAPER[name]
    rank, dataset, fmt, _ = TASKS[task]
    recipe = parse_recipe([str(RECIPES / name)])
    m, d, t = recipe.model, recipe.data, recipe.training
    assert m.model_name_or_path == MODELS[model] and m.method == method
    assert m.lora_r == rank and m.lora_alpha == (2 * rank if method == "lora" else rank)
    assert m.lora_dropout == 0.05
    assert m.lora_target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert d.dataset_name == dataset and d.dataset_format == fmt
    assert t.optim == "adamw_torch_fused" and t.learning_rate == 3e-4 and t.lr_scheduler_type == "linear"
    assert t.warmup_steps == 100 and t.num_train_epochs == 3
    assert t.effective_batch_size == 16
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 16  # one process here
    assert t.output_dir == f"outputs/{name.removesuffix('.yaml')}"
    assert t.report_to == ["tensorboard"] and t.merge


def test_instruction_following_uses_the_chosen_conversations():
    recipe = parse_recipe([str(RECIPES / "llama2-7b_instruct_milora.yaml")])
    assert recipe.data.dataset_train_split == "train_sft" and recipe.data.dataset_messages_field == "chosen"
    template = Path(recipe.training.chat_template_path)
    assert template.is_file() and "{% generation %}" in template.read_text()


@pytest.mark.parametrize("method", METHODS)
def test_tiny_recipes_differ_only_in_method(method):
    recipe = yaml.safe_load((RECIPES / f"tiny_{method}.yaml").read_text())
    milora = yaml.safe_load((RECIPES / "tiny_milora.yaml").read_text())
    differ = {k for k in recipe.keys() | milora.keys() if recipe.get(k) != milora.get(k)}
    assert differ <= {"method", "lora_alpha", "output_dir"}
    assert recipe["method"] == method and recipe["model_name_or_path"] == "tiny:llama"
    assert recipe["lora_alpha"] == (2 * recipe["lora_r"] if method == "lora" else recipe["lora_r"])


@pytest.mark.parametrize("path", sorted(p.name for p in RECIPES.glob("*.yaml")), ids=str)
def test_recipe_keys_are_known(path):
    known = {k for names in valid_keys().values() for k in names}
    assert set(yaml.safe_load((RECIPES / path).read_text())) <= known
