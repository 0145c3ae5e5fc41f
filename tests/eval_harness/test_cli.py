"""`milora eval` through the project's real dispatcher (milora.cli), on tiny merged checkpoints.

Scores are exact: a tiny model that writes 4 byte-tokens cannot write "The answer is: " (so strict exact match
is 0), a LLaVA whose generation config allows only the token "Y" answers "yes" to everything, and the stub
judge's preferences are known.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from eval_harness import cli as eval_cli
from eval_harness.data_paths import DATA_DIR_ENV
from eval_harness.errors import UsageError
from eval_harness.suites.lm_eval_suite import COMMONSENSE_TASKS
from milora.cli import CommandFailed
from milora.cli import main as milora_main
from tests.eval_harness.stub_judge import StubJudge

FAST = ["--limit", "2", "--max_gen_toks", "4", "--batch_size", "2", "--device", "cpu"]


def _report(output_dir):
    return json.loads((output_dir / "results.json").read_text())


def _args(**options) -> list[str]:
    """Command-line arguments from keyword options: ``suite="math"`` -> ``["--suite", "math"]``."""
    return [item for name, value in options.items() for item in (f"--{name}", str(value))]


def _commonsense_args(model, out, **data):
    return _args(suite="commonsense", model=model, output_dir=out, **data, max_length=192, limit=1, max_gen_toks=2,
                 device="cpu")  # fmt: skip


def test_math_suite_reads_the_data_folder_from_the_environment(
    tiny_llama_dir, tmp_path, fixtures_dir, shared_data_dir, monkeypatch, capsys
):
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data_dir))
    out = tmp_path / "math"
    math_file = fixtures_dir / "math_test.jsonl"
    args = _args(suite="math", model=tiny_llama_dir, output_dir=out, math_file=math_file, max_length=256)
    status = milora_main(["eval", *args, *FAST])
    assert status == eval_cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "| milora_gsm8k | exact_match |" in printed and "| milora_math | exact_match |" in printed
    report = _report(out)
    assert report["suite"] == "math" and report["skipped"] == {}
    # GSM8K from the data folder named by the environment; MATH from the explicit flag, which wins.
    assert report["data_sources"]["milora_gsm8k"] == str((shared_data_dir / "gsm8k_test.jsonl").resolve())
    assert report["data_sources"]["milora_math"] == str(math_file.resolve())
    for task in ("milora_gsm8k", "milora_math"):
        assert report["metrics"][task]["n"] == 2
        assert report["metrics"][task]["exact_match"] == 0.0  # 4 tokens cannot hold "The answer is: <x>"
    assert "| milora_math | exact_match_flex |" in (out / "results.md").read_text()
    samples = (out / "samples" / "milora_gsm8k.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "Janet" in json.loads(samples[0])["doc"]["prompt"]
    assert not [p for p in out.rglob("*.tmp*")]


def test_unreachable_hub_data_is_reported_not_raised(tiny_llama_dir, tmp_path, shared_data_dir, capsys):
    out = tmp_path / "gsm8k_hub"
    args = _args(suite="gsm8k", model=tiny_llama_dir, output_dir=out, data_dir=shared_data_dir, gsm8k_file="hub")
    status = eval_cli.main([*args, *FAST])
    assert status == eval_cli.EXIT_NONE_RAN  # HF_HUB_OFFLINE: nothing could be evaluated
    report = _report(out)
    assert report["data_sources"] == {"milora_gsm8k": "hub"}  # 'hub' wins over the data folder
    assert "milora_gsm8k" in report["skipped"]
    assert "skipped milora_gsm8k" in capsys.readouterr().err


def test_commonsense_suite_on_llm_adapters_files_in_the_data_folder(tiny_llama_dir, tmp_path, fixtures_dir):
    out = tmp_path / "commonsense"
    status = eval_cli.main(_commonsense_args(tiny_llama_dir, out, data_dir=fixtures_dir))
    assert status == eval_cli.EXIT_OK
    report = _report(out)
    metrics = report["metrics"]
    assert set(COMMONSENSE_TASKS) <= set(metrics)
    average = sum(metrics[t]["acc"] for t in COMMONSENSE_TASKS) / 8
    assert metrics["milora_commonsense"]["acc"] == pytest.approx(average)  # unweighted mean of the 8 sets
    assert all(metrics[t]["n"] == 1 for t in COMMONSENSE_TASKS)
    assert report["data_sources"]["milora_arc_easy"] == str((fixtures_dir / "commonsense/ARC-Easy/test.json").resolve())


def test_commonsense_suite_with_some_sets_missing_runs_the_others(tiny_llama_dir, tmp_path, fixtures_dir):
    partial = tmp_path / "dataset"
    for name in ("boolq", "piqa"):
        shutil.copytree(fixtures_dir / "commonsense" / name, partial / name)
    out = tmp_path / "commonsense_partial"
    status = eval_cli.main(_commonsense_args(tiny_llama_dir, out, commonsense_dir=partial))
    assert status == eval_cli.EXIT_PARTIAL
    report = _report(out)
    assert set(report["skipped"]) == set(COMMONSENSE_TASKS) - {"milora_boolq", "milora_piqa"}
    mean = (report["metrics"]["milora_boolq"]["acc"] + report["metrics"]["milora_piqa"]["acc"]) / 2
    assert report["metrics"]["milora_commonsense"] == {"acc": pytest.approx(mean), "n_tasks": 2}


def test_alpaca_eval_suite_on_the_real_instructions(tiny_llama_dir, tmp_path, shared_data_dir):
    out = tmp_path / "alpaca"
    with StubJudge() as judge:
        args = _args(suite="alpaca_eval", model=tiny_llama_dir, output_dir=out, data_dir=shared_data_dir,
                     judge_base_url=judge.base_url, judge_model="stub-judge", generator_name="tiny-milora")  # fmt: skip
        status = eval_cli.main([*args, *FAST])
        assert len(judge.requests) == 2
    assert status == eval_cli.EXIT_OK
    report = _report(out)
    row = report["metrics"]["alpaca_eval"]
    # The stub prefers the longer output: GPT-4's long reference beats 4 tokens, at probability 0.99.
    assert row["win_rate"] == pytest.approx(1.0) and row["discrete_win_rate"] == 0.0 and row["n_total"] == 2
    assert report["data_sources"]["alpaca_eval"].endswith("alpaca_eval/gpt4_1106_preview_outputs.json")
    outputs = json.loads((out / "model_outputs.json").read_text())
    reference = json.loads((shared_data_dir / "alpaca_eval" / "gpt4_1106_preview_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in reference[:2]]
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 2
    assert {o["generator"] for o in outputs} == {"tiny-milora"}
    assert "judge_api_key" not in report["settings"]


def test_followbench_suite_with_a_loopback_judge(tiny_llama_dir, tmp_path, fixtures_dir):
    out = tmp_path / "followbench"
    with StubJudge() as judge:
        args = _args(suite="followbench", model=tiny_llama_dir, output_dir=out,
                     followbench_file=fixtures_dir / "followbench_sample.json", judge_base_url=judge.base_url,
                     judge_model="stub-judge", max_gen_toks=4, device="cpu")  # fmt: skip
        status = eval_cli.main(args)
    assert status == eval_cli.EXIT_OK
    rates = _report(out)["metrics"]["followbench"]
    # The stub accepts only the first constraint of a response without the word SATISFIED.
    assert rates["hsr/level_1"] == 1.0 and rates["hsr/level_2"] == 0.0
    assert rates["ssr/level_2"] == 0.5 and rates["csl"] == 1.0
    judged = [json.loads(line) for line in (out / "samples" / "followbench.jsonl").read_text().splitlines()]
    assert [r["level"] for r in judged] == [1, 2, 1, 2]


@pytest.fixture(scope="module")
def always_yes_llava_dir(tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA with a generation config that suppresses every token but "Y": it answers "YYY..."."""
    from transformers import AutoProcessor, GenerationConfig

    path = tmp_path_factory.mktemp("always_yes_llava") / "model"
    shutil.copytree(tiny_llava_dir, path)
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    keep = tokenizer.convert_tokens_to_ids("Y")
    vocab_size = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    config = (
        GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists() else GenerationConfig()
    )
    config.suppress_tokens = [i for i in range(max(vocab_size, len(tokenizer))) if i != keep]
    config.save_pretrained(path)
    return path


