"""Where evaluation data comes from: explicit flag, else the data folder (flag or environment), else the hub."""

from __future__ import annotations

import pytest

from eval_harness.commonsense import COMMONSENSE_DATASETS, LLM_ADAPTERS_DIR_NAMES
from eval_harness.data_paths import (
    DATA_DIR_ENV,
    DATA_LAYOUT,
    commonsense_test_files,
    data_root,
    resolve_data_path,
)
from eval_harness.errors import UsageError


def test_data_root_is_the_flag_else_the_environment_else_none(tmp_path):
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    flag_dir.mkdir()
    env_dir.mkdir()
    assert data_root(str(flag_dir), environ={DATA_DIR_ENV: str(env_dir)}) == flag_dir.resolve()
    assert data_root(None, environ={DATA_DIR_ENV: str(env_dir)}) == env_dir.resolve()
    assert data_root(None, environ={}) is None
    with pytest.raises(UsageError, match=f"{DATA_DIR_ENV} .* is not a folder"):
        data_root(None, environ={DATA_DIR_ENV: str(tmp_path / "missing")})


def test_explicit_file_wins_then_the_folder_layout_then_the_hub(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text("{}\n")
    own = tmp_path / "own.jsonl"
    own.write_text("{}\n")
    assert resolve_data_path("gsm8k", None, "--gsm8k_file", tmp_path) == (tmp_path / "gsm8k_test.jsonl").resolve()
    assert resolve_data_path("gsm8k", str(own), "--gsm8k_file", tmp_path) == own.resolve()
    assert resolve_data_path("gsm8k", "hub", "--gsm8k_file", tmp_path) is None
    assert resolve_data_path("math", None, "--math_file", tmp_path) is None  # no math/math_test.jsonl there
    assert resolve_data_path("gsm8k", None, "--gsm8k_file", None) is None
    with pytest.raises(UsageError, match="--gsm8k_file .*nope.jsonl does not exist; give an existing path"):
        resolve_data_path("gsm8k", str(tmp_path / "nope.jsonl"), "--gsm8k_file", None)


def test_the_layout_matches_the_real_data_folder(shared_data_dir):
    for name, relative in DATA_LAYOUT.items():
        assert (shared_data_dir / relative).exists(), name
        assert resolve_data_path(name, None, f"--{name}_file", shared_data_dir) == (shared_data_dir / relative)


def test_every_llm_adapters_folder_name_is_a_real_folder(shared_data_dir):
    assert set(LLM_ADAPTERS_DIR_NAMES) == set(COMMONSENSE_DATASETS)
    real = {p.name for p in (shared_data_dir / "commonsense").iterdir() if (p / "test.json").is_file()}
    # HellaSwag's LLM-Adapters test set is not public; the other seven folders are named as LLM-Adapters names them.
    assert real == set(LLM_ADAPTERS_DIR_NAMES.values()) - {"hellaswag"}
    found = commonsense_test_files(shared_data_dir / "commonsense")
    assert set(found) == set(COMMONSENSE_DATASETS) - {"hellaswag"}
    assert found["arc_challenge"] == shared_data_dir / "commonsense" / "ARC-Challenge" / "test.json"


def test_a_folder_without_test_files_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no LLM-Adapters test files .*; point --commonsense_dir"):
        commonsense_test_files(tmp_path)


def test_followbench_folder_reads_every_constraints_file_in_order(shared_data_dir):
    from eval_harness import followbench
    from eval_harness.suites.followbench_suite import read_followbench_rows

    rows = read_followbench_rows(shared_data_dir / "followbench")
    assert len(rows) == 944
    assert [r["category"] for r in rows[:2]] == ["content", "content"]  # content_constraints.json comes first
    constrained = followbench.constrained_rows(rows)
    assert len(constrained) == 944 - sum(int(r["level"]) == 0 for r in rows)
    assert {r["constraint_type"] for r in constrained} == {
        "content",
        "example",
        "format",
        "mixed",
        "situation",
        "style",
    }
    one_file = read_followbench_rows(shared_data_dir / "followbench" / "style_constraints.json")
    assert one_file == rows[-len(one_file) :]  # style_constraints.json comes last
