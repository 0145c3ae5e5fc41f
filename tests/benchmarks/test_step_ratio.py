"""benchmarks/step_ratio.py on the tiny model, CPU: every method trains on the same batches in turn."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO_ROOT, load_script

step_ratio = load_script(REPO_ROOT / "benchmarks" / "step_ratio.py")


def test_interleaved_methods_see_the_same_batches(tmp_path):
    step_ratio.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "step_ratio.json").read_text())
    steps = result["spec"]["warmup"] + result["spec"]["steps"]
    assert set(result["step_times_s"]) == {"lora", "milora", "pissa"}
    assert all(len(times) == steps for times in result["step_times_s"].values())
    # one base model, output unchanged at init: the first step's loss is the base model's for every method
    first = [losses[0] for losses in result["losses"].values()]
    assert max(first) - min(first) < 1e-3 * abs(first[0])
    rows = {row["method"]: row for row in result["summary"]}
    assert rows["lora"]["ratio_median"] == 1.0
    assert rows["milora"]["ratio_total"] == pytest.approx(rows["milora"]["total_s"] / rows["lora"]["total_s"])
    assert "| milora |" in (tmp_path / "step_ratio.md").read_text()


def test_padding_free_batch_restarts_positions_and_masks_row_starts():
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}]
    batch = step_ratio.padding_free_batch(rows, "cpu")
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7]]


def test_lora_is_required_as_the_reference(capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_ratio.main(["--smoke", "--methods", "milora,pissa"])
    assert exit_info.value.code == 2 and "must include lora" in capsys.readouterr().err
