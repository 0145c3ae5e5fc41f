"""`milora eval` adds its table to the model card of the training run it scored (RUN/merged), and only there."""

from __future__ import annotations

import shutil

from eval_harness import cli as eval_cli
from milora.model_card import write_model_card

INFO = {
    "method": "milora", "base_model": "tiny:llama", "milora_init_dir": None, "lora_r": 8, "lora_alpha": 8,
    "lora_target_modules": ["q_proj"], "dataset": "tiny_math.jsonl", "adapter": "run", "global_step": 2,
    "final_loss": 5.0, "step0_check": None, "merged": "run/merged",
}


def commonsense(model, out, data_dir) -> list[str]:
    return ["--suite", "commonsense", "--model", str(model), "--output_dir", str(out), "--data_dir", str(data_dir),
            "--max_length", "192", "--limit", "1", "--max_gen_toks", "2", "--device", "cpu"]


def test_eval_appends_its_table_to_the_runs_card(tiny_llama_dir, tmp_path, fixtures_dir):
    import json

    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "merged")
    (run / "milora_run.json").write_text(json.dumps(INFO))
    write_model_card(run, INFO)
    assert eval_cli.main(commonsense(run / "merged", tmp_path / "eval", fixtures_dir)) == eval_cli.EXIT_OK
    card = (run / "README.md").read_text()
    assert "## Evaluation" in card and "### commonsense" in card and "| milora_commonsense | acc |" in card

    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    assert eval_cli.main(commonsense(tiny_llama_dir, tmp_path / "eval2", fixtures_dir)) == eval_cli.EXIT_OK
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before  # not a run's output: untouched
