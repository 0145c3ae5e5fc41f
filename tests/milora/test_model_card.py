"""The model card a run writes, and the evaluation tables appended to it."""

from __future__ import annotations

import json

from milora.model_card import (
    FOUR_BIT_HEADING,
    FP8_HEADING,
    append_evaluation,
    model_card,
    run_directory_of,
    write_model_card,
)

INFO = {
    "method": "pissa", "base_model": "meta-llama/Llama-2-7b-hf", "milora_init_dir": None, "lora_r": 64,
    "lora_alpha": 64, "lora_target_modules": ["q_proj", "v_proj"], "dataset": "meta-math/MetaMathQA",
    "adapter": "outputs/run", "global_step": 1000, "final_loss": 0.3125,
    "step0_check": {"logit_relative_error": 6e-3, "loss_base": 1.0, "loss_initialised": 1.001,
                    "loss_difference": 1e-3, "threshold": 5e-2, "rows": 16, "dtype": "bfloat16", "skipped": None},
    "merged": "outputs/run/merged",
}


def test_card_has_hub_metadata_training_facts_and_loading_code():
    card = model_card(INFO, "outputs/run")
    front = card.split("---")[1]
    assert "base_model: meta-llama/Llama-2-7b-hf" in front and "library_name: peft" in front
    assert "- pissa" in front and "- lora" in front
    for text in ("| rank r / lora_alpha | 64 / 64 |", "q_proj, v_proj", "meta-math/MetaMathQA", "| 1000 |", "0.3125",
                 "relative logit error 6.00e-03 (limit 5e-02, bfloat16)", "standard LoRA, rank 128: ship this one",
                 "`residual_adapter/`", 'PeftModel.from_pretrained(base, "outputs/run")',
                 'from_pretrained("outputs/run/merged")', "max_lora_rank=128", "Why the adapter here has rank 2r"):
        assert text in card, text


def test_lora_card_has_no_residual_folders():
    card = model_card({**INFO, "method": "lora", "lora_alpha": 128}, "outputs/run")
    assert "residual_adapter" not in card and "rank 2r" not in card and "standard LoRA, rank 64" in card


def write_run(tmp_path):
    run = tmp_path / "run"
    (run / "merged").mkdir(parents=True)
    (run / "milora_run.json").write_text(json.dumps(INFO))
    write_model_card(run, INFO)
    return run


def test_evaluations_are_appended_and_kept_when_the_card_is_rewritten(tmp_path):
    run = write_run(tmp_path)
    assert run_directory_of(run / "merged") == run and run_directory_of(run) == run
    table = "| task | metric | value |\n| --- | --- | ---: |\n| gsm8k | exact_match | 0.4200 |\n"
    assert append_evaluation(run / "merged", "math", table) == run / "README.md"
    append_evaluation(run, "commonsense", table.replace("gsm8k", "boolq"))
    card = (run / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "### math" in card and "### commonsense" in card
    assert "| gsm8k | exact_match | 0.4200 |" in card and "model `merged`" in card
    write_model_card(run, {**INFO, "global_step": 2000})  # a resumed run writes its card again
    again = (run / "README.md").read_text()
    assert "| 2000 |" in again and "| gsm8k | exact_match | 0.4200 |" in again and "### commonsense" in again


def test_other_model_folders_are_left_untouched(tmp_path):
    plain = tmp_path / "some_model"
    plain.mkdir()
    (plain / "README.md").write_text("their card\n")
    assert append_evaluation(plain, "math", "| t |\n") is None
    assert (plain / "README.md").read_text() == "their card\n"
    assert append_evaluation(tmp_path / "merged", "math", "| t |\n") is None  # a merged/ outside a run
    assert append_evaluation("org/hub-model", "math", "| t |\n") is None


FOUR_BIT = {"quantization": {"quant_type": "nf4", "compute_dtype": "bfloat16", "nested": False},
            "standard_lora_difference": {"relative_logits_difference": 0.01234, "max_abs_logprob_difference": 0.5678,
                                         "top1_agreement": 0.975, "tokens": 256}}


def test_a_4bit_run_states_the_standard_lora_difference_once_before_the_evaluations(tmp_path):
    info = {**INFO, **FOUR_BIT}
    card = model_card(info, "outputs/run")
    for text in ("4-bit (nf4, nested: False)", "`meta-llama/Llama-2-7b-hf`", "on 256 tokens", "||z||: 0.0123",
                 "log p_4bit|: 0.5678", "97.5% of positions"):
        assert text in card, text
    assert FOUR_BIT_HEADING not in model_card(INFO, "outputs/run")  # a bf16 run, or the difference not measured
    run = tmp_path / "run"
    run.mkdir()
    (run / "milora_run.json").write_text(json.dumps(info))
    write_model_card(run, info)
    append_evaluation(run, "math", "| t |\n")
    write_model_card(run, info)  # a resumed run writes its card again
    again = (run / "README.md").read_text()
    assert again.count(FOUR_BIT_HEADING) == 1 and again.count("## Evaluation") == 1
    assert again.index(FOUR_BIT_HEADING) < again.index("## Evaluation")


def test_an_fp8_run_says_so_with_its_step0_error():
    step0 = {**INFO["step0_check"], "fp8_logit_relative_error": 0.0345}
    card = model_card({**INFO, "fp8_base": True, "step0_check": step0}, "outputs/run")
    assert FP8_HEADING in card and "by 0.0345" in card and "float8" in card
    assert FP8_HEADING not in model_card({**INFO, "fp8_base": False}, "outputs/run")
