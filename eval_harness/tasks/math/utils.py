"""lm-eval hooks of the milora GSM8K and MATH tasks: MetaMath prompts and answer grading.

lm-eval loads this file by path (``!function utils.<name>``); the logic lives in `eval_harness.math_grading`.
``exact_match`` is MetaMath's score; ``exact_match_flex`` the lenient one (any final number / ``\\boxed{}``,
math-verify for MATH). Every model output scores 0 or 1: unparsable answers score 0, nothing raises.
"""

import sys
from pathlib import Path

try:
    import eval_harness  # noqa: F401
except ImportError:  # lm_eval run from a checkout without milora installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from eval_harness import math_grading
from milora.prompts import metamath_eval_prompt


def _gsm8k_doc(row):
    question = row.get("question") or row.get("query")
    answer = row.get("answer") or row.get("response") or ""
    return {"prompt": metamath_eval_prompt(question), "gold": math_grading.gsm8k_gold_answer(answer)}


def _math_doc(row):
    problem = row.get("problem") or row.get("instruction") or row.get("query")
    gold = row.get("answer")
    if gold in (None, ""):
        gold = math_grading.math_gold_answer(row.get("solution") or row.get("output") or "")
    return {"prompt": metamath_eval_prompt(problem), "gold": "" if gold is None else str(gold)}


def process_docs_gsm8k(dataset):
    return dataset.map(_gsm8k_doc, remove_columns=list(dataset.column_names))


def process_docs_math(dataset):
    return dataset.map(_math_doc, remove_columns=list(dataset.column_names))


def process_results_gsm8k(doc, results):
    completion = results[0]
    return {
        "exact_match": math_grading.gsm8k_is_correct(math_grading.extract_gsm8k_answer(completion), doc["gold"]),
        "exact_match_flex": math_grading.gsm8k_is_correct(
            math_grading.extract_gsm8k_answer_flexible(completion), doc["gold"]
        ),
    }


def process_results_math(doc, results):
    completion = results[0]
    return {
        "exact_match": math_grading.is_math_equiv(math_grading.extract_math_answer(completion), doc["gold"]),
        "exact_match_flex": math_grading.is_math_equiv_flex(
            math_grading.extract_math_answer_flexible(completion), doc["gold"]
        ),
    }
