"""`milora.sft.parsing` and `milora.sft.config`: a YAML recipe parses into the HF/TRL dataclasses the TrlParser
way, with the toolkit's defaults, command-line overrides, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from milora.sft.config import MiloraSFTConfig, RecipeError, resolve_resume_checkpoint
from milora.sft.outputs import initial_adapter_mismatch
from milora.sft.parsing import parse_recipe, valid_keys

REPO_ROOT = Path(__file__).resolve().parents[3]
TINY = str(REPO_ROOT / "recipes" / "tiny_milora.yaml")
DATA = str(REPO_ROOT / "recipes" / "data" / "tiny_math.jsonl")


def write(tmp_path: Path, **recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "tiny:llama", "dataset_name": DATA,
                                    "output_dir": str(tmp_path / "out"), **recipe}))
    return str(path)


def test_positional_recipe_and_config_flag_agree():
    a, b = parse_recipe([TINY]), parse_recipe(["--config", TINY])
    assert a.model == b.model and a.data == b.data and a.training.learning_rate == b.training.learning_rate
    assert a.model.method == "milora" and a.model.lora_r == 8 and a.training.learning_rate == 1e-2


def test_the_deepspeed_launchers_local_rank_may_precede_the_recipe():
    recipe = parse_recipe(["--local_rank=1", TINY, "--lora_r", "4"])
    assert recipe.training.local_rank == 1 and recipe.model.lora_r == 4 and recipe.path == TINY


def test_command_line_overrides_any_key():
    recipe = parse_recipe([TINY, "--learning_rate", "1e-4", "--lora_r", "4", "--method", "PiSSA",
                           "--lora_target_modules", "q_proj", "v_proj", "--num_train_epochs=5"])
    assert recipe.training.learning_rate == 1e-4 and recipe.training.num_train_epochs == 5
    assert recipe.model.lora_r == 4 and recipe.model.method == "pissa"
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("given", [["q_proj,v_proj"], ["q_proj", "v_proj"], ["q_proj, v_proj"], ["q_proj,", "v_proj"]])
def test_list_keys_take_comma_or_space_separated_values(given):
    """`--lora_target_modules q_proj,v_proj` selects the two modules, as the space-separated form does."""
    recipe = parse_recipe([TINY, "--lora_target_modules", *given, "--lora_modules_to_save", "lm_head,embed_tokens"])
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.model.lora_modules_to_save == ["lm_head", "embed_tokens"]


def test_a_regex_with_a_comma_stays_whole():
    recipe = parse_recipe([TINY, "--lora_target_modules", r"model\.layers\.[0-9]{1,2}\.self_attn\.(q|v)_proj"])
    assert recipe.model.lora_target_modules == [r"model\.layers\.[0-9]{1,2}\.self_attn\.(q|v)_proj"]


def test_dashed_and_negated_flags():
    recipe = parse_recipe([TINY, "--lora-r", "4", "--no_step0_check", "--merge", "false"])
    assert recipe.model.lora_r == 4 and not recipe.training.merge and not recipe.training.step0_check
    with pytest.raises(RecipeError, match="unknown recipe key.*no_merge"):
        parse_recipe([TINY, "--no_merge"])


def test_two_recipes_are_refused():
    with pytest.raises(RecipeError, match="two recipes given"):
        parse_recipe([TINY, "--config", TINY])


def test_keys_are_the_dataclass_fields():
    keys = valid_keys()
    assert {"dataset_name", "dataset_format", "dataset_train_split"} <= set(keys["DataArguments"])
    assert {"model_name_or_path", "method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
            "milora_init_dir", "dtype", "attn_implementation"} <= set(keys["ModelArguments"])
    assert {"learning_rate", "max_length", "packing", "padding_free", "completion_only_loss", "merge",
            "resume_from_checkpoint", "effective_batch_size"} <= set(keys["MiloraSFTConfig"])


def test_unknown_key_error_lists_valid_keys(tmp_path):
    with pytest.raises(RecipeError) as error:
        parse_recipe([write(tmp_path, lora_dropuot=0.1, warmup=3)])
    message = str(error.value)
    assert "unknown recipe keys 'lora_dropuot' (did you mean lora_dropout" in message and "'warmup'" in message
    assert "ModelArguments: model_name_or_path" in message and "MiloraSFTConfig:" in message


def test_env_block_sets_environment(tmp_path):
    parse_recipe([write(tmp_path, env={"MILORA_TEST_ENV": "yes"})])
    assert os.environ.pop("MILORA_TEST_ENV") == "yes"


@pytest.mark.parametrize("method,alpha", [("lora", 16), ("pissa", 8), ("milora", 8), ("mid", 8), ("random", 8)])
def test_alpha_defaults_follow_the_paper(tmp_path, method, alpha):
    assert parse_recipe([write(tmp_path, method=method, lora_r=8)]).model.lora_alpha == alpha


def test_defaults(tmp_path):
    recipe = parse_recipe([write(tmp_path)])
    training: MiloraSFTConfig = recipe.training
    assert training.report_to == ["tensorboard"]
    assert training.bf16 is False  # no GPU here; on by default where a GPU supports it
    assert recipe.model.attn_implementation == "sdpa" and recipe.model.method == "milora"
    assert recipe.model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert training.assistant_only_loss is None  # decided from the data: on for chat rows


def test_effective_batch_size_sets_accumulation(tmp_path):
    recipe = parse_recipe([write(tmp_path, effective_batch_size=16, per_device_train_batch_size=4)])
    assert recipe.training.gradient_accumulation_steps == 4
    recipe = parse_recipe([write(tmp_path, effective_batch_size=16, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=4)])
    assert recipe.training.gradient_accumulation_steps == 4


def test_paths_resolve_beside_the_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.jsonl").write_text('{"query": "q", "response": "r"}\n')
    recipe = parse_recipe([write(tmp_path, dataset_name="data/m.jsonl")])
    assert recipe.data.dataset_name == str(tmp_path / "data" / "m.jsonl")


def test_hub_ids_stay_hub_ids(tmp_path):
    recipe = parse_recipe([write(tmp_path, dataset_name="meta-math/MetaMathQA",
                                 model_name_or_path="meta-llama/Llama-2-7b-hf")])
    assert recipe.data.dataset_name == "meta-math/MetaMathQA"
    assert recipe.model.model_name_or_path == "meta-llama/Llama-2-7b-hf"


def test_resume_values(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint(False, str(tmp_path)) is None
    assert resolve_resume_checkpoint("false", str(tmp_path)) is None
    for step in (3, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-16").mkdir()  # a save that was cut short: trainer_state.json, written last, is partial
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text('{"global_step": 1')
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert resolve_resume_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-12")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-3"), "x") == str(tmp_path / "checkpoint-3")
    with pytest.raises(RecipeError, match="no complete checkpoint-N directory"):
        resolve_resume_checkpoint(True, str(tmp_path / "empty"))


def test_resume_refuses_deepspeed_shards_without_latest(tmp_path):
    """What a node other than the first holds on a node-local disk: its ranks' shards, no `latest`."""
    shards = tmp_path / "checkpoint-4" / "global_step4"
    shards.mkdir(parents=True)
    (shards / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(RecipeError, match="copy every node's checkpoint-N/"):
        resolve_resume_checkpoint(True, str(tmp_path))
    (tmp_path / "checkpoint-4" / "latest").write_text("global_step4")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))  # from node 0
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    from milora import apply_milora, save_init_dir
    from milora.tiny import tiny_model, tiny_tokenizer

    out = tmp_path_factory.mktemp("init")
    peft_model = apply_milora(tiny_model("llama"), "q_proj,v_proj", 4, method="pissa", show_progress=False)
    save_init_dir(peft_model, out, tiny_tokenizer(), source_model="tiny:llama")
    return out


