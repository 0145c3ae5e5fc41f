"""The visual benchmarks end to end: records -> LLaVA-1.5 evaluation prompts -> answers -> official scores.

A benchmark file is JSON Lines (or a JSON list), one question per row, with ``question_id``, ``image`` (a path,
relative to an image folder; empty for ScienceQA's text-only questions) and ``question``, plus per benchmark:

- ``vqav2`` / ``vizwiz`` / ``textvqa``: ``answers``, the human answers (strings or ``{"answer": ...}``);
- ``gqa``: ``answer``;
- ``scienceqa``: ``choices`` (list), ``answer`` (gold index), optional ``hint``;
- ``pope``: ``answer`` (``yes``/``no``), optional ``category`` (random / popular / adversarial);
- ``mmbench``: ``options`` (list, or dict keyed by letter), ``answer`` (letter), optional ``hint`` and
  ``category``; each question is asked once per circular shift of its options.

Prompt suffixes are those of LLaVA-1.5's evaluation scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_harness import vqa_scoring
from milora.io import read_json_rows

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
VIZWIZ_UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
BENCHMARKS = ("vqav2", "vizwiz", "textvqa", "gqa", "scienceqa", "pope", "mmbench")


@dataclass(frozen=True)
class VisualQuestion:
    """One generation request: an image (path, PIL image, or None for a text-only question) and the question."""

    image: object
    question: str


def load_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The benchmark's question records (JSON Lines, or a JSON list), the first `limit` of them."""
    rows = read_json_rows(path)
    return rows[:limit] if limit else rows


def human_answers(record: dict) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else str(a) for a in record["answers"]]


def options_list(record: dict) -> list[str]:
    options = record.get("options", record.get("choices"))
    if isinstance(options, dict):
        return [str(options[k]) for k in sorted(options) if options[k] not in (None, "")]
    return [str(o) for o in options]


def multiple_choice_question(
    question: str, options: Sequence[str], hint: str | None = None, hint_prefix: str = ""
) -> str:
    """LLaVA's multiple-choice layout: hint, question, ``A. option`` lines, the letter instruction."""
    lines = [f"{hint_prefix}{hint}"] if hint else []
    lines.append(question)
    lines += [f"{vqa_scoring.MMBENCH_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    lines.append(LETTER_ANSWER)
    return "\n".join(lines)


def question_text(benchmark: str, record: dict, options: Sequence[str] | None = None) -> str:
    """The full question the model sees for one record (options: the shifted options for MMBench)."""
    question = record["question"]
    if benchmark in ("vqav2", "gqa", "textvqa", "pope"):
        return f"{question}\n{SHORT_ANSWER}"
    if benchmark == "vizwiz":
        return f"{question}\n{VIZWIZ_UNANSWERABLE}\n{SHORT_ANSWER}"
    if benchmark in ("scienceqa", "mmbench"):
        shown = options if options is not None else options_list(record)
        # ScienceQA's converted questions label the hint "Context: "; MMBench puts the bare hint first.
        prefix = "Context: " if benchmark == "scienceqa" else ""
        return multiple_choice_question(question, shown, record.get("hint"), hint_prefix=prefix)
    raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")


def image_of(record: dict, image_dir: str | Path | None):
    image = record.get("image")
    if not image:
        return None
    path = Path(image)
    return path if path.is_absolute() or image_dir is None else Path(image_dir) / path


def build_requests(benchmark: str, records: Sequence[dict], image_dir=None) -> list[tuple[dict, VisualQuestion]]:
    """(scoring record, generation request) pairs; MMBench gets one pair per circular shift."""
    pairs = []
    for record in records:
        image = image_of(record, image_dir)
        if benchmark == "mmbench":
            for shift, (options, gold) in enumerate(
                vqa_scoring.circular_shifts(options_list(record), record["answer"])
            ):
                scoring = dict(record, options=options, answer=gold, shift=shift)
                pairs.append((scoring, VisualQuestion(image, question_text(benchmark, record, options))))
        else:
            pairs.append((record, VisualQuestion(image, question_text(benchmark, record))))
    return pairs


def score(benchmark: str, records: Sequence[dict], predictions: Sequence[str]) -> dict[str, float]:
    """The benchmark's official metrics (accuracies in [0, 1])."""
    if benchmark in ("vqav2", "vizwiz", "textvqa"):
        humans = [human_answers(r) for r in records]
        return {"accuracy": vqa_scoring.mean_vqa_accuracy(predictions, humans, benchmark)}  # TextVQA: its own processor
    if benchmark == "gqa":
        return {"accuracy": vqa_scoring.gqa_accuracy(predictions, [r["answer"] for r in records])}
    if benchmark == "scienceqa":
        return vqa_scoring.scienceqa_scores(
            {
                "prediction": p,
                "answer": r["answer"],
                "num_choices": len(options_list(r)),
                "has_image": bool(r.get("image")),
            }
            for r, p in zip(records, predictions, strict=True)
        )
    if benchmark == "pope":
        scores = vqa_scoring.pope_scores(predictions, [r["answer"] for r in records])
        for category in sorted({r["category"] for r in records if r.get("category")}):
            chosen = [
                (p, r["answer"]) for r, p in zip(records, predictions, strict=True) if r.get("category") == category
            ]
            sub = vqa_scoring.pope_scores([p for p, _ in chosen], [a for _, a in chosen])
            scores.update({f"{name}/{category}": value for name, value in sub.items()})
        return scores
    if benchmark == "mmbench":
        return vqa_scoring.mmbench_circular_scores(
            {
                "question_id": r["question_id"],
                "prediction": vqa_scoring.parse_mmbench_letter(p, r["options"]),
                "answer": r["answer"],
                "category": r.get("category"),
            }
            for r, p in zip(records, predictions, strict=True)
        )
    raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
