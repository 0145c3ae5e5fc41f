"""GSM8K and MATH grading as MetaMath's evaluation scripts do it, with a lenient second score.

The paper follows MetaMath's evaluation (``eval_gsm8k.py``, ``eval_math.py``): the model's final answer is
what follows the last ``The answer is: `` in its response.

- GSM8K ``exact_match`` (MetaMath ``extract_answer_number``): the first number after that marker (``a/b``
  read as a fraction, ``a/0`` as ``a``), rounded to an integer, against the integer after ``#### ``.
- MATH ``exact_match`` (MetaMath ``process_results``): the text after the marker up to the first ``".\\n"``,
  without a trailing period, against the last ``\\boxed{}`` of the reference solution, compared by Hendrycks'
  ``is_equiv`` (string equality after ``strip_string``), imported from lm-eval's ``hendrycks_math`` task: the
  same functions, line for line, as MetaMath's ``util.py``. No numeric tolerance, no symbolic algebra.
- ``exact_match_flex`` (ours, lenient): the answer after the marker, else the last ``\\boxed{}`` (or
  ``\\fbox{}``, which the official helpers find but cannot read), else the last number; for MATH it counts as
  right if ``is_equiv`` or HF's ``math-verify`` says so, each math-verify comparison under a hard time limit
  (`eval_harness.math_verify_worker`).

Deliberate deviations from the official scripts, each because the official code crashes on model output:

- GSM8K: where MetaMath raises (``7/00``: ZeroDivisionError; ``-1e400``-sized numbers: OverflowError in
  ``round``; fractions too large for a float) the answer is unparsable and scores 0.
- MATH gold answers use lm-eval's ``last_boxed_only_string`` / ``remove_boxed``, which also read ``\\boxed 5``
  (MetaMath's ``remove_boxed`` returns None there, so such a problem could never be solved); on the 5,000
  MATH test solutions the two give the same gold answers (none uses ``\\boxed ``).
- ``is_equiv(None, None)`` is True in the official helper; here a missing answer is never right (MetaMath
  scores a response without the marker 0 before ever comparing).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from lm_eval.tasks.hendrycks_math.utils import is_equiv as _hendrycks_is_equiv
from lm_eval.tasks.hendrycks_math.utils import (
    last_boxed_only_string as _hendrycks_last_boxed,
)
from lm_eval.tasks.hendrycks_math.utils import remove_boxed as _hendrycks_remove_boxed

from eval_harness.math_verify_worker import DEFAULT_TIME_LIMIT_S, math_verify_equal

ANSWER_MARKER = "The answer is: "

# --------------------------------------------------------------------------- GSM8K


def gsm8k_gold_answer(answer_field: str) -> str:
    """The number after ``#### `` in a GSM8K reference answer, without thousands separators."""
    return answer_field.split("####")[-1].strip().replace(",", "")


_METAMATH_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _metamath_number(text: str) -> int | None:
    """MetaMath's reading of one matched number: ``a/b`` as a fraction, ``a/0`` as ``a``, then rounded."""
    if "/" in text:
        numerator, denominator = text.split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        fraction = Fraction(text.replace(",", ""))
        return round(float(fraction.numerator / fraction.denominator))
    value = float(text.replace(",", ""))
    return None if value == math.inf else round(value)


def extract_gsm8k_answer(completion: str) -> int | None:
    """MetaMath's ``extract_answer_number``: the first number after the last ``The answer is: ``, rounded.

    None (scored 0) when there is no marker, no number, or the number cannot be read (``7/00``, ``-1e999``).
    """
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    match = _METAMATH_NUMBER.search(parts[-1].strip())
    if not match:
        return None
    try:
        return _metamath_number(match.group())
    except (ArithmeticError, ValueError):  # ZeroDivisionError, OverflowError: the official script crashes
        return None


_ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> float | None:
    """The last number in the text (thousands separators allowed), or None."""
    found = [m.group().rstrip(",") for m in _ANY_NUMBER.finditer(text)]
    for candidate in reversed(found):
        try:
            return float(candidate.replace(",", ""))
        except ValueError:
            continue
    return None


