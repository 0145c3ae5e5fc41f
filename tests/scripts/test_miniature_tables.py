"""The miniature-tables driver (scripts/miniature_tables.py and its worker/report): recipes, data preparation,
run names, the forgetting loss and the Markdown tables, on CPU without the real model."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, load_script

miniature_tables = load_script("scripts/miniature_tables.py")
miniature_report = load_script("scripts/miniature_report.py")
miniature_worker = load_script("scripts/miniature_worker.py")

RECIPES = REPO_ROOT / "recipes"


@pytest.mark.parametrize("task, rank", [("math", 8), ("commonsense", 4)])
def test_recipes_of_a_task_differ_only_in_method(task, rank):
    from milora.sft.parsing import parse_recipe

    texts = {m: yaml.safe_load((RECIPES / f"smollm2_{task}_{m}.yaml").read_text()) for m in miniature_tables.METHODS}
    for method, config in texts.items():
        assert config["lora_r"] == rank and config["lora_alpha"] == (2 * rank if method == "lora" else rank)
        assert config["method"] == method and config["learning_rate"] == 3e-4
        same = {k: v for k, v in config.items() if k not in ("method", "lora_alpha", "output_dir")}
        assert same == {k: v for k, v in texts["milora"].items() if k not in ("method", "lora_alpha", "output_dir")}
    recipe = parse_recipe([str(RECIPES / f"smollm2_{task}_milora.yaml"), "--model_name_or_path", "tiny:llama",
                           "--dataset_name", str(RECIPES / "data" / "tiny_math.jsonl"), "--dataset_format", "auto"])
    assert recipe.training.gradient_accumulation_steps == 1


def test_a_missing_gguf_is_a_recipe_error(tmp_path):
    from milora.sft.config import RecipeError
    from milora.sft.parsing import parse_recipe

    with pytest.raises(RecipeError, match="GGUF file not found"):
        parse_recipe([str(RECIPES / "smollm2_math_lora.yaml"), "--model_name_or_path", str(tmp_path / "x.gguf"),
                      "--dataset_name", str(RECIPES / "data" / "tiny_math.jsonl")])
    (tmp_path / "y.gguf").write_text("not a gguf")
    with pytest.raises(RecipeError, match="is not a GGUF file"):
        parse_recipe([str(RECIPES / "smollm2_math_lora.yaml"), "--model_name_or_path", str(tmp_path / "y.gguf"),
                      "--dataset_name", str(RECIPES / "data" / "tiny_math.jsonl")])


def test_prepare_writes_the_training_files_and_a_copy_of_the_evaluation_data(shared_data_dir, tmp_path):
    from milora.io import read_json, read_jsonl

    data = miniature_tables.prepare(shared_data_dir, tmp_path)
    assert len(read_jsonl(data / "gsm8k_train.jsonl")) == 7473
    rows = read_json(data / "commonsense_train.json")
    assert len(rows) == 17754 and set(rows[0]) == {"instruction", "input", "output", "answer"}
    assert (data / "gsm8k_test.jsonl").read_bytes() == (shared_data_dir / "gsm8k_test.jsonl").read_bytes()
    assert len(list((data / "commonsense").glob("*/test.json"))) == 7
    assert (data / "alpaca_eval" / "gpt4_1106_preview_outputs.json").is_file()
    with pytest.raises(miniature_tables.DriverError, match="gsm8k_train.jsonl not found"):
        miniature_tables.prepare(tmp_path / "nowhere", tmp_path)
    # a run is scored on its own task's sets and the forgetting loss, the base on everything
    assert set(miniature_worker.evaluation_parts(data, 2)) == {"gsm8k", *miniature_report.COMMONSENSE_COLUMNS,
                                                               "forgetting"}
    kinds = miniature_worker.part_kinds(miniature_tables.evaluated_parts("commonsense_qmilora_s1"))
    assert set(miniature_worker.evaluation_parts(data, 2, kinds)) == {*miniature_report.COMMONSENSE_COLUMNS,
                                                                      "forgetting"}
    kinds = miniature_worker.part_kinds(miniature_tables.evaluated_parts("math_lora_s2"))
    assert set(miniature_worker.evaluation_parts(data, 2, kinds)) == {"gsm8k", "forgetting"}


def test_run_names():
    assert len(miniature_tables.parse_runs("all")) == 9
    names = ["math_milora_s3", "commonsense_lora_s1"]
    assert miniature_tables.parse_runs(",".join(names)) == names
    with pytest.raises(miniature_tables.DriverError, match="unknown run"):
        miniature_tables.parse_runs("math_dora_s1")


def test_a_run_resumes_from_its_checkpoint(tmp_path):
    fresh = miniature_tables.run_job("math_pissa_s2", tmp_path, tmp_path / "base", smoke=False, extra=[])
    assert fresh[fresh.index("--seed") + 1] == "2" and "--resume_from_checkpoint" not in fresh
    assert fresh[fresh.index("--") + 1].endswith("smollm2_math_pissa.yaml")
    (tmp_path / "runs" / "math_pissa_s2" / "checkpoint-50").mkdir(parents=True)
    resumed = miniature_tables.run_job("math_pissa_s2", tmp_path, tmp_path / "base", smoke=False, extra=[])
    assert resumed[resumed.index("--resume_from_checkpoint") + 1] == "true"


def finished_run(out, name: str, smoke: bool) -> None:
    """OUT/train/<name>.json as the worker writes it for a finished run of the driver's job."""
    from milora.io import write_json

    argv = miniature_tables.run_job(name, out, out / "base", smoke=smoke, extra=[])
    write_json(out / "train" / f"{name}.json", {"argv": argv[argv.index("--") + 1:], "status": "done"})


