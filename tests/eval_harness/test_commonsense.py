"""LLM-Adapters commonsense protocol: prompt, option-word extraction, hub-row conversion, and the lm-eval tasks
on real LLM-Adapters test rows with oracle models (exact accuracies)."""

from __future__ import annotations

import json
import time

import pytest
from lm_eval import simple_evaluate

from eval_harness import lm_eval_runner
from eval_harness.commonsense import (
    LLM_ADAPTERS_DIR_NAMES,
    extract_commonsense_answer,
    is_commonsense_correct,
    llm_adapters_response,
    option_words,
    to_llm_adapters_doc,
)
from eval_harness.local_tasks import project_task_yaml, write_local_task_yaml
from milora.io import read_json, write_json
from milora.prompts import alpaca_prompt
from milora.prompts import metamath_eval_prompt as metamath_prompt
from tests.eval_harness.oracle_lm import OracleLM

REAL_SETS = [name for name, folder in LLM_ADAPTERS_DIR_NAMES.items() if name != "hellaswag"]  # HellaSwag: not public
SLICE = 8


def test_alpaca_prompt_is_the_llm_adapters_generation_prompt():
    assert alpaca_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert "### Input:\nctx\n\n### Response:\n" in alpaca_prompt("Say hi.", "ctx")


def test_metamath_prompt_ends_with_the_step_by_step_primer():
    prompt = metamath_prompt("What is 2+2?")
    assert prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response: Let's think step by step.")


@pytest.mark.parametrize(
    "dataset, generation, expected",
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "false. Hmm, the correct answer is true", "false"),  # the FIRST match counts
        ("boolq", "True", ""),  # case-sensitive, as in LLM-Adapters
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "answer3 is better than answer1", "answer3"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("winogrande", "option1", "option1"),
        ("arc_challenge", "The correct answer is answer4.", "answer4"),
        ("openbookqa", "I do not know", ""),
        ("piqa", "the correct answer is answer1", ""),  # another set's word is no answer
        # LLM-Adapters keeps the text before the next "### Response:" only
        ("boolq", "I am not sure.\n\n### Response:\nthe correct answer is true", ""),
        ("piqa", " solution2\n### Response: solution1", "solution2"),
        ("winogrande", "### Response: option1", ""),
    ],
)
def test_first_option_word_is_extracted(dataset, generation, expected):
    assert extract_commonsense_answer(dataset, generation) == expected


def test_option_words_per_set():
    assert option_words("boolq") == ["true", "false"]
    assert option_words("hellaswag") == ["ending1", "ending2", "ending3", "ending4"]
    assert option_words("winogrande") == ["option1", "option2"]
    assert option_words("social_i_qa")[:3] == ["answer1", "answer2", "answer3"]


def test_llm_adapters_rows_pass_through(fixtures_dir):
    row = json.loads((fixtures_dir / "commonsense" / "boolq" / "test.json").read_text())[0]
    doc = to_llm_adapters_doc("boolq", row)
    assert doc["answer"] == "true"
    assert doc["prompt"] == alpaca_prompt(row["instruction"])
    assert is_commonsense_correct("boolq", "the correct answer is true", doc["answer"])
    assert not is_commonsense_correct("boolq", "the correct answer is false", doc["answer"])


def test_hub_piqa_row_becomes_the_llm_adapters_instruction(fixtures_dir):
    hub_row = json.loads((fixtures_dir / "hub_rows" / "piqa.jsonl").read_text().splitlines()[0])
    llm_adapters_row = json.loads((fixtures_dir / "commonsense" / "piqa" / "test.json").read_text())[0]
    doc = to_llm_adapters_doc("piqa", hub_row)
    assert doc["instruction"] == llm_adapters_row["instruction"]
    assert doc["answer"] == llm_adapters_row["answer"] == "solution1"


def test_hub_arc_row_with_numeric_labels(fixtures_dir):
    hub_row = json.loads((fixtures_dir / "hub_rows" / "arc_easy.jsonl").read_text().splitlines()[1])
    doc = to_llm_adapters_doc("arc_easy", hub_row)
    assert doc["answer"] == "answer4"  # answerKey "4" is the 4th choice
    assert doc["instruction"].endswith("Answer4: an iron nail\n\nAnswer format: answer1/answer2/answer3/answer4")


@pytest.mark.parametrize(
    "dataset, row, gold, fragment",
    [
        (
            "boolq",
            {"question": "is the sky blue", "answer": True, "passage": "..."},
            "true",
            "question: is the sky blue?\n\nAnswer format: true/false",
        ),
        (
            "social_i_qa",
            {
                "context": "Tracy went home.",
                "question": "Why?",
                "answerA": "x",
                "answerB": "y",
                "answerC": "z",
                "label": "2",
            },
            "answer2",
            "Answer3: z\n\nAnswer format: answer1/answer2/answer3",
        ),
        (
            "winogrande",
            {"sentence": "A _ b.", "option1": "c", "option2": "d", "answer": "2"},
            "option2",
            "Option2: d\n\nAnswer format: option1/option2",
        ),
        (
            "hellaswag",
            {
                "activity_label": "Baking",
                "ctx_a": "She mixes.",
                "ctx_b": "then",
                "label": "1",
                "endings": ["a [title] b", "c", "d", "e"],
            },
            "ending2",
            "sentence: Baking: She mixes. Then\n\nEnding1: a. b\n\nEnding2: c",
        ),
        (
            "openbookqa",
            {
                "question_stem": "Fog is near",
                "choices": {"text": ["a marsh", "a desert"], "label": ["A", "B"]},
                "answerKey": "A",
            },
            "answer1",
            "question: Fog is near\n\nAnswer1: a marsh",
        ),
    ],
)
def test_hub_rows_of_each_format(dataset, row, gold, fragment):
    doc = to_llm_adapters_doc(dataset, row)
    assert doc["answer"] == gold
    assert fragment in doc["instruction"]


