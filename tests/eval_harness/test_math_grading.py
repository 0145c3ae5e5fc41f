"""GSM8K / MATH answer extraction and LaTeX equivalence, on real answer strings."""

from __future__ import annotations

import json
import re

import pytest

from eval_harness import math_grading as mg


def _gsm8k_rows(path, n=40):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _metamath_style(reference_answer: str) -> str:
    """A MetaMath-style response built from a real GSM8K solution: calculator marks dropped, final line
    rewritten as "The answer is: X"."""
    body, final = reference_answer.split("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is: {final.strip()}"


# --------------------------------------------------------------------------- GSM8K


def test_gsm8k_gold_is_the_integer_after_the_hashes_on_the_real_test_set(gsm8k_test_file):
    rows = _gsm8k_rows(gsm8k_test_file)
    golds = [mg.gsm8k_gold_answer(r["answer"]) for r in rows]
    assert golds[0] == "18"  # Janet's ducks
    assert all(re.fullmatch(r"-?\d+", g) for g in golds)


def test_metamath_extraction_recovers_every_real_gold_answer(gsm8k_test_file):
    rows = _gsm8k_rows(gsm8k_test_file)
    for row in rows:
        gold = mg.gsm8k_gold_answer(row["answer"])
        prediction = mg.extract_gsm8k_answer(_metamath_style(row["answer"]))
        assert mg.gsm8k_is_correct(prediction, gold), (row["answer"], prediction)


def test_reference_solution_without_marker_fails_strict_but_passes_flexible(gsm8k_test_file):
    row = _gsm8k_rows(gsm8k_test_file, 1)[0]
    gold = mg.gsm8k_gold_answer(row["answer"])
    assert mg.extract_gsm8k_answer(row["answer"]) is None
    assert not mg.gsm8k_is_correct(mg.extract_gsm8k_answer(row["answer"]), gold)
    assert mg.gsm8k_is_correct(mg.extract_gsm8k_answer_flexible(row["answer"]), gold)


def test_a_wrong_final_answer_is_wrong(gsm8k_test_file):
    row = _gsm8k_rows(gsm8k_test_file, 1)[0]
    gold = mg.gsm8k_gold_answer(row["answer"])
    wrong = _metamath_style(row["answer"]).replace(f"The answer is: {gold}", f"The answer is: {int(gold) + 1}")
    assert not mg.gsm8k_is_correct(mg.extract_gsm8k_answer(wrong), gold)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She makes 9 * 2 = $18 every day.\nThe answer is: 18", 18),
        ("The answer is: $18.", 18),
        ("The answer is: 1,234 dollars", 1234),
        ("The answer is: -7", -7),
        ("First guess. The answer is: 5\nWait, recount. The answer is: 6", 6),  # the LAST marker counts
        ("The answer is: 10/4", 2),  # MetaMath reads a/b as a fraction and rounds (2.5 -> 2, banker's rounding)
        ("The answer is: 7/0", 7),  # a zero denominator gives the numerator
        ("The answer is: 18.0", 18),
        ("So the total is 18.", None),  # no marker
        ("The answer is: eighteen", None),  # no number after the marker
    ],
)
def test_metamath_number_extraction(completion, expected):
    assert mg.extract_gsm8k_answer(completion) == expected


def test_flexible_extraction_takes_the_last_number():
    assert mg.extract_gsm8k_answer_flexible("She has 3 apples, then 12,000 more.") == 12000.0
    assert mg.extract_gsm8k_answer_flexible("no digits here") is None


# --------------------------------------------------------------------------- MATH


def _math_rows(fixtures_dir):
    return [json.loads(line) for line in (fixtures_dir / "math_test.jsonl").read_text().splitlines()]


def test_gold_answers_are_the_last_boxed_content_of_real_solutions(fixtures_dir):
    golds = [mg.math_gold_answer(r["solution"]) for r in _math_rows(fixtures_dir)]
    assert golds == ["2", "10", "20\\sqrt3", "125"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("\\fbox{5}", "5"),
        ("answer $\\boxed 7$", "7"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_boxed_extraction(text, expected):
    assert mg.remove_boxed(mg.last_boxed_only_string(text)) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The distance is 20 sqrt 3.\nThe answer is: 20\\sqrt{3}", "20\\sqrt{3}"),
        ("... so we get 1/2.\nThe answer is: \\frac{1}{2}.\n", "\\frac{1}{2}"),
        ("The answer is: 5.\nThis is because...", "5"),
        ("The answer is: (1,-2)", "(1,-2)"),
        ("Therefore the answer is $\\boxed{5}$.", None),  # no MetaMath marker
    ],
)
def test_metamath_math_extraction(completion, expected):
    assert mg.extract_math_answer(completion) == expected


def test_flexible_math_extraction_falls_back_to_the_last_box():
    assert mg.extract_math_answer_flexible("Therefore the answer is $\\boxed{5}$.") == "5"
    assert mg.extract_math_answer_flexible("The answer is: $\\boxed{\\frac{3}{4}}$") == "\\frac{3}{4}"


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("0.5", "\\frac{1}{2}"),
        ("0.25", "\\frac14"),
        ("1/2", "\\frac{1}{2}"),
        ("\\frac{-1}{2}", "-\\frac{1}{2}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("(0.5, 2)", "\\left(\\frac12, 2\\right)"),
        ("20\\sqrt{3}", "20\\sqrt3"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
        ("10\\text{ inches}", "10"),
        ("5\\mbox{ cm}^2", "5"),
        ("12 dollars", "12"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$18.90", "18.90"),
        ("50\\%", "50"),
        ("x = 5", "5"),
        ("1,000", "1000"),
        ("\\text{(C)}", "C"),
        ("\\text{Devon}", "Devon"),
        ("2, -3", "-3, 2"),
        ("2x+1", "1+2x"),
        ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"),
        (" 3 ", "3"),
        ("3.", "3"),
    ],
)
def test_equivalent_latex_answers(prediction, gold):
    assert mg.is_math_equiv(prediction, gold)
    assert mg.is_math_equiv(gold, prediction)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("\\frac{1}{3}", "0.33"),
        ("(1,2)", "(2,1)"),
        ("[1,2]", "(1,2)"),
        ("(1,2)", "1,2"),
        ("2", "3"),
        ("\\sqrt{2}", "2"),
        ("x^2", "2x"),
        ("2x", "2"),
        ("-5", "5"),
        (None, "1"),
        ("1", None),
    ],
)
def test_different_latex_answers(prediction, gold):
    assert not mg.is_math_equiv(prediction, gold)


def test_model_text_is_never_executed():
    marker = "__import__('os').system('echo pwned')"
    assert not mg.is_math_equiv(marker, "0")
    assert mg._latex_to_sympy_source(marker) is None
