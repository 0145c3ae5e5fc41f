"""The LLM-Adapters commonsense protocol: instructions, option words and answer extraction for 8 datasets.

The paper scores commonsense reasoning by generation, as LLM-Adapters' ``commonsense_evaluate.py`` does: the
model reads an instruction that lists the options (``Answer1: ...``) and ends with ``Answer format:
answer1/answer2/...``, and generates 32 tokens with 4-beam search; the response is the text up to the next
``### Response:`` (LLM-Adapters splits the decoded text at that marker and keeps the part after the prompt's),
the prediction is the FIRST option word found in it (case-sensitive, as in LLM-Adapters' ``extract_answer``),
and accuracy is exact equality with the gold option word.

Docs come either in LLM-Adapters' own format (``instruction``, ``input``, ``output``, ``answer``: the
``dataset/<name>/test.json`` files) or as raw rows of the Hugging Face datasets; `to_llm_adapters_doc` turns the
latter into the former with the same instruction templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from milora.prompts import RESPONSE_MARKER, alpaca_prompt


@dataclass(frozen=True)
class CommonsenseDataset:
    """One of the 8 commonsense sets and its option words (the hub source is in its task YAML)."""

    name: str
    option_prefix: str  # "answer" -> answer1, answer2, ...
    max_options: int


COMMONSENSE_DATASETS: dict[str, CommonsenseDataset] = {
    d.name: d
    for d in (
        CommonsenseDataset("boolq", "", 2),
        CommonsenseDataset("piqa", "solution", 2),
        CommonsenseDataset("social_i_qa", "answer", 5),
        CommonsenseDataset("hellaswag", "ending", 4),
        CommonsenseDataset("winogrande", "option", 2),
        CommonsenseDataset("arc_easy", "answer", 5),
        CommonsenseDataset("arc_challenge", "answer", 5),
        CommonsenseDataset("openbookqa", "answer", 5),
    )
}

# LLM-Adapters' directory names for the same sets (dataset/<dir>/test.json).
LLM_ADAPTERS_DIR_NAMES = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "openbookqa": "openbookqa",
}


def option_words(dataset: str) -> list[str]:
    """The words the model may answer with, in LLM-Adapters' extraction order."""
    spec = COMMONSENSE_DATASETS[dataset]
    if dataset == "boolq":
        return ["true", "false"]
    return [f"{spec.option_prefix}{i}" for i in range(1, spec.max_options + 1)]


def llm_adapters_response(generation: str) -> str:
    """The continuation up to the next ``### Response:``, stripped: what LLM-Adapters extracts the answer from."""
    return generation.split(RESPONSE_MARKER)[0].strip()


def extract_commonsense_answer(dataset: str, generation: str) -> str:
    """The first option word in the response (LLM-Adapters' regex, case-sensitive); "" when there is none."""
    words = option_words(dataset)
    # Longer words first inside the alternation so that e.g. "answer1" never shadows a hypothetical "answer10".
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    found = re.search(pattern, llm_adapters_response(generation))
    return found.group(0) if found else ""


def is_commonsense_correct(dataset: str, generation: str, gold: str) -> bool:
    return extract_commonsense_answer(dataset, generation) == gold.strip()


# --------------------------------------------------------------------------- hub rows -> LLM-Adapters docs
def _listed_options(prefix: str, texts: list[str]) -> tuple[str, str]:
    """The option lines ("Answer1: x", "Answer2: y", each after a blank line) and the format "answer1/answer2"."""
    capital = prefix[:1].upper() + prefix[1:]
    body = "".join(f"\n\n{capital}{i}: {t}" for i, t in enumerate(texts, start=1))
    fmt = "/".join(f"{prefix}{i}" for i in range(1, len(texts) + 1))
    return body, fmt


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artefacts removed, as lm-eval's and LLM-Adapters' preprocessing does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _boolq(row: dict) -> tuple[str, str]:
    question = row["question"].strip()
    answer = row.get("answer", row.get("label"))
    gold = "true" if answer in (True, 1, "true", "True") else "false"
    return (
        f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false",
        gold,
    )


def _piqa(row: dict) -> tuple[str, str]:
    body, fmt = _listed_options("solution", [row["sol1"], row["sol2"]])
    instruction = f"Please choose the correct solution to the question: {row['goal']}{body}\n\nAnswer format: {fmt}"
    return instruction, f"solution{int(row['label']) + 1}"


def _social_i_qa(row: dict) -> tuple[str, str]:
    body, fmt = _listed_options("answer", [row["answerA"], row["answerB"], row["answerC"]])
    instruction = (
        f"Please choose the correct answer to the question: {row['context']} {row['question']}{body}\n\n"
        f"Answer format: {fmt}"
    )
    return instruction, f"answer{int(row['label'])}"


def _hellaswag(row: dict) -> tuple[str, str]:
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    body, fmt = _listed_options("ending", [_hellaswag_clean(e) for e in row["endings"]])
    instruction = (
        f"Please choose the correct ending to complete the given sentence: {context}{body}\n\nAnswer format: {fmt}"
    )
    return instruction, f"ending{int(row['label']) + 1}"


def _winogrande(row: dict) -> tuple[str, str]:
    body, fmt = _listed_options("option", [row["option1"], row["option2"]])
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{row['sentence']}{body}\n\nAnswer format: {fmt}"
    )
    return instruction, f"option{int(row['answer'])}"


def _multiple_choice(question: str, choices: dict, answer_key: str) -> tuple[str, str]:
    body, fmt = _listed_options("answer", list(choices["text"]))
    instruction = f"Please choose the correct answer to the question: {question}{body}\n\nAnswer format: {fmt}"
    return instruction, f"answer{list(choices['label']).index(answer_key) + 1}"


def _arc(row: dict) -> tuple[str, str]:
    return _multiple_choice(row["question"], row["choices"], row["answerKey"])


def _openbookqa(row: dict) -> tuple[str, str]:
    return _multiple_choice(row["question_stem"], row["choices"], row["answerKey"])


_HUB_ROW_CONVERTERS = {
    "boolq": _boolq,
    "piqa": _piqa,
    "social_i_qa": _social_i_qa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _openbookqa,
}


def to_llm_adapters_doc(dataset: str, row: dict) -> dict:
    """A doc with ``instruction``, ``input``, ``answer`` and the ready ``prompt``, from either source format."""
    if "instruction" in row and "answer" in row:
        instruction, gold, input_text = row["instruction"], str(row["answer"]).strip(), row.get("input") or ""
    else:
        instruction, gold = _HUB_ROW_CONVERTERS[dataset](row)
        input_text = ""
    return {
        "instruction": instruction,
        "input": input_text,
        "answer": gold,
        "prompt": alpaca_prompt(instruction, input_text),
    }