def test_init_dir_supplies_method_rank_and_targets(tmp_path, init_dir):
    recipe = parse_recipe([write(tmp_path, milora_init_dir=str(init_dir))])
    assert recipe.model.method == "pissa" and recipe.model.lora_r == 4 and recipe.model.lora_alpha == 4
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("key,value", [("method", "milora"), ("lora_r", 8), ("lora_alpha", 16)])
def test_init_dir_contradicted_by_the_recipe(tmp_path, init_dir, key, value):
    with pytest.raises(RecipeError, match=f"{key}: {value} contradicts milora_init_dir"):
        parse_recipe([write(tmp_path, milora_init_dir=str(init_dir), **{key: value})])


@pytest.mark.parametrize("targets", [
    ["q_proj"],                                                  # a subset
    "q_proj,k_proj",                                             # a comma string naming other modules
    ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],      # the default list, set explicitly
    "all-linear",
    r".*\.(q|o)_proj",                                          # a regex selecting other modules
])
def test_init_dir_targets_contradicted_by_the_recipe(tmp_path, init_dir, targets):
    """The init directory's adapter trains as saved: targets the recipe names that select other modules are
    refused before anything loads, instead of being silently replaced by the init directory's."""
    with pytest.raises(RecipeError) as error:
        parse_recipe([write(tmp_path, milora_init_dir=str(init_dir), lora_target_modules=targets)])
    message = str(error.value)
    assert message.startswith("lora_target_modules: ") and f"contradicts milora_init_dir {init_dir}" in message
    assert "built with targets q_proj,v_proj (4 modules)" in message
    assert "drop lora_target_modules from the recipe" in message and "re-run `milora init --targets" in message