def extract_gsm8k_answer_flexible(completion: str) -> float | None:
    """The MetaMath answer when the marker is there, else the number in the last ``\\boxed{}`` / ``\\fbox{}``,
    else the last number of the response."""
    strict = extract_gsm8k_answer(completion)
    if strict is not None:
        return float(strict)
    boxed = last_box_content(completion)
    boxed_number = extract_last_number(boxed) if boxed is not None else None
    return boxed_number if boxed_number is not None else extract_last_number(completion)


def gsm8k_is_correct(prediction: float | None, gold: str) -> bool:
    """MetaMath's comparison: ``float(prediction) == float(gold)``; a missing prediction is wrong."""
    if prediction is None:
        return False
    try:
        return float(prediction) == float(gold.replace(",", ""))
    except (ValueError, OverflowError):
        return False


# --------------------------------------------------------------------------- MATH: extraction


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in the text (lm-eval's helper), or None.

    `remove_boxed` reads only the ``\\boxed`` forms; `last_box_content` (the lenient score's) reads all three."""
    return _hendrycks_last_boxed(text)


def remove_boxed(boxed: str | None) -> str | None:
    """``\\boxed{X}`` -> ``X`` and ``\\boxed X`` -> ``X`` (lm-eval's helper); anything else -> None."""
    if boxed is None:
        return None
    try:
        return _hendrycks_remove_boxed(boxed)
    except (AssertionError, IndexError):
        return None


def last_box_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, ``\\boxed x`` or ``\\fbox{...}`` in the text, for the lenient
    score. `remove_boxed` (lm-eval's and MetaMath's, kept for gold answers and the official score) returns None
    for the ``\\fbox{...}`` that `last_boxed_only_string` finds, and that helper prefers any ``\\boxed`` to a
    later ``\\fbox``; here an ``\\fbox{}`` that comes last is read."""
    fbox = text.rfind("\\fbox")
    if fbox > text.rfind("\\boxed"):
        found = last_boxed_only_string(text[fbox:])
        if found is not None and found.startswith("\\fbox{") and found.endswith("}"):
            return found[len("\\fbox{") : -1]
    return remove_boxed(last_boxed_only_string(text))


def math_gold_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{}`` of a MATH reference solution."""
    return remove_boxed(last_boxed_only_string(solution))


def extract_math_answer(completion: str) -> str | None:
    """MetaMath's MATH extraction: after the last ``The answer is: ``, up to ``".\\n"``, no trailing period."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    answer = answer.removesuffix(".")
    return answer.strip()


def extract_math_answer_flexible(completion: str) -> str | None:
    """The MetaMath answer when the marker is there (its box's content if boxed), else the last ``\\boxed{}`` /
    ``\\fbox{}``, else the last number."""
    strict = extract_math_answer(completion)
    if strict:
        boxed = last_box_content(strict)
        return boxed if boxed is not None else strict
    boxed = last_box_content(completion)
    if boxed is not None:
        return boxed
    number = _ANY_NUMBER.findall(completion)
    return number[-1] if number else None


# --------------------------------------------------------------------------- MATH: equivalence


def is_math_equiv(prediction: str | None, gold: str | None) -> bool:
    """Hendrycks' ``is_equiv`` (MetaMath's and lm-eval's MATH protocol); a missing answer never matches."""
    if prediction is None or gold is None:
        return False
    return bool(_hendrycks_is_equiv(prediction, gold))


def is_math_equiv_flex(
    prediction: str | None, gold: str | None, time_limit_s: float = DEFAULT_TIME_LIMIT_S
) -> bool:
    """The lenient verdict: ``is_math_equiv``, else math-verify's, which gives up (False) after ``time_limit_s``."""
    if prediction is None or gold is None:
        return False
    return is_math_equiv(prediction, gold) or math_verify_equal(gold, prediction, time_limit_s)
