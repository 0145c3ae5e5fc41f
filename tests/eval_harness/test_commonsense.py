"""LLM-Adapters commonsense protocol: prompt, option-word extraction, hub-row conversion."""

from __future__ import annotations

import json

import pytest

from eval_harness.commonsense import (
    LLM_ADAPTERS_DIR_NAMES,
    extract_commonsense_answer,
    is_commonsense_correct,
    option_words,
    to_llm_adapters_doc,
)
from eval_harness.prompts import alpaca_prompt, metamath_prompt


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


def test_every_set_has_an_llm_adapters_folder_name():
    assert set(LLM_ADAPTERS_DIR_NAMES) == {
        "boolq",
        "piqa",
        "social_i_qa",
        "hellaswag",
        "winogrande",
        "arc_easy",
        "arc_challenge",
        "openbookqa",
    }
