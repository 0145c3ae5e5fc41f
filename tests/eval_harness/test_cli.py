"""`milora eval` through the project's real dispatcher (milora.cli), on tiny merged checkpoints."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from stub_judge import StubJudge

from eval_harness import cli as eval_cli
from milora.cli import main as milora_main

FAST = ["--limit", "2", "--max_gen_toks", "4", "--batch_size", "2", "--device", "cpu"]


def _report(output_dir):
    return json.loads((output_dir / "results.json").read_text())


def test_math_suite_prints_the_table_and_writes_json_and_markdown(
    tiny_llama_dir, tmp_path, fixtures_dir, gsm8k_test_file, capsys
):
    out = tmp_path / "math"
    status = milora_main(
        [
            "eval",
            "--suite",
            "math",
            "--model",
            str(tiny_llama_dir),
            "--output_dir",
            str(out),
            "--math_file",
            str(fixtures_dir / "math_test.jsonl"),
            "--max_length",
            "256",
            *FAST,
        ]
    )
    assert status == eval_cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "| milora_gsm8k | exact_match |" in printed and "| milora_math | exact_match |" in printed
    report = _report(out)
    assert report["suite"] == "math" and report["skipped"] == {}
    # GSM8K defaults to the shared real test set next to the repository.
    assert report["data_sources"]["milora_gsm8k"] == str(gsm8k_test_file.resolve())
    assert report["data_sources"]["milora_math"] == str((fixtures_dir / "math_test.jsonl").resolve())
    for task in ("milora_gsm8k", "milora_math"):
        assert report["metrics"][task]["n"] == 2
        assert 0.0 <= report["metrics"][task]["exact_match"] <= 1.0
    assert "| milora_math | exact_match_flex |" in (out / "results.md").read_text()
    samples = (out / "samples" / "milora_gsm8k.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "Janet" in json.loads(samples[0])["doc"]["prompt"]
    assert not [p for p in out.rglob("*.tmp")]


def test_unreachable_hub_data_is_reported_not_raised(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "gsm8k_hub"
    status = eval_cli.main(
        ["--suite", "gsm8k", "--model", str(tiny_llama_dir), "--output_dir", str(out), "--gsm8k_file", "hub", *FAST]
    )
    assert status == eval_cli.EXIT_NONE_RAN  # HF_HUB_OFFLINE: nothing could be evaluated
    report = _report(out)
    assert report["data_sources"] == {"milora_gsm8k": "hub"}
    assert "milora_gsm8k" in report["skipped"]
    assert "skipped milora_gsm8k" in capsys.readouterr().err


def test_commonsense_suite_on_llm_adapters_files(tiny_llama_dir, tmp_path, fixtures_dir):
    out = tmp_path / "commonsense"
    status = eval_cli.main(
        [
            "--suite",
            "commonsense",
            "--model",
            str(tiny_llama_dir),
            "--output_dir",
            str(out),
            "--commonsense_dir",
            str(fixtures_dir / "commonsense"),
            "--max_length",
            "192",
            "--limit",
            "1",
            "--max_gen_toks",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert status == eval_cli.EXIT_OK
    metrics = _report(out)["metrics"]
    assert set(eval_cli.COMMONSENSE_TASKS) <= set(metrics)
    average = sum(metrics[t]["acc"] for t in eval_cli.COMMONSENSE_TASKS) / 8
    assert metrics["milora_commonsense"]["acc"] == pytest.approx(average)  # unweighted mean of the 8 sets
    assert all(metrics[t]["n"] == 1 for t in eval_cli.COMMONSENSE_TASKS)


def test_commonsense_suite_with_some_sets_missing_runs_the_others(tiny_llama_dir, tmp_path, fixtures_dir):
    import shutil

    partial = tmp_path / "dataset"
    for name in ("boolq", "piqa"):
        shutil.copytree(fixtures_dir / "commonsense" / name, partial / name)
    out = tmp_path / "commonsense_partial"
    status = eval_cli.main(
        [
            "--suite",
            "commonsense",
            "--model",
            str(tiny_llama_dir),
            "--output_dir",
            str(out),
            "--commonsense_dir",
            str(partial),
            "--max_length",
            "192",
            "--limit",
            "1",
            "--max_gen_toks",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert status == eval_cli.EXIT_PARTIAL
    report = _report(out)
    assert set(report["skipped"]) == set(eval_cli.COMMONSENSE_TASKS) - {"milora_boolq", "milora_piqa"}
    mean = (report["metrics"]["milora_boolq"]["acc"] + report["metrics"]["milora_piqa"]["acc"]) / 2
    assert report["metrics"]["milora_commonsense"] == {"acc": pytest.approx(mean), "n_tasks": 2}


def test_alpaca_eval_suite_with_a_loopback_judge(tiny_llama_dir, tmp_path, fixtures_dir):
    out = tmp_path / "alpaca"
    with StubJudge() as judge:
        status = eval_cli.main(
            [
                "--suite",
                "alpaca_eval",
                "--model",
                str(tiny_llama_dir),
                "--output_dir",
                str(out),
                "--alpaca_eval_file",
                str(fixtures_dir / "alpaca_eval_sample.json"),
                "--judge_base_url",
                judge.base_url,
                "--judge_model",
                "stub-judge",
                "--generator_name",
                "tiny-milora",
                *FAST,
            ]
        )
        assert len(judge.requests) == 2
    assert status == eval_cli.EXIT_OK
    row = _report(out)["metrics"]["alpaca_eval"]
    assert 0.0 <= row["win_rate"] <= 100.0 and row["n_total"] == 2
    outputs = json.loads((out / "model_outputs.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert {o["generator"] for o in outputs} == {"tiny-milora"}
    assert "judge_api_key" not in _report(out)["settings"]


def test_followbench_suite_with_a_loopback_judge(tiny_llama_dir, tmp_path, fixtures_dir):
    out = tmp_path / "followbench"
    with StubJudge() as judge:
        status = eval_cli.main(
            [
                "--suite",
                "followbench",
                "--model",
                str(tiny_llama_dir),
                "--output_dir",
                str(out),
                "--followbench_file",
                str(fixtures_dir / "followbench_sample.json"),
                "--judge_base_url",
                judge.base_url,
                "--judge_model",
                "stub-judge",
                "--max_gen_toks",
                "4",
                "--device",
                "cpu",
            ]
        )
    assert status == eval_cli.EXIT_OK
    rates = _report(out)["metrics"]["followbench"]
    # The stub accepts only the first constraint of a response without the word SATISFIED.
    assert rates["hsr/level_1"] == 1.0 and rates["hsr/level_2"] == 0.0
    assert rates["ssr/level_2"] == 0.5 and rates["csl"] == 1.0
    judged = [json.loads(line) for line in (out / "samples" / "followbench.jsonl").read_text().splitlines()]
    assert [r["level"] for r in judged] == [1, 2, 1, 2]


def test_vqa_suite_pope_with_a_tiny_llava(tiny_llava_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (color, label) in enumerate([((255, 0, 0), "yes"), ((0, 255, 0), "no"), ((0, 0, 255), "no")]):
        Image.new("RGB", (36, 36), color).save(images / f"{i}.png")
        rows.append(
            {
                "question_id": i,
                "image": f"{i}.png",
                "question": "Is there a dog in the image?",
                "answer": label,
                "category": "random",
            }
        )
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vqa"
    status = eval_cli.main(
        [
            "--suite",
            "vqa",
            "--model",
            str(tiny_llava_dir),
            "--output_dir",
            str(out),
            "--vqa_benchmark",
            "pope",
            "--vqa_file",
            str(data),
            "--image_dir",
            str(images),
            "--max_gen_toks",
            "3",
            "--batch_size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert status == eval_cli.EXIT_OK
    scores = _report(out)["metrics"]["pope"]
    assert set(scores) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "accuracy/random"}
    predictions = [json.loads(line) for line in (out / "samples" / "pope.jsonl").read_text().splitlines()]
    answered_yes = sum(eval_cli_parse(p["prediction"]) == "yes" for p in predictions)
    assert scores["yes_ratio"] == pytest.approx(answered_yes / 3)


def eval_cli_parse(text):
    from eval_harness.vqa_scoring import parse_pope_answer

    return parse_pope_answer(text)


def test_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for suite in ("commonsense", "math", "gsm8k", "ifeval", "alpaca_eval", "followbench", "vqa"):
        assert suite in printed


def test_data_file_resolution(tmp_path):
    (tmp_path / "gsm8k_test.jsonl").write_text("{}\n")
    assert eval_cli.resolve_data_file(None, "milora_gsm8k", str(tmp_path)) == (tmp_path / "gsm8k_test.jsonl").resolve()
    assert eval_cli.resolve_data_file("hub", "milora_gsm8k", str(tmp_path)) is None
    assert eval_cli.resolve_data_file(None, "milora_math", str(tmp_path)) is None  # no math_test.jsonl there
    with pytest.raises(FileNotFoundError):
        eval_cli.resolve_data_file(str(tmp_path / "nope.jsonl"), "milora_gsm8k", None)