def driver(capsys, *argv) -> tuple[int, str]:
    code = miniature_tables.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("first_smoke", [True, False])
def test_smoke_and_full_results_never_share_an_output_directory(tmp_path, capsys, first_smoke):
    """A run in the other mode is refused on one line before it starts anything: a smoke run's finished jobs
    would otherwise count as done for the real run (and its checkpoints be resumed), or the other way round."""
    out, data = tmp_path / "out", tmp_path / "out" / "data"
    data.mkdir(parents=True)
    (data / "gsm8k_train.jsonl").write_text("{}\n")
    (data / "gsm8k_test.jsonl").write_text("{}\n")
    finished_run(out, "math_lora_s1", smoke=first_smoke)
    same = ["--smoke"] if first_smoke else []
    other = [] if first_smoke else ["--smoke"]
    train = ["train", "--model", tmp_path / "base", "--out", out, "--runs", "math_lora_s1"]
    code, text = driver(capsys, *train, *same)  # the finished run counts as done in its own mode
    assert code == 0 and "training 0 run(s) (1 already done)" in text
    held, wanted = ("smoke", "full") if first_smoke else ("full", "smoke")
    assert miniature_tables.held_mode(out) == held
    code, text = driver(capsys, *train, *other)
    assert code == 2 and text.count("\n") == 1 and "started" not in text
    assert f"{out} holds the results of a {held} run" in text
    assert f"pass another --out for it (e.g. {out}_{wanted}" in text
    evaluate = ["evaluate", "--model", tmp_path / "base", "--runs_dir", out, "--data_dir", data]
    code, text = driver(capsys, *evaluate, *other)
    assert code == 2 and "pass another --runs_dir" in text and not (out / "eval").exists()


def test_an_output_directory_from_before_the_mode_file_is_read_from_its_runs(tmp_path):
    out = tmp_path / "out"
    assert miniature_tables.held_mode(out) is None
    finished_run(out, "math_milora_s1", smoke=False)
    assert miniature_tables.held_mode(out) == "full"
    finished_run(out, "math_milora_s2", smoke=True)  # any smoke run taints the directory
    assert miniature_tables.held_mode(out) == "smoke"
    with pytest.raises(miniature_tables.DriverError, match="holds the results of a smoke run"):
        miniature_tables.claim_mode(out, smoke=False, flag="--out")
    miniature_tables.claim_mode(out, smoke=True, flag="--out")
    assert (out / miniature_tables.MODE_FILE).is_file()


@pytest.mark.parametrize("smoke", [True, False])
def test_tables_of_a_smoke_run_say_so(tmp_path, capsys, smoke):
    from milora.io import write_json

    out = tmp_path / "out"
    miniature_tables.claim_mode(out, smoke=smoke, flag="--out")
    parts = {p: {"accuracy": 50.0, "rows": 8} for p in miniature_report.COMMONSENSE_COLUMNS}
    write_json(out / "eval" / "base.json", {"parts": {"gsm8k": {"accuracy": 2.0, "rows": 8},
                                                      "forgetting": {"nll": 1.0}, **parts}})
    code, text = driver(capsys, "table", "--runs_dir", out)
    assert code == 0 and "| Base (no finetuning) | 2.0 |" in text
    assert text.startswith(miniature_tables.SMOKE_NOTE) == smoke


