"""benchmarks/step0_cost.py on the tiny recipe: the table and the JSON (timings are the benchmark's to report,
not a test's to assert)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_step0_cost_table_on_the_tiny_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/step0_cost.py", "recipes/tiny_milora.yaml", "--out", str(tmp_path),
         "--max_steps", "3", "--disable_tqdm", "true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tiny_milora.yaml |" in result.stdout
    row = json.loads((tmp_path / "step0_cost.json").read_text())
    assert row["full_run_steps"] == 40  # 2 epochs x 320 rows / 16
    assert row["step0_seconds"] > 0 and row["seconds_per_step"] > 0
    assert row["share_of_full_run"] == row["step0_seconds"] / (row["seconds_per_step"] * 40)
