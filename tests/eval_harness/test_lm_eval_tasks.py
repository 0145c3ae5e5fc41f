"""The project's lm-eval tasks, run by lm-eval itself (simple_evaluate) from local fixture files.

Two kinds of model: the tiny merged checkpoint through lm-eval's HFLM (the real generation path), and an
"oracle" LM (`oracle_lm.OracleLM`, a real `lm_eval.api.model.LM` subclass) that answers every prompt with the
reference answer written in the data file (or a wrong one), so the whole task pipeline -- doc conversion,
prompt, answer extraction, metric aggregation -- must give exactly 1.0 (or 0.0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lm_eval
import pytest
from lm_eval import simple_evaluate

from eval_harness import lm_eval_runner
from eval_harness.local_tasks import TASKS_DIR, project_task_yaml, task_yaml, write_local_task_yaml
from milora.io import read_json_rows, read_jsonl, write_jsonl
from tests.eval_harness.oracle_lm import OracleLM

# fmt: off
PROJECT_TASKS = [
    "milora_boolq", "milora_piqa", "milora_social_i_qa", "milora_hellaswag", "milora_winogrande",
    "milora_arc_easy", "milora_arc_challenge", "milora_openbookqa", "milora_gsm8k", "milora_math",
]
# fmt: on
LIMIT = 3


@pytest.fixture(scope="module")
def gsm8k_slice(tmp_path_factory, gsm8k_test_file) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("gsm8k") / "gsm8k_slice.jsonl", read_jsonl(gsm8k_test_file)[:4])


@pytest.fixture(scope="module")
def data_files(fixtures_dir, gsm8k_slice) -> dict[str, Path]:
    return {
        "milora_boolq": fixtures_dir / "commonsense" / "boolq" / "test.json",  # LLM-Adapters format
        "milora_piqa": fixtures_dir / "hub_rows" / "piqa.jsonl",  # raw hub rows
        "milora_arc_challenge": fixtures_dir / "commonsense" / "ARC-Challenge" / "test.json",
        "milora_gsm8k": gsm8k_slice,  # the real test set
        "milora_math": fixtures_dir / "math_test.jsonl",
        "ifeval": fixtures_dir / "ifeval_sample.jsonl",  # lm-eval's own task
    }


@pytest.fixture(scope="module")
def manager(tmp_path_factory, data_files):
    variant_dir = tmp_path_factory.mktemp("local_tasks")
    for task, path in data_files.items():
        write_local_task_yaml(task_yaml(task), path, variant_dir)
    return lm_eval_runner.task_manager([variant_dir])


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    return lm_eval_runner.build_lm(str(tiny_llama_dir), device="cpu", batch_size=4, max_length=256)


# --------------------------------------------------------------------------- task files


def test_include_path_indexes_every_project_task_and_the_group():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(PROJECT_TASKS) <= set(manager.all_subtasks)
    assert "milora_commonsense" in manager.all_groups
    assert "milora_math_tasks" in manager.all_tags


def test_tasks_read_the_hub_by_default():
    from lm_eval.tasks._yaml_loader import load_yaml

    sources = {task: load_yaml(project_task_yaml(task), resolve_func=False)["dataset_path"] for task in PROJECT_TASKS}
    assert sources["milora_gsm8k"] == "openai/gsm8k"
    assert sources["milora_math"] == "DigitalLearningGmbH/MATH-lighteval"
    assert all("/" in source for source in sources.values()), sources  # hub ids, no local loader


def test_local_variant_yaml_points_at_the_file(tmp_path, fixtures_dir):
    data = fixtures_dir / "math_test.jsonl"
    path = write_local_task_yaml(project_task_yaml("milora_math"), data, tmp_path, task_name="milora_math_local")
    text = path.read_text()
    assert "dataset_path: json" in text and str(data.resolve()) in text
    assert "include: " + str(project_task_yaml("milora_math")) in text
    manager = lm_eval_runner.task_manager([tmp_path])
    task = manager.load(["milora_math_local"])["tasks"]["milora_math_local"]
    assert task.config.dataset_kwargs == {"data_files": {"test": str(data.resolve())}}
    assert callable(task.config.process_results)  # inherited from the base YAML's utils.py
    assert len(task.test_docs()) == 4
    with pytest.raises(FileNotFoundError):
        write_local_task_yaml(project_task_yaml("milora_math"), tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(ValueError):
        write_local_task_yaml(project_task_yaml("milora_math"), tmp_path / "data.txt", tmp_path)


# --------------------------------------------------------------------------- tiny checkpoint through HFLM


def test_tiny_checkpoint_gets_metrics_on_every_local_task(tiny_lm, manager, data_files):
    run = lm_eval_runner.run_tasks(tiny_lm, list(data_files), manager, limit=LIMIT, gen_kwargs={"max_gen_toks": 4})
    assert run.skipped == {}
    expected = {
        "milora_boolq": {"acc"},
        "milora_piqa": {"acc"},
        "milora_arc_challenge": {"acc"},
        "milora_gsm8k": {"exact_match", "exact_match_flex"},
        "milora_math": {"exact_match", "exact_match_flex"},
        "ifeval": {
            "prompt_level_strict_acc",
            "inst_level_strict_acc",
            "prompt_level_loose_acc",
            "inst_level_loose_acc",
        },
    }
    for task, metric_names in expected.items():
        metrics = run.metrics[task]
        assert metric_names <= set(metrics), task
        assert metrics["n"] == min(LIMIT, len(read_json_rows(data_files[task])))
        for name in metric_names:  # the task's score is the mean of its logged per-item scores
            assert metrics[name] == pytest.approx(_mean([row["metrics"][name] for row in run.samples[task]]))
    # Four generated byte-tokens cannot hold an option word of 7+ letters, nor "The answer is: <x>".
    for task in ("milora_piqa", "milora_arc_challenge"):
        assert run.metrics[task]["acc"] == 0.0
    for task in ("milora_gsm8k", "milora_math"):
        assert run.metrics[task]["exact_match"] == 0.0
    # boolq: LLM-Adapters' rule, the first of "true"/"false" in the response, re-applied to the logged responses
    for row in run.samples["milora_boolq"]:
        found = re.findall(r"true|false", row["response"][0].split("### Response:")[0].strip())
        assert row["metrics"]["acc"] == (bool(found) and found[0] == row["target"])
    sample = run.samples["milora_piqa"][0]
    assert sample["doc"]["prompt"].startswith("Below is an instruction that describes a task.")
    assert sample["doc"]["prompt"].endswith("Answer format: solution1/solution2\n\n### Response:\n")
    assert sample["prompt"] == sample["doc"]["prompt"]  # exactly what the model was given
    gsm8k_prompt = run.samples["milora_gsm8k"][0]["prompt"]
    assert gsm8k_prompt.endswith("### Response: Let's think step by step.")


def test_builtin_lm_eval_tasks_still_run_on_the_merged_checkpoint(tiny_lm, tmp_path, fixtures_dir):
    builtin = Path(lm_eval.__file__).parent / "tasks"
    sources = {
        "boolq": (
            builtin / "super_glue" / "boolq" / "default.yaml",
            fixtures_dir / "hub_rows" / "boolq_super_glue.jsonl",
        ),
        "piqa": (builtin / "piqa" / "piqa.yaml", fixtures_dir / "hub_rows" / "piqa.jsonl"),
        "arc_easy": (builtin / "arc" / "arc_easy.yaml", fixtures_dir / "hub_rows" / "arc_easy.jsonl"),
        "ifeval": (builtin / "ifeval" / "ifeval.yaml", fixtures_dir / "ifeval_sample.jsonl"),
    }
    for yaml_path, data in sources.values():
        write_local_task_yaml(yaml_path, data, tmp_path)
    manager = lm_eval_runner.task_manager([tmp_path])
    run = lm_eval_runner.run_tasks(
        tiny_lm, list(sources), manager, limit=2, gen_kwargs={"max_gen_toks": 4}, keep_going=False
    )
    assert {"acc"} <= set(run.metrics["boolq"])
    for task in ("piqa", "arc_easy"):
        assert {"acc", "acc_norm"} <= set(run.metrics[task])
    assert {"prompt_level_strict_acc", "inst_level_loose_acc"} <= set(run.metrics["ifeval"])
    assert all(run.metrics[task]["n"] == 2 for task in sources)


def _mean(scores: list) -> float:
    """Mean of logged per-item scores: bools, or (IFEval's instruction level) lists of bools, pooled."""
    pooled = [s for score in scores for s in (score if isinstance(score, list) else [score])]
    return sum(pooled) / len(pooled)


# --------------------------------------------------------------------------- oracle answers


def _oracle_responses(data_files, correct: bool) -> dict[str, str]:
    responses = {}
    for row in read_json_rows(data_files["milora_boolq"]) + read_json_rows(data_files["milora_arc_challenge"]):
        output = row["output"]  # LLM-Adapters' reference response, e.g. "the correct answer is true"
        if not correct:
            output = (
                "the correct answer is false"
                if row["answer"] == "true"
                else (
                    "the correct answer is true"
                    if row["answer"] == "false"
                    else f"the correct answer is answer{1 + int(row['answer'][-1]) % 4}"
                )
            )
        responses[row["instruction"]] = output
    for row in read_json_rows(data_files["milora_gsm8k"]):
        body, final = row["answer"].split("####")
        final = final.strip() if correct else str(int(final.strip().replace(",", "")) + 1)
        responses[row["question"]] = re.sub(r"<<[^>]*>>", "", body).strip() + f"\nThe answer is: {final}"
    for row in read_json_rows(data_files["milora_math"]):
        boxed = re.findall(r"\\boxed\{(.*)\}", row["solution"])[-1]
        final = boxed if correct else boxed + "+1"
        responses[row["problem"]] = f"{row['solution']}\nThe answer is: {final}"
    return responses


@pytest.mark.parametrize("correct", [True, False])
def test_oracle_answers_score_exactly(manager, data_files, correct):
    tasks = ["milora_boolq", "milora_arc_challenge", "milora_gsm8k", "milora_math"]
    results = simple_evaluate(
        model=OracleLM(_oracle_responses(data_files, correct)), tasks=tasks, task_manager=manager, bootstrap_iters=0
    )
    metrics = lm_eval_runner.metrics_of(results)
    expected = 1.0 if correct else 0.0
    assert metrics["milora_boolq"]["acc"] == expected
    assert metrics["milora_arc_challenge"]["acc"] == expected
    assert metrics["milora_gsm8k"]["exact_match"] == expected
    assert metrics["milora_math"]["exact_match"] == expected
    assert metrics["milora_gsm8k"]["n"] == 4 and metrics["milora_math"]["n"] == 4


def _last_boxed(solution: str) -> str:
    """The content of the last \\boxed{...} of a MATH solution, braces matched."""
    start = solution.rindex("\\boxed{") + len("\\boxed{")
    depth = 1
    for end in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        if depth == 0:
            return solution[start:end]
    raise ValueError("unbalanced \\boxed{")


@pytest.mark.parametrize("correct", [True, False])
def test_oracle_on_real_math_rows(tmp_path, shared_data_dir, correct):
    rows = read_jsonl(shared_data_dir / "math" / "math_test.jsonl")[:10]
    write_local_task_yaml(project_task_yaml("milora_math"), write_jsonl(tmp_path / "math.jsonl", rows), tmp_path)
    answers = {row["problem"]: _last_boxed(row["solution"]) for row in rows}
    final = {problem: answer if correct else answer + "1" for problem, answer in answers.items()}
    responses = {problem: f"We compute.\nThe answer is: {answer}" for problem, answer in final.items()}
    results = simple_evaluate(
        model=OracleLM(responses), tasks=["milora_math"], task_manager=lm_eval_runner.task_manager([tmp_path])
    )
    metrics = lm_eval_runner.metrics_of(results)["milora_math"]
    assert metrics["n"] == 10 and metrics["exact_match"] == (1.0 if correct else 0.0)


# --------------------------------------------------------------------------- the real lm_eval command


@pytest.mark.end_to_end
def test_lm_eval_command_runs_a_project_task_from_outside_the_repository(tiny_llama_dir, tmp_path, fixtures_dir):
    """`lm_eval run --include_path ...` in a foreign working directory, milora not installed: the task's
    utils.py must still find eval_harness, and lm-eval must write its results file."""
    import os
    import shutil
    import subprocess
    import sys

    variant_dir = tmp_path / "tasks"
    write_local_task_yaml(
        project_task_yaml("milora_boolq"),
        fixtures_dir / "commonsense" / "boolq" / "test.json",
        variant_dir,
        task_name="milora_boolq_fixture",
    )
    executable = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    completed = subprocess.run(
        [
            executable,
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_llama_dir},max_length=256",
            "--tasks",
            "milora_boolq_fixture",
            "--include_path",
            str(variant_dir),
            "--device",
            "cpu",
            "--limit",
            "2",
            "--gen_kwargs",
            "max_gen_toks=4",
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "milora_boolq_fixture" in completed.stdout
    (results_file,) = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]["milora_boolq_fixture"]
    (samples_file,) = list((tmp_path / "out").rglob("samples_milora_boolq_fixture_*.jsonl"))
    samples = read_jsonl(samples_file)
    assert [s["target"] for s in samples] == ["true", "true"]  # LLM-Adapters' golds, through utils.process_docs
    for sample in samples:  # utils.process_results: LLM-Adapters' first "true"/"false" of the response
        found = re.findall(r"true|false", sample["filtered_resps"][0].split("### Response:")[0].strip())
        assert sample["acc"] == (bool(found) and found[0] == sample["target"])
    assert results["acc,none"] == sum(s["acc"] for s in samples) / 2


# --------------------------------------------------------------------------- generation limits


@pytest.mark.parametrize(
    "task_settings, cap, expected",
    [
        ({"until": [], "max_gen_toks": 32, "num_beams": 4}, 128, {"until": [], "max_gen_toks": 32, "num_beams": 4}),
        ({"until": ["\n"], "max_gen_toks": 2048}, 128, {"until": ["\n"], "max_gen_toks": 128}),
        ({"until": ["\n"]}, 100, {"until": ["\n"], "max_gen_toks": 100}),  # no limit of its own: HFLM's 256
        ({"until": ["\n"]}, 300, {"until": ["\n"], "max_gen_toks": 256}),
        ({"max_new_tokens": 16}, 128, {"max_gen_toks": 16}),  # lm-eval's other names for the limit count too
        ({"max_tokens": 1000, "max_completion_tokens": 8}, 128, {"max_gen_toks": 128}),  # in lm-eval's priority
    ],
)
def test_the_cap_only_lowers_a_task_s_token_limit(task_settings, cap, expected):
    assert lm_eval_runner.capped_generation_kwargs(task_settings, cap, default=256) == expected


def test_short_context_cap_keeps_smaller_task_limits(tiny_llama_dir, tmp_path, fixtures_dir, capsys):
    """The tiny llama has 512 positions: at most 128 new tokens. The commonsense task's own 32 stays 32 (it used
    to be raised to 128), MATH's 2048 becomes 128, and a task with no limit (HFLM's 256) gets 128; the samples
    record the settings lm-eval generated with."""
    from milora.cli import main as milora_main

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    rows = write_jsonl(tmp_path / "echo.jsonl", [{"question": "Say hi.", "answer": "hi"}])
    (tasks_dir / "echo_no_limit.yaml").write_text(
        "task: echo_no_limit\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {rows}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: []\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    out = tmp_path / "out"
    status = milora_main(
        ["eval", "--suite", "lm_eval", "--tasks", "milora_boolq,milora_math,echo_no_limit", "--model",
         str(tiny_llama_dir), "--output_dir", str(out), "--include_path", str(tasks_dir), "--data_dir",
         str(fixtures_dir), "--math_file", str(fixtures_dir / "math_test.jsonl"), "--limit", "1", "--num_beams",
         "1", "--batch_size", "1", "--device", "cpu"]
    )  # fmt: skip
    assert status == 0
    limits = {}
    for task in ("milora_boolq", "milora_math", "echo_no_limit"):
        [sample] = read_jsonl(out / "samples" / f"{task}.jsonl")
        limits[task] = sample["generation_kwargs"]["max_gen_toks"]
        assert sample["generation_kwargs"]["num_beams"] == 1  # --num_beams still replaces the task's own
    assert limits == {"milora_boolq": 32, "milora_math": 128, "echo_no_limit": 128}
    assert "context of 512 tokens; each task generates at most 128 new tokens" in capsys.readouterr().out


def test_an_explicit_max_gen_toks_replaces_every_task_s_limit_without_a_cap(tiny_llama_dir):
    from argparse import Namespace

    from eval_harness.suites import lm_eval_suite

    explicit = Namespace(model=str(tiny_llama_dir), max_gen_toks=600, num_beams=None)
    assert lm_eval_suite.generation_overrides(explicit) == {"max_gen_toks": 600}
    assert lm_eval_suite.short_context_cap(explicit) is None
    default = Namespace(model=str(tiny_llama_dir), max_gen_toks=None, num_beams=None)
    assert lm_eval_suite.generation_overrides(default) is None
    assert lm_eval_suite.short_context_cap(default) == 512 // 4
