"""LLaVA recipes: the paper's settings in the YAMLs, and the tiny LLaVA run end to end (offline, CPU):
training lowers the loss, only the language model carries LoRA adapters, the projector is trained and the
vision tower is not, and the merged checkpoint reloads with its processor and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT

RECIPES = REPO_ROOT / "recipes"
PAPER_RECIPES = {"llava_milora.yaml": "milora", "llava_lora.yaml": "lora", "llava_pissa.yaml": "pissa"}
TINY_RECIPE = RECIPES / "tiny_llava_milora.yaml"
TINY_JSON = RECIPES / "data" / "llava_tiny" / "llava_tiny.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name,method", sorted(PAPER_RECIPES.items()))
def test_paper_recipes_have_the_paper_settings(name, method):
    recipe = _recipe(name)
    assert recipe["model_name_or_path"] == "llava-hf/llava-1.5-7b-hf"
    assert recipe["method"] == method
    assert recipe["lora_r"] == 128
    assert recipe["lora_alpha"] == (256 if method == "lora" else 128)
    assert recipe["lora_target_modules"] == TARGETS
    assert recipe["lora_modules_to_save"] == ["multi_modal_projector"]
    assert recipe["dataset_name"] == "playground/data/llava_v1_5_mix665k.json"
    assert recipe["image_folder"] == "playground/data"
    assert recipe["skip_missing_images"] is False
    assert recipe["max_length"] == 2048
    assert recipe["learning_rate"] == pytest.approx(2e-4)
    assert recipe["lr_scheduler_type"] == "cosine"
    assert recipe["warmup_steps"] == pytest.approx(0.03)  # a ratio: transformers 5 folded warmup_ratio into it
    assert recipe["effective_batch_size"] == 16
    assert recipe["num_train_epochs"] == 1
    assert recipe["bf16"] is True and recipe["report_to"] == "tensorboard" and recipe["merge"] is True
    others = {n: _recipe(n) for n in PAPER_RECIPES if n != name}
    for other in others.values():  # the three differ only in method, alpha and output_dir
        differing = {k for k in recipe if recipe[k] != other.get(k)}
        assert differing <= {"method", "lora_alpha", "output_dir"}


def test_tiny_recipe_mirrors_the_paper_recipe():
    tiny, paper = _recipe("tiny_llava_milora.yaml"), _recipe("llava_milora.yaml")
    assert tiny["model_name_or_path"] == "tiny:llava" and tiny["method"] == "milora"
    assert tiny["lora_alpha"] == tiny["lora_r"]
    for key in ("lora_target_modules", "lora_modules_to_save", "lr_scheduler_type", "skip_missing_images"):
        assert tiny[key] == paper[key]
    assert (RECIPES / tiny["dataset_name"]).is_file()


@pytest.mark.parametrize("name", [*sorted(PAPER_RECIPES), "tiny_llava_milora.yaml"])
def test_llava_recipes_parse(name):
    """Every key is a recipe key (an unknown one is refused by the parser) and the LLaVA keys reach the run."""
    from milora.sft.parsing import parse_recipe

    # the 7B recipes name LLaVA's data, absent here: point them at the bundled tiny data to parse them
    overrides = [] if name.startswith("tiny") else [
        "--dataset_name", str(TINY_JSON), "--image_folder", str(TINY_JSON.parent), "--bf16", "false",
    ]
    recipe = parse_recipe([str(RECIPES / name), *overrides])
    assert recipe.model.lora_modules_to_save == ["multi_modal_projector"]
    assert recipe.data.skip_missing_images is False
    assert recipe.training.warmup_steps == pytest.approx(0.03)


# ----------------------------------------------------------------------------------- tiny training


def _lora_layer_names(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _generate(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reload a merged checkpoint + processor and answer one VQA question about a bundled image."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "What color is the shape?\nAnswer the question using a single word or phrase."},
    ]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("ASSISTANT:")
    image = Image.open(TINY_JSON.parent / "images" / "red_circle_white.png")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return inputs["input_ids"], out


def test_tiny_llava_trains_through_sft_trainer(tmp_path):
    """The tiny recipe's model, method and data through TRL's SFTTrainer with the LLaVA dataset + collator."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    import milora
    from milora.loading import is_vision_language
    from milora.sft.llava import build_llava_train_data
    from milora.tiny import tiny_model, tiny_processor

    recipe = _recipe("tiny_llava_milora.yaml")
    processor = tiny_processor()
    dataset, collator = build_llava_train_data(TINY_JSON, None, processor, max_length=recipe["max_length"])

    model = tiny_model("llava")
    assert is_vision_language(model)
    vision_before = _state(model.model.vision_tower)
    projector_before = _state(model.model.multi_modal_projector)
    language_before = _state(model.model.language_model)
    peft_model = milora.apply_milora(
        model, recipe["lora_target_modules"], recipe["lora_r"], method=recipe["method"],
        lora_alpha=recipe["lora_alpha"], modules_to_save=recipe["lora_modules_to_save"], show_progress=False,
    )
    assert isinstance(peft_model, PeftModel)

    # adapters on the language model's 7 projections of every layer, nowhere else
    names = _lora_layer_names(peft_model)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * n_layers
    assert all(".language_model." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(TARGETS)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)

    args = SFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=16, per_device_train_batch_size=4,
        learning_rate=recipe["learning_rate"], lr_scheduler_type="constant", logging_steps=1, report_to="none",
        bf16=False, save_strategy="no", gradient_checkpointing=False, seed=0, use_cpu=True, disable_tqdm=True,
        max_length=recipe["max_length"], assistant_only_loss=False,  # the collator masks all but the answers
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=peft_model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses

    # the adapter: LoRA on the language model + the full projector
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_keys = [k for k in saved if "lora_" in k]
    assert lora_keys and all(".language_model." in k for k in lora_keys)
    assert any("multi_modal_projector" in k for k in saved)
    assert not any("vision_tower" in k for k in saved)

    # merge: a plain LLaVA checkpoint (+ processor) that computes what the trained PEFT model computes
    batch = collator([dataset[0], dataset[len(dataset) - 1]])
    batch.pop("labels")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    milora.merge_adapter(peft_model, tmp_path / "merged", processor)
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = merged(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert _same(_state(merged.model.vision_tower), vision_before)  # frozen
    assert not _same(_state(merged.model.multi_modal_projector), projector_before)  # trained in full
    assert not _same(_state(merged.model.language_model), language_before)  # adapters merged in

    prompt_ids, generated = _generate(tmp_path / "merged")
    assert generated.shape[1] > prompt_ids.shape[1]


@pytest.mark.end_to_end
def test_sft_py_trains_the_tiny_llava_recipe(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = [
        sys.executable, str(RECIPES / "sft.py"), str(TINY_RECIPE), "--output_dir", str(out), "--max_steps", "12",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    saved = load_file(str(out / "adapter_model.safetensors"))
    lora_keys = [k for k in saved if "lora_" in k]
    assert lora_keys and all(".language_model." in k for k in lora_keys)
    assert any("multi_modal_projector" in k for k in saved)

    info = json.loads((out / "milora_run.json").read_text())
    assert info["merged"] and (out / "merged" / "config.json").is_file()
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "llava"
    prompt_ids, generated = _generate(out / "merged")
    assert generated.shape[1] > prompt_ids.shape[1]