@pytest.mark.parametrize("targets", [["v_proj", "q_proj"], "q_proj,v_proj", " v_proj , q_proj ", r".*\.(q|v)_proj",
                                     ["self_attn.q_proj", "self_attn.v_proj"]])
def test_init_dir_targets_spelled_otherwise_run(tmp_path, init_dir, targets):
    """Targets that select the init directory's modules are accepted however they are spelled, and so are method
    and rank equal to the init directory's; the run trains the init directory's adapter."""
    recipe = parse_recipe([write(tmp_path, milora_init_dir=str(init_dir), lora_target_modules=targets,
                                 method="pissa", lora_r=4)])
    assert recipe.model.lora_target_modules == ["q_proj", "v_proj"] and recipe.model.recipe_target_modules == targets
    assert (recipe.model.method, recipe.model.lora_r) == ("pissa", 4)


def test_all_linear_init_dir_targets(tmp_path):
    """An all-linear init directory's adapter names every adapted module; the recipe's all-linear (or the same
    list) selects them too, a shorter list does not."""
    from milora import apply_milora, save_init_dir
    from milora.tiny import tiny_model, tiny_tokenizer

    init = tmp_path / "init"
    peft_model = apply_milora(tiny_model("llama"), "all-linear", 4, show_progress=False)
    save_init_dir(peft_model, init, tiny_tokenizer(), targets="all-linear")
    recipe = parse_recipe([write(tmp_path, milora_init_dir=str(init), lora_target_modules="all-linear")])
    assert len(recipe.model.lora_target_modules) == 14  # 7 linear layers x 2 decoder layers, not lm_head
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert parse_recipe([write(tmp_path, milora_init_dir=str(init), lora_target_modules=linear)])
    with pytest.raises(RecipeError, match=r"built with targets all-linear \(14 modules\)"):
        parse_recipe([write(tmp_path, milora_init_dir=str(init), lora_target_modules=linear[:-1])])


def test_init_dir_refuses_lora(tmp_path, init_dir):
    with pytest.raises(RecipeError, match="cannot be combined with method: lora"):
        parse_recipe([write(tmp_path, milora_init_dir=str(init_dir), method="lora")])


def test_initial_adapter_comparison_is_sign_invariant(tmp_path, init_dir):
    """Resuming rebuilds the init; an SVD may return a singular pair with both signs flipped, which is the same
    B0 A0 and so the same residual, while another rank or method is not."""
    import torch
    from peft import PeftModel

    from milora import load_init_dir

    model = load_init_dir(init_dir)
    saved = init_dir / "milora_init"
    assert initial_adapter_mismatch(model, saved) is None
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight[1] *= -1
        layer.lora_B["default"].weight[:, 1] *= -1
    assert initial_adapter_mismatch(model, saved) is None
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 0] *= 1.5
    assert "layers.0.self_attn.q_proj" in initial_adapter_mismatch(model, saved)
    assert isinstance(model, PeftModel)


def test_the_model_source_is_decided_once_where_the_recipe_is_parsed(tmp_path, init_dir):
    """What the run loads: model_name_or_path, or the milora_init_dir when one is given."""
    from milora import model_source

    plain = parse_recipe([TINY]).model.model_source
    assert (plain.name, plain.kind, plain.vision_language) == ("tiny:llama", model_source.TINY, False)
    from_init = parse_recipe([write(tmp_path, milora_init_dir=str(init_dir))]).model.model_source
    assert (from_init.name, from_init.kind) == (str(init_dir), model_source.LOCAL)
