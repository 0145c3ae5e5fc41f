"""IFEval scoring: prompt- and instruction-level accuracy, strict and loose, with lm-eval's own checkers.

The rule-based instruction checkers are those lm-eval ships (``lm_eval.tasks.ifeval``: Google's reference
implementation); this module only feeds them and aggregates. They need ``langdetect`` and ``immutabledict``
(lm-eval's ``ifeval`` extra) and NLTK's ``punkt_tab`` sentence model, which NLTK normally downloads. Offline,
when ``punkt_tab`` is not installed, `ensure_sentence_tokenizer` writes an untrained Punkt model (default
parameters plus common English abbreviations) into a private data directory, so that sentence and word
counting still work; the results of the two instructions that count sentences or capitalised words can then
differ slightly from the reference on abbreviation-heavy text. `sentence_tokenizer_source` says which one
is in use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Abbreviations (lower case, no final period) given to the offline fallback so that "Dr. Smith" or "e.g. this"
# do not end a sentence.
# fmt: off
FALLBACK_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co", "corp",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "no", "fig", "approx",
    "u.s", "u.k", "a.m", "p.m", "dept", "est", "gen", "gov", "lt", "mt", "rev", "sgt", "vol",
)
# fmt: on

FALLBACK_DATA_DIR_ENV = "MILORA_NLTK_DATA"


def _punkt_tab_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _fallback_data_dir() -> Path:
    root = os.environ.get(FALLBACK_DATA_DIR_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "milora" / "nltk_data"


def _write_fallback_punkt(data_dir: Path) -> None:
    model_dir = data_dir / "tokenizers" / "punkt_tab" / "english"
    model_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "abbrev_types.txt": "\n".join(FALLBACK_ABBREVIATIONS) + "\n",
        "collocations.tab": "",
        "sent_starters.txt": "",
        "ortho_context.tab": "",
    }
    for name, text in contents.items():
        target = model_dir / name
        if not target.exists():
            tmp = target.with_suffix(target.suffix + f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)


@functools.lru_cache(maxsize=None)
def ensure_sentence_tokenizer() -> str:
    """Make NLTK's ``punkt_tab`` loadable, installing the offline fallback if needed; returns its source."""
    import nltk

    if _punkt_tab_installed():
        return "nltk punkt_tab"
    data_dir = _fallback_data_dir()
    _write_fallback_punkt(data_dir)
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))
    if not _punkt_tab_installed():
        raise RuntimeError(f"could not provide NLTK punkt_tab (tried {data_dir})")
    return f"offline fallback at {data_dir}"


def sentence_tokenizer_source() -> str:
    return ensure_sentence_tokenizer()


@functools.lru_cache(maxsize=None)
def _checkers():
    """lm-eval's IFEval module, imported once the sentence model is in place (its import tries a download)."""
    ensure_sentence_tokenizer()
    from lm_eval.tasks.ifeval import utils as ifeval_utils

    return ifeval_utils


@dataclass(frozen=True)
class IFEvalResult:
    """Per-prompt outcome: one bool per instruction, strict and loose."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]


def check_response(doc: dict, response: str) -> IFEvalResult:
    """Run every instruction of one IFEval doc (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``)."""
    checkers = _checkers()
    example = checkers.InputExample(
        key=doc.get("key", 0),
        instruction_id_list=list(doc["instruction_id_list"]),
        prompt=doc["prompt"],
        kwargs=[_clean_kwargs(k) for k in doc["kwargs"]],
    )
    strict = checkers.test_instruction_following_strict(example, response)
    loose = checkers.test_instruction_following_loose(example, response)
    return IFEvalResult(tuple(strict.follow_instruction_list), tuple(loose.follow_instruction_list))


def _clean_kwargs(kwargs: dict | None) -> dict:
    """Hub rows carry every possible argument with None for the unused ones; the checkers want only the set ones."""
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


def ifeval_metrics(results: Sequence[IFEvalResult]) -> dict[str, float]:
    """The four IFEval numbers: prompt-level (all instructions followed) and instruction-level, strict and loose."""
    if not results:
        raise ValueError("no IFEval results to aggregate")
    strict_inst = [ok for r in results for ok in r.strict]
    loose_inst = [ok for r in results for ok in r.loose]
    return {
        "prompt_level_strict_acc": sum(all(r.strict) for r in results) / len(results),
        "inst_level_strict_acc": sum(strict_inst) / len(strict_inst),
        "prompt_level_loose_acc": sum(all(r.loose) for r in results) / len(results),
        "inst_level_loose_acc": sum(loose_inst) / len(loose_inst),
    }


def score_responses(docs: Iterable[dict], responses: Iterable[str]) -> dict[str, float]:
    return ifeval_metrics([check_response(d, r) for d, r in zip(docs, responses, strict=True)])


# --------------------------------------------------------------------------- lm-eval hooks (tasks/ifeval)


def lm_eval_process_results(doc: dict, results: list[str]) -> dict:
    """``process_results`` of the ``milora_ifeval`` task: per-prompt bools, per-instruction lists."""
    outcome = check_response(doc, results[0])
    return {
        "prompt_level_strict_acc": all(outcome.strict),
        "inst_level_strict_acc": list(outcome.strict),
        "prompt_level_loose_acc": all(outcome.loose),
        "inst_level_loose_acc": list(outcome.loose),
    }


def aggregate_instruction_level(items: list[list[bool]]) -> float:
    flat = [ok for item in items for ok in item]
    return sum(flat) / len(flat) if flat else 0.0