def test_vqa_suite_pope_with_an_always_yes_llava(always_yes_llava_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (color, label) in enumerate([((255, 0, 0), "yes"), ((0, 255, 0), "no"), ((0, 0, 255), "no")]):
        Image.new("RGB", (36, 36), color).save(images / f"{i}.png")
        rows.append({"question_id": i, "image": f"{i}.png", "question": "Is there a dog in the image?",
                     "answer": label, "category": "random"})  # fmt: skip
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vqa"
    args = _args(suite="vqa", model=always_yes_llava_dir, output_dir=out, vqa_benchmark="pope", vqa_file=data,
                 image_dir=images, max_gen_toks=3, batch_size=2, device="cpu")  # fmt: skip
    status = eval_cli.main(args)
    assert status == eval_cli.EXIT_OK
    predictions = [json.loads(line)["prediction"] for line in (out / "samples" / "pope.jsonl").read_text().splitlines()]
    assert predictions == ["YYY"] * 3
    # Everything answered "yes" (no "no"/"not" word) against gold yes/no/no: TP 1, FP 2.
    expected = {"accuracy": 1 / 3, "precision": 1 / 3, "recall": 1.0, "f1": 0.5, "yes_ratio": 1.0}
    scores = _report(out)["metrics"]["pope"]
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert scores["accuracy/random"] == pytest.approx(1 / 3)


def test_help_lists_the_suites(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for suite in ("commonsense", "math", "gsm8k", "ifeval", "alpaca_eval", "followbench", "vqa", "MILORA_EVAL_DATA"):
        assert suite in printed


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("milora eval: error: ")
    return err


def test_bad_command_line_is_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", "m"])
    assert exit_info.value.code == eval_cli.EXIT_USAGE
    assert "--suite" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--suite", "gsm8k", "--data_dir", "/no/such/folder"], "--data_dir /no/such/folder is not a folder"),
        (["--suite", "gsm8k", "--gsm8k_file", "/no/such.jsonl"], "--gsm8k_file /no/such.jsonl does not exist"),
        (["--suite", "lm_eval"], "pass --tasks"),
        (["--suite", "followbench"], "pass --followbench_file"),
        (["--suite", "vqa", "--vqa_benchmark", "pope"], "pass --vqa_benchmark and --vqa_file"),
    ],
)
def test_bad_input_is_one_line_naming_problem_and_fix(tmp_path, capsys, monkeypatch, extra, named):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    model = tmp_path / "model"
    model.mkdir()
    args = ["--model", str(model), "--output_dir", str(tmp_path / "out"), "--device", "cpu", *extra]
    assert milora_main(["eval", *args]) == eval_cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert named in line and "; " in line


