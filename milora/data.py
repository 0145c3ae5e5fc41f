"""Text training data: load a dataset and turn its rows into what TRL's `SFTTrainer` trains on.

Each source format maps to rows whose loss falls on the response only:

- `alpaca` (alias `commonsense`): LLM-Adapters' instruction/input/output rows (Commonsense170K, math10K) with
  their Alpaca-style prompt -> TRL prompt/completion rows (`completion_only_loss`).
- `metamath`: MetaMathQA's query/response rows with the MetaMath prompt -> prompt/completion rows.
- `gsm8k`: GSM8K's question/answer rows -> MetaMath prompt/completion rows: the worked solution without the
  calculator annotations (`<<48/2=24>>`), ending in MetaMath's "The answer is: N" instead of `#### N`.
- `chat`: a column of chat messages (`messages`, or UltraFeedback's `chosen`) -> TRL conversational rows, rendered
  with the tokenizer's chat template (`assistant_only_loss`).

`prompt_completion` rows pass through unchanged. The prompts come from `milora.prompts`, which evaluation uses
too, so a finetuned model is asked the way it was trained.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from milora.prompts import METAMATH_ANSWER_MARKER, alpaca_prompt, metamath_prompt

# Fields each format needs; `chat` needs its messages column, named by `messages_field`.
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "metamath": ("query", "response"),
    "gsm8k": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "chat": (),
}
FORMAT_ALIASES = {"commonsense": "alpaca"}
FORMATS = ("auto", *REQUIRED_FIELDS, *FORMAT_ALIASES)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

GSM8K_FINAL_ANSWER = re.compile(r"\n?####\s*(?P<answer>[^\n]*)\s*$")
GSM8K_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """A dataset that cannot be trained on as configured; the message says what is wrong and where."""


def is_local_data_path(name_or_path: str) -> bool:
    """Whether a dataset name names a local file or folder rather than a hub id."""
    return (
        os.path.exists(name_or_path)
        or name_or_path.startswith((".", "/", "~"))
        or os.path.splitext(name_or_path)[1].lower() in DATA_FILE_BUILDERS
    )


def load_raw_dataset(name_or_path: str, *, config: str | None = None, split: str = "train"):
    """Load one split of a local json/jsonl/parquet/csv file, a local dataset folder or a hub dataset."""
    from datasets import load_dataset

    if is_local_data_path(name_or_path):
        path = os.path.expanduser(name_or_path)
        if not os.path.exists(path):
            raise DataError(f"dataset file not found: {name_or_path}")
        if os.path.isdir(path):
            return load_dataset(path, name=config, split=split)
        ext = os.path.splitext(path)[1].lower()
        if ext not in DATA_FILE_BUILDERS:
            raise DataError(
                f"unsupported dataset file type {ext!r} for {name_or_path}; use one of "
                + ", ".join(sorted(DATA_FILE_BUILDERS))
            )
        if _is_blank_file(path):
            raise DataError(f"dataset {name_or_path} is empty: it has no rows to train on")
        # A local file has a single split, which `datasets` names "train" whatever the recipe's split is.
        return load_dataset(DATA_FILE_BUILDERS[ext], data_files=path, split="train")
    return load_dataset(name_or_path, name=config, split=split)


def _is_blank_file(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if os.path.splitext(path)[1].lower() in (".json", ".jsonl"):
        with open(path, "rb") as handle:
            head = handle.read(4096).strip()
        return head in (b"", b"[]")
    return False


def resolve_format(dataset_format: str, columns: Sequence[str], messages_field: str = "messages") -> tuple[str, str]:
    """The canonical format name and messages column; `auto` picks the format from the columns present
    (never `gsm8k`: question/answer columns are too common to guess from)."""
    dataset_format = FORMAT_ALIASES.get(dataset_format, dataset_format)
    if dataset_format == "auto":
        present = set(columns)
        if {"prompt", "completion"} <= present:
            return "prompt_completion", messages_field
        if messages_field in present:
            return "chat", messages_field
        if {"query", "response"} <= present:
            return "metamath", messages_field
        if {"instruction", "output"} <= present:
            return "alpaca", messages_field
        if "chosen" in present:
            return "chat", "chosen"
        raise DataError(
            "cannot tell the dataset format from its fields "
            f"({', '.join(columns) or 'none'}); set dataset_format to one of "
            f"alpaca (instruction, output), metamath (query, response), gsm8k (question, answer), "
            f"chat ({messages_field}), prompt_completion (prompt, completion)"
        )
    if dataset_format not in REQUIRED_FIELDS:
        raise DataError(f"unknown dataset_format {dataset_format!r}; choose one of {', '.join(FORMATS)}")
    return dataset_format, messages_field


def gsm8k_completion(answer: str) -> str:
    """A GSM8K answer as a MetaMath response: the worked solution without calculator annotations, then
    "The answer is: N" (thousands separators dropped) in place of the `#### N` line."""
    found = GSM8K_FINAL_ANSWER.search(answer)
    if found is None:
        raise ValueError("a GSM8K answer ends with '#### N' (the final answer); this one has no '####' line")
    final = found.group("answer").strip().replace(",", "")
    solution = GSM8K_CALCULATOR_ANNOTATION.sub("", answer[: found.start()]).rstrip()
    return f"{solution}\n{METAMATH_ANSWER_MARKER}{final}" if solution else f"{METAMATH_ANSWER_MARKER}{final}"


def _format_row(fmt: str, example: dict, messages_field: str) -> dict:
    if fmt == "alpaca":
        return {"prompt": alpaca_prompt(example["instruction"], example.get("input")), "completion": example["output"]}
    if fmt == "metamath":
        return {"prompt": metamath_prompt(example["query"]), "completion": example["response"]}
    if fmt == "gsm8k":
        return {"prompt": metamath_prompt(example["question"]), "completion": gsm8k_completion(example["answer"])}
    if fmt == "chat":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in example[messages_field]]}
    return {"prompt": example["prompt"], "completion": example["completion"]}


def prepare_sft_dataset(
    dataset,
    dataset_format: str = "auto",
    *,
    source: str = "dataset",
    messages_field: str = "messages",
    max_samples: int | None = None,
):
    """Check a loaded dataset and map it to TRL prompt/completion or conversational rows.

    `source` names the dataset (file or hub id) in error messages. Rows whose required fields are missing or
    empty raise `DataError` naming the field, the source and the fields present.
    """
    columns = list(dataset.column_names)
    if len(dataset) == 0:
        raise DataError(f"dataset {source} is empty: it has no rows to train on")
    fmt, messages_field = resolve_format(dataset_format, columns, messages_field)
    required = REQUIRED_FIELDS[fmt] or (messages_field,)
    for field in required:
        if field not in columns:
            raise DataError(
                f"dataset {source} has no field {field!r}, which format {fmt!r} needs; "
                f"fields present: {', '.join(columns) or 'none'}"
            )
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))

    def convert(example: dict, index: int) -> dict:
        for field in required:
            if example[field] is None or (isinstance(example[field], (str, list)) and len(example[field]) == 0):
                raise DataError(f"dataset {source}, row {index}: field {field!r} is empty")
        try:
            row = _format_row(fmt, example, messages_field)
        except ValueError as error:
            raise DataError(f"dataset {source}, row {index}: {error}") from None
        if fmt == "chat" and not any(m["role"] == "assistant" for m in row["messages"]):
            raise DataError(f"dataset {source}, row {index}: {messages_field!r} has no assistant message")
        return row

    # Drop the source columns so that only what TRL trains on is left (e.g. UltraFeedback's `rejected`).
    return dataset.map(convert, with_indices=True, remove_columns=columns, desc=f"Formatting {fmt} rows")


def load_sft_dataset(
    name_or_path: str,
    dataset_format: str = "auto",
    *,
    config: str | None = None,
    split: str = "train",
    messages_field: str = "messages",
    max_samples: int | None = None,
):
    """Load and format one split: `load_raw_dataset` then `prepare_sft_dataset`."""
    raw = load_raw_dataset(name_or_path, config=config, split=split)
    source = name_or_path if split == "train" or is_local_data_path(name_or_path) else f"{name_or_path}[{split}]"
    return prepare_sft_dataset(
        raw, dataset_format, source=source, messages_field=messages_field, max_samples=max_samples
    )
