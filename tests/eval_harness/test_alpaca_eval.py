"""AlpacaEval 2 end to end: the real `alpaca_eval` package calls a stub judge served on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import yaml

from eval_harness.alpaca_eval_runner import (
    load_eval_set,
    model_output_records,
    run_alpaca_eval,
    write_annotator_config,
)
from eval_harness.judge import JudgeEndpoint, ask_judge
from tests.eval_harness.stub_judge import StubJudge


def test_model_outputs_have_the_alpaca_eval_format():
    records = model_output_records(["Say hi."], ["hi"], "tiny-milora")
    assert records == [{"instruction": "Say hi.", "output": "hi", "generator": "tiny-milora", "dataset": "alpaca_eval"}]
    with pytest.raises(ValueError):
        model_output_records(["a", "b"], ["x"], "g")


def test_annotator_config_points_at_the_endpoint_without_the_key(tmp_path):
    judge = JudgeEndpoint(base_url="http://127.0.0.1:9/v1", api_key="secret-judge-key", model="my-local-judge")
    config_path = write_annotator_config(tmp_path, judge)
    ((name, config),) = yaml.safe_load(config_path.read_text()).items()
    assert name == "weighted_alpaca_eval_gpt4_turbo"
    assert config["completions_kwargs"]["model_name"] == "my-local-judge"
    assert config["completions_kwargs"]["requires_chatml"] is True
    client = yaml.safe_load(open(config["completions_kwargs"]["client_config_path"]).read())
    assert client == {"default": [{"base_url": "http://127.0.0.1:9/v1"}]}
    assert open(config["prompt_template"]).read().startswith("<|im_start|>system")
    assert not [path for path in tmp_path.rglob("*") if path.is_file() and b"secret-judge-key" in path.read_bytes()]


def test_alpaca_eval_scores_against_a_local_judge(tmp_path, fixtures_dir):
    reference = load_eval_set(fixtures_dir / "alpaca_eval_sample.json")
    instructions = [r["instruction"] for r in reference]
    # The stub judge prefers an output containing EXCELLENT, else the longer one: outputs 0 and 1 win, 2 loses.
    outputs = ["EXCELLENT tips: eat, move, sleep.", "EXCELLENT: Paris.", "Leaves."]
    model_outputs = model_output_records(instructions, outputs, "tiny-milora")
    with StubJudge() as judge:
        endpoint = JudgeEndpoint(base_url=judge.base_url, api_key="local-key", model="stub-judge")
        annotator = write_annotator_config(tmp_path / "annotator", endpoint)
        row = run_alpaca_eval(model_outputs, reference, annotator, tmp_path / "alpaca_eval", endpoint)
    # weighted annotator: each preference is 1 + P(model wins); the stub gives the winner p = 0.99
    assert row["win_rate"] == pytest.approx(100 * (0.99 + 0.99 + 0.01) / 3)
    assert row["discrete_win_rate"] == pytest.approx(100 * 2 / 3)
    assert row["n_total"] == 3
    assert len(judge.requests) == 3
    assert all(r["body"]["model"] == "stub-judge" and r["auth"] == "Bearer local-key" for r in judge.requests)
    assert all(r["body"]["logprobs"] is True for r in judge.requests)
    annotations = json.loads((tmp_path / "alpaca_eval" / "annotations.json").read_text())
    assert {a["instruction"] for a in annotations} == set(instructions)


def test_ask_judge_returns_the_server_text():
    with StubJudge() as judge:
        prompt = (
            "...Python LIST with 2 elements ('YES' or 'NO')...\n"
            "#Response of Initial Instruction + 2 Constraints#\nSATISFIED\n\n#System#"
        )
        answers = ask_judge(JudgeEndpoint(base_url=judge.base_url, model="stub"), [prompt])
    assert answers[0].endswith("['YES', 'YES']")


def test_real_alpaca_eval_set_loads_and_scores_exactly(tmp_path, shared_data_dir):
    reference = load_eval_set(shared_data_dir / "alpaca_eval" / "gpt4_1106_preview_outputs.json")
    assert len(reference) == 805 and {r["generator"] for r in reference} == {"gpt4_1106_preview"}
    reference = reference[:3]
    # A win by the win word, a loss by length, a win by length: the stub judge gives winners p = 0.99.
    outputs = ["EXCELLENT.", "x", reference[2]["output"] + " And more."]
    model_outputs = model_output_records([r["instruction"] for r in reference], outputs, "tiny-milora")
    with StubJudge() as judge:
        endpoint = JudgeEndpoint(base_url=judge.base_url, model="stub-judge")
        annotator = write_annotator_config(tmp_path / "annotator", endpoint)
        row = run_alpaca_eval(model_outputs, reference, annotator, tmp_path / "alpaca_eval", endpoint)
    assert row["win_rate"] == pytest.approx(100 * (0.99 + 0.01 + 0.99) / 3)
    assert row["discrete_win_rate"] == pytest.approx(100 * 2 / 3) and row["n_total"] == 3