def test_forgetting_nll_counts_the_output_tokens_only():
    from milora.tiny import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    rows = [{"instruction": "Name a colour.", "output": "Blue."},
            {"instruction": "Add 2 and 3.", "output": "5, I think"}]
    result = miniature_worker.response_nll(model, tokenizer, rows, batch_size=2)
    total, tokens = 0.0, 0
    for row in rows:  # reference: one unpadded row at a time, HF's own loss over the output tokens
        ids, prompt_len = miniature_worker.response_token_ids(tokenizer, row["instruction"], row["output"], 1024)
        labels = torch.tensor([[-100] * prompt_len + ids[prompt_len:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss
        total, tokens = total + float(loss) * (len(ids) - prompt_len), tokens + len(ids) - prompt_len
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(total / tokens, rel=1e-5)


def test_tables_show_mean_and_spread_over_seeds_and_the_base_row():
    def evals(gsm8k, nll):
        sets = {p: {"accuracy": 50.0, "rows": 8} for p in miniature_report.COMMONSENSE_COLUMNS}
        return {"parts": {"gsm8k": {"accuracy": gsm8k, "accuracy_flexible": gsm8k + 1, "rows": 8},
                          "forgetting": {"nll": nll}, **sets}}

    results = {"base": evals(2.0, 1.0), "math_milora_s1": evals(10.0, 1.2), "math_milora_s2": evals(12.0, 1.4),
               "commonsense_lora_s1": evals(1.0, 1.5)}
    train = {"math_milora_s1": {"status": "done", "train_runtime_s": 120, "peak_gpu_mib": 2048},
             "math_milora_s2": {"status": "done", "train_runtime_s": 180, "peak_gpu_mib": 2048},
             "commonsense_lora_s1": {"status": "failed", "error": "boom"}}
    text = miniature_report.markdown_tables(train, results)
    milora_row = next(line for line in text.splitlines() if line.startswith("| MiLoRA") and "11.0" in line)
    assert "11.0 ± 1.0 (10.0, 12.0)" in milora_row and "| 2 |" in milora_row
    assert "1.300 ± 0.100 (1.200, 1.400) (+0.300)" in milora_row and "2.5 ± 0.5" in milora_row
    assert "| Base (no finetuning) | 2.0 |" in text
    assert "commonsense_lora_s1: failed (boom)" in text


def test_quantized_runs_use_the_bf16_recipes_on_a_4bit_base(tmp_path):
    from milora.sft.parsing import parse_recipe

    names = miniature_tables.parse_runs("quantized")
    assert names == ["commonsense_qlora_s1", "commonsense_qpissa_s1", "commonsense_qmilora_s1"]
    for name, method, refits in zip(names, ("lora", "pissa", "milora"), (0, 5, 0), strict=True):
        command = miniature_tables.run_job(name, tmp_path, tmp_path / "base", smoke=True, extra=[])
        sft_args = command[command.index("--") + 1:]
        assert sft_args[0].endswith(f"smollm2_commonsense_{method}.yaml")
        recipe = parse_recipe([*sft_args, "--model_name_or_path", "tiny:llama", "--dataset_name",
                               str(RECIPES / "data" / "tiny_commonsense.json")])
        assert recipe.model.load_in_4bit and recipe.model.method == method
        assert recipe.model.qpissa_iterations == refits
    evals = {"commonsense_qmilora_s1": {"parts": {p: {"accuracy": 40.0} for p in miniature_report.COMMONSENSE_COLUMNS}}}
    assert "| QMiLoRA (nf4 residual) | 40.0 |" in miniature_report.markdown_tables({}, evals)


def test_fp8_runs_use_the_bf16_recipes_on_an_fp8_base(tmp_path):
    from milora.sft.parsing import parse_recipe

    names = miniature_tables.parse_runs("fp8")
    assert names == ["commonsense_fp8lora_s1", "commonsense_fp8pissa_s1", "commonsense_fp8milora_s1"]
    for name, method in zip(names, ("lora", "pissa", "milora"), strict=True):
        command = miniature_tables.run_job(name, tmp_path, tmp_path / "base", smoke=True, extra=[])
        sft_args = command[command.index("--") + 1:]
        assert sft_args[0].endswith(f"smollm2_commonsense_{method}.yaml")
        recipe = parse_recipe([*sft_args, "--model_name_or_path", "tiny:llama", "--dataset_name",
                               str(RECIPES / "data" / "tiny_commonsense.json")])
        assert recipe.model.fp8_base and not recipe.model.load_in_4bit and recipe.model.method == method
    parts = {p: {"accuracy": 40.0} for p in miniature_report.COMMONSENSE_COLUMNS}
    evals = {"commonsense_fp8milora_s1": {"parts": parts}}
    assert "| MiLoRA (FP8 base) | 40.0 |" in miniature_report.markdown_tables({}, evals)
