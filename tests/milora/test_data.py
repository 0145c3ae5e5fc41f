"""`milora.data`: the paper's prompts, the mapping of each source format to TRL rows, and the errors for data that
cannot be trained on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset

from milora.data import (
    DataError,
    gsm8k_completion,
    load_raw_dataset,
    load_sft_dataset,
    prepare_sft_dataset,
    resolve_format,
)
from milora.io import read_jsonl
from milora.prompts import METAMATH_ANSWER_MARKER, alpaca_prompt, metamath_prompt

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_alpaca_prompt_is_llm_adapters():
    assert alpaca_prompt("Is water wet?") == f"{HEADER}\n\n### Instruction:\nIs water wet?\n\n### Response:\n"
    assert alpaca_prompt("Is water wet?", "   ") == alpaca_prompt("Is water wet?")
    assert alpaca_prompt("Translate.", "Hallo {x}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nHallo {x}\n\n### Response:\n"
    )


def test_metamath_prompt():
    assert metamath_prompt("What is 2+3?") == f"{HEADER}\n\n### Instruction:\nWhat is 2+3?\n\n### Response:\n"


def test_training_and_evaluation_prompts_are_tied():
    """Evaluation asks the finetuned model the way training formatted its rows: MetaMath's eval prompt is the
    training prompt with the response primed; a commonsense eval doc's prompt is the training formatter's."""
    from milora.prompts import METAMATH_RESPONSE_PRIMER, metamath_eval_prompt

    question = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
    trained = prepare_sft_dataset(Dataset.from_list([{"query": question, "response": "72"}]), "metamath")[0]
    assert metamath_eval_prompt(question) == trained["prompt"].rstrip("\n") + " " + METAMATH_RESPONSE_PRIMER
    tasks = pytest.importorskip("eval_harness.tasks.math.utils")
    assert tasks._gsm8k_doc({"question": question, "answer": "#### 72"})["prompt"] == metamath_eval_prompt(question)

    commonsense = pytest.importorskip("eval_harness.commonsense")
    row = {"instruction": "Please answer the following question with true or false.\n\nQuestion: is water wet?",
           "input": "", "output": "the correct answer is true", "answer": "true"}
    doc = commonsense.to_llm_adapters_doc("boolq", row)
    assert doc["prompt"] == prepare_sft_dataset(Dataset.from_list([row]), "commonsense")[0]["prompt"]


GSM8K_TRAIN = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k_train.jsonl"


def test_gsm8k_answer_becomes_a_metamath_response():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    assert gsm8k_completion(answer) == (
        "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\nThe answer is: 1072"
    )
    rows = Dataset.from_list([{"question": "q?", "answer": "no final line"}])
    with pytest.raises(DataError, match="dataset g.jsonl, row 0: a GSM8K answer ends with '#### N'"):
        prepare_sft_dataset(rows, "gsm8k", source="g.jsonl")


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="GSM8K train file not available")
def test_gsm8k_rows_from_the_real_file():
    rows = read_jsonl(GSM8K_TRAIN)[:50]
    out = load_sft_dataset(str(GSM8K_TRAIN), "gsm8k", max_samples=50)
    assert out.column_names == ["prompt", "completion"] and len(out) == 50
    for row, formatted in zip(rows, out, strict=True):
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert formatted["prompt"] == metamath_prompt(row["question"])
        completion = formatted["completion"]
        assert completion.endswith(f"\n{METAMATH_ANSWER_MARKER}{final}") and "####" not in completion
        assert "<<" not in completion and ">>" not in completion
        # the worked solution is kept, line for line, without the calculator annotations
        solution = row["answer"].rsplit("####", 1)[0].rstrip().splitlines()
        kept = completion.splitlines()[:-1]
        assert len(kept) == len(solution)
        for original, line in zip(solution, kept, strict=True):
            assert line == re.sub(r"<<[^>]*>>", "", original)
    assert out[0]["completion"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is: 72"
    )


def test_alpaca_rows_become_prompt_completion():
    rows = Dataset.from_list([
        {"instruction": "Pick one.", "input": "", "output": "the correct answer is answer1", "answer": "answer1"},
        {"instruction": "Pick one.", "input": "a or b", "output": "the correct answer is a", "answer": "a"},
    ])
    out = prepare_sft_dataset(rows, "commonsense")
    assert out.column_names == ["prompt", "completion"]
    assert out[0] == {"prompt": alpaca_prompt("Pick one."), "completion": "the correct answer is answer1"}
    assert "### Input:\na or b" in out[1]["prompt"]


def test_alpaca_rows_without_input_column():
    out = prepare_sft_dataset(Dataset.from_list([{"instruction": "Say hi.", "output": "hi"}]), "alpaca")
    assert out[0]["prompt"] == alpaca_prompt("Say hi.")


def test_metamath_rows_become_prompt_completion():
    rows = Dataset.from_list([{"query": "1+1?", "response": "1+1=2\nThe answer is: 2", "type": "GSM_Rephrased"}])
    out = prepare_sft_dataset(rows)  # auto
    assert out[0] == {"prompt": metamath_prompt("1+1?"), "completion": "1+1=2\nThe answer is: 2"}


def test_ultrafeedback_chosen_becomes_messages():
    chosen = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rows = Dataset.from_list([{"prompt": "Hi", "chosen": chosen, "rejected": chosen, "score_chosen": 8.0}])
    out = prepare_sft_dataset(rows, "auto")
    assert out.column_names == ["messages"] and out[0]["messages"] == chosen
    out = prepare_sft_dataset(rows, "chat", messages_field="chosen")
    assert out[0]["messages"] == chosen


def test_chat_rows_need_an_assistant_turn():
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match="row 0: 'messages' has no assistant message"):
        prepare_sft_dataset(rows, source="chat.jsonl")


def test_prompt_completion_rows_pass_through():
    rows = Dataset.from_list([{"prompt": "2+2=", "completion": "4", "id": 7}])
    assert prepare_sft_dataset(rows)[0] == {"prompt": "2+2=", "completion": "4"}


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["prompt", "completion"], ("prompt_completion", "messages")),
        (["messages"], ("chat", "messages")),
        (["query", "response", "type"], ("metamath", "messages")),
        (["instruction", "input", "output", "answer"], ("alpaca", "messages")),
        (["prompt", "chosen", "rejected"], ("chat", "chosen")),
    ],
)
def test_auto_format(columns, expected):
    assert resolve_format("auto", columns) == expected


def test_unknown_format():
    with pytest.raises(DataError, match="unknown dataset_format 'sharegpt'"):
        resolve_format("sharegpt", ["conversations"])


def test_missing_field_names_field_source_and_fields_present():
    rows = Dataset.from_list([{"query": "1+1?", "answer": "2"}])
    with pytest.raises(DataError) as error:
        prepare_sft_dataset(rows, "metamath", source="data/math.jsonl")
    assert str(error.value) == (
        "dataset data/math.jsonl has no field 'response', which format 'metamath' needs; fields present: query, answer"
    )


def test_undetectable_format_lists_fields():
    with pytest.raises(DataError, match=r"cannot tell the dataset format from its fields \(question, label\)"):
        prepare_sft_dataset(Dataset.from_list([{"question": "q", "label": 1}]), source="x.jsonl")


def test_empty_dataset():
    with pytest.raises(DataError, match="dataset x.parquet is empty"):
        prepare_sft_dataset(Dataset.from_dict({"query": [], "response": []}), source="x.parquet")


def test_empty_required_value_names_the_row():
    rows = Dataset.from_list([{"query": "a", "response": "b"}, {"query": "c", "response": None}])
    with pytest.raises(DataError, match="dataset m.jsonl, row 1: field 'response' is empty"):
        prepare_sft_dataset(rows, source="m.jsonl")


def test_max_samples():
    rows = Dataset.from_list([{"query": str(i), "response": str(i)} for i in range(10)])
    assert len(prepare_sft_dataset(rows, max_samples=3)) == 3
    assert len(prepare_sft_dataset(rows, max_samples=30)) == 10


ROWS = [{"query": f"{i}+1?", "response": f"The answer is: {i + 1}"} for i in range(5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files(tmp_path, suffix):
    path = tmp_path / f"math{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        Dataset.from_list(ROWS).to_csv(str(path), index=False)
    out = load_sft_dataset(str(path), "metamath", split="train_sft")  # a file's only split, whatever is asked
    assert len(out) == 5 and out[4]["completion"] == "The answer is: 5"


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_raw_dataset(str(tmp_path / "none.jsonl"))
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match="unsupported dataset file type '.txt'"):
        load_raw_dataset(str(tmp_path / "data.txt"))


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_blank_files_are_empty_datasets(tmp_path, content):
    path = tmp_path / "blank.json"
    path.write_text(content)
    with pytest.raises(DataError, match="is empty"):
        load_sft_dataset(str(path))


def test_bundled_data_formats():
    data = Path(__file__).resolve().parents[2] / "recipes" / "data"
    math = load_sft_dataset(str(data / "tiny_math.jsonl"))
    assert len(math) >= 300 and math[0]["completion"].splitlines()[-1].startswith("The answer is: ")
    assert len(load_sft_dataset(str(data / "tiny_commonsense.json"))) >= 100
    assert load_sft_dataset(str(data / "tiny_chat.jsonl")).column_names == ["messages"]
