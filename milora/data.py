"""Training data for the recipes: load a dataset and turn its rows into what TRL's `SFTTrainer` trains on.

Three source formats, each mapped so that the loss falls on the response only:

- `alpaca` (alias `commonsense`): LLM-Adapters' instruction/input/output rows (Commonsense170K, math10K) with
  their Alpaca-style prompt -> TRL prompt/completion rows (`completion_only_loss`).
- `metamath`: MetaMathQA's query/response rows with the MetaMath prompt -> prompt/completion rows.
- `chat`: a column of chat messages (`messages`, or UltraFeedback's `chosen`) -> TRL conversational rows, rendered
  with the tokenizer's chat template (`assistant_only_loss`).

`prompt_completion` rows pass through unchanged. The prompt templates are exported so that evaluation can prompt
the finetuned model exactly as it was trained.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PROMPT = ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = ALPACA_HEADER_WITH_INPUT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
METAMATH_PROMPT = ALPACA_HEADER + "### Instruction:\n{query}\n\n### Response:\n"

# Fields each format needs; `chat` needs its messages column, named by `messages_field`.
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "metamath": ("query", "response"),
    "prompt_completion": ("prompt", "completion"),
    "chat": (),
}
FORMAT_ALIASES = {"commonsense": "alpaca"}
FORMATS = ("auto", *REQUIRED_FIELDS, *FORMAT_ALIASES)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A dataset that cannot be trained on as configured; the message says what is wrong and where."""


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """LLM-Adapters' prompt for an instruction, with the input variant when `input` is non-empty."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def metamath_prompt(query: str) -> str:
    """The MetaMath prompt for a math question."""
    return METAMATH_PROMPT.format(query=query)


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
    """The canonical format name and messages column; `auto` picks the format from the columns present."""
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
            f"alpaca (instruction, output), metamath (query, response), chat ({messages_field}), "
            "prompt_completion (prompt, completion)"
        )
    if dataset_format not in REQUIRED_FIELDS:
        raise DataError(f"unknown dataset_format {dataset_format!r}; choose one of {', '.join(FORMATS)}")
    return dataset_format, messages_field


def _format_alpaca(example: dict) -> dict:
    return {"prompt": alpaca_prompt(example["instruction"], example.get("input")), "completion": example["output"]}


def _format_metamath(example: dict) -> dict:
    return {"prompt": metamath_prompt(example["query"]), "completion": example["response"]}


def _format_chat(example: dict, messages_field: str) -> dict:
    messages = [{"role": m["role"], "content": m["content"]} for m in example[messages_field]]
    return {"messages": messages}


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
        if fmt == "alpaca":
            return _format_alpaca(example)
        if fmt == "metamath":
            return _format_metamath(example)
        if fmt == "chat":
            row = _format_chat(example, messages_field)
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise DataError(f"dataset {source}, row {index}: {messages_field!r} has no assistant message")
            return row
        return {"prompt": example["prompt"], "completion": example["completion"]}

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