def test_the_response_is_the_text_before_the_next_response_marker():
    assert llm_adapters_response("  the correct answer is true\n\n### Response:\nfalse") == "the correct answer is true"
    assert llm_adapters_response("no marker ") == "no marker"


@pytest.mark.parametrize(
    "generation",
    ["", "\x00\ufffd" * 1000, "answer" * 200_000, "### Response:" * 50_000, "🙂 ending" * 100_000, "true" * 10**6],
)
def test_extraction_never_crashes_or_hangs_on_odd_output(generation):
    start = time.perf_counter()
    for dataset in LLM_ADAPTERS_DIR_NAMES:
        assert extract_commonsense_answer(dataset, generation) in ["", *option_words(dataset)]
    assert time.perf_counter() - start < 5.0


@pytest.fixture(scope="module")
def real_rows(shared_data_dir) -> dict[str, list[dict]]:
    return {
        name: read_json(shared_data_dir / "commonsense" / LLM_ADAPTERS_DIR_NAMES[name] / "test.json")
        for name in REAL_SETS
    }


def test_llm_adapters_reference_outputs_of_every_real_row_score_correct(real_rows):
    for name, rows in real_rows.items():
        for row in rows:
            doc = to_llm_adapters_doc(name, row)
            assert doc["prompt"] == alpaca_prompt(row["instruction"])
            assert doc["answer"] in option_words(name), (name, row)
            assert is_commonsense_correct(name, row["output"], doc["answer"]), (name, row)


@pytest.fixture(scope="module")
def real_manager(tmp_path_factory, real_rows):
    """Local variants of the 7 project tasks, each reading the first SLICE real test rows."""
    folder = tmp_path_factory.mktemp("real_commonsense")
    for name, rows in real_rows.items():
        data = write_json(folder / "data" / f"{name}.json", rows[:SLICE])
        write_local_task_yaml(project_task_yaml(f"milora_{name}"), data, folder / "tasks")
    return lm_eval_runner.task_manager([folder / "tasks"])


def _accuracies(lm, manager, gen_kwargs=None) -> dict[str, float]:
    tasks = [f"milora_{name}" for name in REAL_SETS]
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, bootstrap_iters=0, gen_kwargs=gen_kwargs)
    metrics = lm_eval_runner.metrics_of(results)
    assert all(metrics[t]["n"] == SLICE for t in tasks)
    return {t.removeprefix("milora_"): metrics[t]["acc"] for t in tasks}


def test_oracle_answering_gold_scores_one_on_real_rows(real_rows, real_manager):
    lm = OracleLM({row["instruction"]: row["output"] for rows in real_rows.values() for row in rows[:SLICE]})
    assert _accuracies(lm, real_manager) == {name: 1.0 for name in REAL_SETS}
    assert all(prompt.endswith("### Response:\n") for prompt in lm.prompts)


def test_constant_first_option_scores_the_share_of_first_option_golds(real_rows, real_manager):
    first = {name: option_words(name)[0] for name in REAL_SETS}
    lm = OracleLM(
        {
            row["instruction"]: f"the correct answer is {first[name]}"
            for name in REAL_SETS
            for row in real_rows[name][:SLICE]
        }
    )
    expected = {
        name: sum(row["answer"] == first[name] for row in real_rows[name][:SLICE]) / SLICE for name in REAL_SETS
    }
    assert _accuracies(lm, real_manager) == pytest.approx(expected)


def test_gold_after_the_next_response_marker_does_not_count(real_rows, real_manager):
    lm = OracleLM(
        {
            row["instruction"]: f"Let me see.\n\n### Response:\n{row['output']}"
            for rows in real_rows.values()
            for row in rows[:SLICE]
        }
    )
    assert _accuracies(lm, real_manager) == {name: 0.0 for name in REAL_SETS}


def test_tasks_decode_with_four_beams_unless_overridden(real_manager):
    task = real_manager.load(["milora_boolq"])["tasks"]["milora_boolq"]
    assert task.config.generation_kwargs["num_beams"] == 4
    assert task.config.generation_kwargs["max_gen_toks"] == 32 and task.config.generation_kwargs["until"] == []
    lm = OracleLM({"Please answer": "the correct answer is true"})
    results = simple_evaluate(
        model=lm,
        tasks=["milora_boolq"],
        task_manager=real_manager,
        limit=1,
        gen_kwargs={"num_beams": 1},
        bootstrap_iters=0,
    )
    assert results["configs"]["milora_boolq"]["generation_kwargs"]["num_beams"] == 1