def test_eval_main_leaves_error_reporting_to_the_milora_reporter(tmp_path):
    """Like every subcommand's main: bad input raises, for `milora.cli.run_reporting_errors` to report."""
    with pytest.raises(UsageError, match="--model .*nope: no such directory; give a local model directory"):
        eval_cli.main(["--suite", "gsm8k", "--model", str(tmp_path / "nope")])


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("model.safetensors", b"weights", "is a file; give the model's directory"),
        ("model.gguf", b"<html>", "is not a GGUF file"),
    ],
)
def test_a_model_file_that_is_no_checkpoint_is_one_line_with_status_2(tmp_path, capsys, name, content, named):
    model = tmp_path / name
    model.write_bytes(content)
    assert milora_main(["eval", "--suite", "gsm8k", "--model", str(model), "--device", "cpu"]) == eval_cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert str(model) in line and named in line


def test_missing_model_and_library_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    assert milora_main(["eval", "--suite", "gsm8k", "--model", str(tmp_path / "nope")]) == eval_cli.EXIT_USAGE
    assert "--model" in _one_error_line(capsys)
    broken = tmp_path / "questions.jsonl"
    broken.write_text("{not json\n")
    args = _args(suite="vqa", model=tmp_path, output_dir=tmp_path / "out", vqa_benchmark="pope", vqa_file=broken,
                 device="cpu")  # fmt: skip
    assert milora_main(["eval", *args]) == eval_cli.EXIT_USAGE
    line = _one_error_line(capsys)
    assert str(broken) in line and "line 1" in line
    with pytest.raises(ValueError, match="line 1"):
        milora_main(["eval", *args, "--debug"])


@pytest.fixture
def pope_args_without_questions(tiny_llava_dir, tmp_path) -> list[str]:
    """POPE rows that lack their question: the suite loads the model, then fails (KeyError) building requests."""
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps({"question_id": 0, "answer": "yes", "category": "random"}) + "\n")
    return _args(suite="vqa", model=tiny_llava_dir, output_dir=tmp_path / "out", vqa_benchmark="pope", vqa_file=data,
                 max_gen_toks=2, device="cpu")  # fmt: skip


def test_a_failing_suite_is_one_line_and_debug_shows_its_traceback(pope_args_without_questions, capsys):
    args = pope_args_without_questions
    assert milora_main(["eval", *args]) == eval_cli.EXIT_USAGE
    err = capsys.readouterr().err  # after the model loader's progress bar
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line == "milora eval: error: KeyError: 'question'; run again with --debug for the traceback"
    with pytest.raises(CommandFailed) as raised:
        eval_cli.main(args)
    assert isinstance(raised.value.__cause__, KeyError)
    for argv in (["--debug", "eval", *args], ["eval", *args, "--debug"]):
        with pytest.raises(KeyError, match="question") as raised:
            milora_main(argv)
        assert raised.traceback[-1].name == "question_text"  # the failure's own traceback, not a wrapper's


@pytest.mark.end_to_end
def test_a_failing_suite_run_as_a_script_with_debug_prints_its_traceback(pope_args_without_questions):
    command = [sys.executable, "-m", "eval_harness.cli", *pope_args_without_questions]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == eval_cli.EXIT_USAGE and "Traceback" not in plain.stderr
    assert "milora eval: error: KeyError: 'question'; run again with --debug" in plain.stderr
    debugged = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300)
    assert debugged.returncode == 1 and "Traceback" in debugged.stderr
    assert "in question_text" in debugged.stderr and debugged.stderr.rstrip().endswith("KeyError: 'question'")


def test_imports_go_one_way_and_the_parser_has_no_debug_flag():
    """`milora.cli` dispatches into `eval_harness.cli`, which does not import it back; `--debug` is taken by
    `milora.reporting` before the parser sees the arguments, so the parser does not offer it."""
    from tests.conftest import imported_modules

    assert "milora.cli" not in imported_modules(eval_cli.__file__)
    assert "milora.reporting" in imported_modules(eval_cli.__file__)
    assert "--debug" not in eval_cli.build_parser().format_help()
